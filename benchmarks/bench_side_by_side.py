#!/usr/bin/env python3
"""Latency of finished edgeq artifacts side by side, on whatever machine this runs on: for checking on another
CPU (the device lent here: an Intel Xeon with AMX) what was measured on the development host.

Needs only numpy and the artifacts' runtimes, like a device: it uses the device package's sessions
(``edgeq.device.runtimes``), so each artifact runs at the precision its manifest pins (an fp32 OpenVINO model
is not silently run in bf16 on an AMX CPU). Every artifact is loaded once; then in each round each artifact
runs ``--runs`` timed calls on one fixed random input (free dimensions 1), the order alternating between rounds.
Prints the median over rounds of each round's p50, and its ratio to ``--baseline``.

    python3 benchmarks/bench_side_by_side.py --threads 2 --baseline fp32 fp32=ART_DIR int8=ART_DIR \
        hand=HAND/model.xml@int8 ...

A hand conversion has no manifest: MODEL_FILE@PRECISION names the precision its session pins, the same as an
edgeq artifact of that precision gets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edgeq.device.runtimes import open_session  # noqa: E402


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return " ".join(flag for flag in wanted if f" {flag}" in flags)


FORMAT_OF_SUFFIX = {".xml": "openvino", ".onnx": "onnx", ".tflite": "tflite"}


def artifact(path: str) -> tuple[Path, str, str]:
    """(model file, format, precision) of an edgeq artifact directory (its manifest says), or of a hand
    conversion's model file, written MODEL_FILE@PRECISION (format from the suffix)."""
    model, _, precision = path.partition("@")
    location = Path(model)
    if location.is_dir():
        manifest = json.loads((location / "manifest.json").read_text())
        return location / manifest["model_file"], manifest["format"], precision or manifest["precision"]
    if location.suffix not in FORMAT_OF_SUFFIX or not precision:
        sys.exit(f"{path}: give an artifact directory or MODEL_FILE@PRECISION (.xml, .onnx or .tflite)")
    return location, FORMAT_OF_SUFFIX[location.suffix], precision


def load(label: str, path: str, threads: int):
    model_file, model_format, precision = artifact(path)
    manifest = {"format": model_format, "precision": precision}
    session = open_session(model_file, model_format, threads=threads, precision=precision)
    rng = np.random.default_rng(0)
    feed = {}
    for spec in session.inputs:
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec["shape"]]
        feed[spec["name"]] = rng.normal(0, 1, shape).astype(np.float32)
    call = session.bind(session.prepare(feed))
    for _ in range(10):  # warm-up: first calls compile kernels and fill caches
        call()
    return {"label": label, "format": manifest["format"], "precision": manifest["precision"], "call": call,
            "execution": getattr(session, "execution", {}), "session": session}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", help="LABEL=ARTIFACT_DIR")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--baseline", help="the label the ratios are against (default: the first)")
    args = parser.parse_args()
    loaded = [load(label, path, args.threads) for label, path in (a.split("=", 1) for a in args.artifacts)]
    p50s: dict[str, list[float]] = {entry["label"]: [] for entry in loaded}
    for round_index in range(args.rounds):
        for entry in loaded if round_index % 2 == 0 else reversed(loaded):
            times = []
            for _ in range(args.runs):
                started = time.perf_counter()
                entry["call"]()
                times.append(time.perf_counter() - started)
            p50s[entry["label"]].append(statistics.median(times) * 1000)
    medians = {label: statistics.median(values) for label, values in p50s.items()}
    baseline = medians[args.baseline or loaded[0]["label"]]
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"flags: {cpu_flags()}; python {platform.python_version()}; {args.threads} threads; median of "
          f"{args.rounds} interleaved rounds of {args.runs} runs' p50")
    print(f"{'artifact':<34} {'format':<9} {'precision':<9} {'p50 ms':>9} {'speed vs ' + (args.baseline or loaded[0]['label']):>16}"
          "  executed")
    for entry in loaded:
        label = entry["label"]
        execution = entry["execution"]
        executed = " ".join(str(part) for part in (execution.get("provider"), execution.get("inference_precision"),
                                                   (execution.get("layer_precisions") or {}).get("runtime"))
                            if part)
        print(f"{label:<34} {entry['format']:<9} {entry['precision']:<9} {medians[label]:>9.3f} "
              f"{baseline / medians[label]:>15.2f}x  {executed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
