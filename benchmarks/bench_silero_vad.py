#!/usr/bin/env python3
"""Benchmark: silero-vad (voice activity: Convs then an LSTM, with a state input) at FP32, FP16, dynamic INT8
and static INT8 on ONNX Runtime and OpenVINO: p50 latency per 32 ms window, the speech decisions' agreement
with FP32 and the probabilities' mean absolute error, and size.

Both models come from the ``silero-vad`` wheel: ``silero_vad.onnx`` (its layers in If branches on the sample
rate, dynamic shapes), and ``silero_vad_openvino_16k.onnx`` (16 kHz, static shapes, no If), which OpenVINO
needs (its frontend cannot convert the first) and ORT's static INT8 needs (it does not quantize If bodies).
Eval: 12 s of the example's synthetic stream (examples/silero_vad/data.py), each window with the FP32 state
reached before it. Every artifact is built by edgeq and opened through edgeq's runtime sessions (pinned
precision, the same threads); rounds interleaved, medians.

    .venv/bin/python benchmarks/bench_silero_vad.py [--runs 2000] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_convert import cpu_flags, cpu_model  # noqa: E402

# (model file in the wheel, format, precision); the first of each model is the FP32 baseline of its rows.
BUILDS = (
    ("silero_vad.onnx", "onnx", "fp32"),
    ("silero_vad.onnx", "onnx", "dynamic"),
    ("silero_vad_openvino_16k.onnx", "onnx", "fp32"),
    ("silero_vad_openvino_16k.onnx", "onnx", "fp16"),
    ("silero_vad_openvino_16k.onnx", "onnx", "dynamic"),  # then "dynamic+conv", by hand (_dynamic_with_conv)
    ("silero_vad_openvino_16k.onnx", "onnx", "int8"),
    ("silero_vad_openvino_16k.onnx", "openvino", "fp32"),
    ("silero_vad_openvino_16k.onnx", "openvino", "dynamic"),
    ("silero_vad_openvino_16k.onnx", "openvino", "int8"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="A VAD runs beside the rest of an app: 1 thread.")
    parser.add_argument("--profile", help="Device profile [the one this host's CPU fits].")
    parser.add_argument("--tune-gate", default="examples/silero_vad/metrics.py:vad.decision_agreement>=0.99",
                        help="The budget of the closing edgeq tune run.")
    args = parser.parse_args()

    from edgeq.convert import convert
    from edgeq.convert.validate import host_profile_name
    from edgeq.data import InputSpec, load_dataset
    from edgeq.device.runtimes import open_session
    from edgeq.profiles import load_profile
    from examples.silero_vad import data as silero
    from examples.silero_vad.metrics import vad

    args.profile = args.profile or host_profile_name() or "x86-avx2"
    flags = cpu_flags()
    print(f"host: {cpu_model()}, {os.cpu_count()} cores, avx512_vnni={'avx512_vnni' in flags}, "
          f"amx={'amx_int8' in flags}; threads={args.threads}; profile {args.profile}")
    work = Path(tempfile.mkdtemp(prefix="bench-silero-"))
    paths = silero.write(work / "data")
    models = silero.model_path().parent
    rows = []
    for model, fmt, precision in BUILDS:
        started = time.perf_counter()
        manifest = convert(models / model, load_profile(args.profile), work / f"{model}-{fmt}-{precision}",
                           format=fmt, precision=precision, calibration=paths["calibration"])
        print(f"  built {model} {fmt} {precision} in {time.perf_counter() - started:.1f}s", flush=True)
        session = open_session(work / f"{model}-{fmt}-{precision}" / manifest.model_file, fmt,
                               threads=args.threads, precision=precision)
        specs = [InputSpec(name=t.name, shape=list(t.shape), dtype=t.dtype) for t in manifest.inputs]
        dataset = load_dataset(paths["eval"], specs, role="eval")
        rows.append(_row(model, fmt, precision, session, dataset, sum(f.size for f in manifest.files)))
        if (model, fmt, precision) == ("silero_vad_openvino_16k.onnx", "onnx", "dynamic"):
            rows.append(_dynamic_with_conv(work / f"{model}-{fmt}-fp32" / "model.onnx", dataset, args.threads))
    for _ in range(20):  # interleaved rounds
        for row in rows:
            for _ in range(max(1, args.runs // 20)):
                started = time.perf_counter_ns()
                row["call"]()
                row["samples"].append((time.perf_counter_ns() - started) / 1e6)

    windows = len(rows[0]["output"])
    print(f"\nsilero-vad 6.2.3, one 512-sample window (32 ms at 16 kHz) per call, median of {args.runs} calls in 20 "
          f"interleaved rounds; decisions (p > 0.5) and probabilities over {windows} windows against the same model "
          "at FP32")
    print(f"{'model':<30}{'format':<10}{'precision':<10}{'size KB':>9}{'p50 ms':>9}{'vs fp32':>9}{'decisions':>11}"
          f"{'mean |err|':>12}{'max |err|':>11}")
    baseline = {}
    for row in rows:
        key = (row["model"], row["format"])
        baseline.setdefault(key, row)
        fp32 = baseline[key]
        p50, fp32_p50 = statistics.median(row["samples"]), statistics.median(fp32["samples"])
        agreement = vad({"output": fp32["output"]}, {"output": row["output"]}, {}, None)
        print(f"{row['model']:<30}{row['format']:<10}{row['precision']:<10}{row['size']:>9.0f}{p50:>9.4f}"
              f"{fp32_p50 / p50:>8.2f}x{agreement['decision_agreement']:>10.1%}{agreement['mean_abs_error']:>12.5f}"
              f"{agreement['max_abs_error']:>11.5f}")
    speech = float(np.mean(rows[0]["output"].reshape(-1) > 0.5))
    print(f"\nFP32 speech share of the windows: {speech:.0%} (synthetic audio: no recordings ship in any package here)")
    _tune(args, models / "silero_vad_openvino_16k.onnx", paths, work)


def _dynamic_with_conv(fp32: Path, dataset, threads: int) -> dict:
    """What edgeq's dynamic INT8 no longer does for a recurrent model: ORT's dynamic quantization with its Convs
    as ConvInteger too (by hand: ORT's pre-processing, then quantize_dynamic, per-channel, as edgeq does)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic, shape_inference

    from edgeq.device.runtimes import open_session

    prepared, target = fp32.parent / "prepared.onnx", fp32.parent / "dynamic-conv.onnx"
    shape_inference.quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "LSTM", "Conv"], extra_options={"EnableSubgraph": True})
    session = open_session(target, "onnx", threads=threads, precision="dynamic")
    return _row("silero_vad_openvino_16k.onnx", "onnx", "dynamic+conv", session, dataset, target.stat().st_size)


def _row(model: str, fmt: str, precision: str, session, dataset, size_bytes: int) -> dict:
    """One table row: the speech probabilities over the eval stream, and the timed call on its first window."""
    from edgeq.device.feeds import run_samples

    outputs = run_samples(session.run, dataset.inputs, dataset.whole)
    names = [spec["name"] for spec in session.outputs]
    return {"model": model, "format": fmt, "precision": precision, "samples": [], "size": size_bytes / 1e3,
            "call": session.bind(session.prepare(dataset.batch(0))), "output": outputs[names.index("output")]}


def _tune(args, model: Path, paths: dict, work: Path) -> None:
    """``edgeq tune`` of the If-free model on ``local`` with the VAD gate as its budget: the table it prints."""
    from edgeq.profiles import load_profile
    from edgeq.targets import local_target
    from edgeq.taskmetrics import parse_gate
    from edgeq.tune import Budget, tune
    from edgeq.tune.output import COLUMNS, row

    os.environ.setdefault("EDGEQ_CACHE_DIR", str(work / "cache"))
    started = time.perf_counter()
    result = tune(model, local_target(), load_profile(args.profile), calibration=paths["calibration"],
                  eval_path=paths["eval"], budget=Budget(gates=(parse_gate(args.tune_gate),)),
                  output=work / "tuned", runs=500, min_seconds=0.5)
    print(f"\nedgeq tune {model.name} on local (profile {args.profile}), budget {args.tune_gate}: "
          f"{time.perf_counter() - started:.0f} s")
    wanted = ("candidate", "host metric", "pass", "p50 ms", "size KiB")
    index = [COLUMNS.index(c) for c in wanted]
    print("  ".join(f"{c:<28}" if c in ("candidate",) else f"{c:<12}" for c in wanted))
    for candidate in result.candidates:
        cells = [row(candidate)[i] for i in index]
        metric = cells[1].split("; ")[0].replace("examples/silero_vad/metrics.py:vad ", "")[:60]
        print(f"{cells[0]:<28}  {metric:<60}  {cells[2]:<6}  {cells[3]:<8}  {cells[4]}")
    print(f"chosen: {result.reason}")


if __name__ == "__main__":
    main()
