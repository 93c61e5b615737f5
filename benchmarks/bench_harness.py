#!/usr/bin/env python3
"""Does the edgeq runner distort what it measures? Its p50 against a bare timing loop, side by side.

For each format, in ONE process: the runner's full path (the device package's ``run``, ``edgeq.device.bench.runner.main``, with a request, exactly
as on a device, power off) and a hand-written ``time.perf_counter`` loop over the same runtime API on the
same artifact with the same thread count, in interleaved rounds (order alternating). Prints the median
of the per-round p50s and the ratio runner/bare, which should stay within 3%.

    .venv/bin/python benchmarks/bench_harness.py                  # builds digits artifacts (wide CNN)
    .venv/bin/python benchmarks/bench_harness.py --artifact DIR   # your own artifacts (repeatable)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from edgeq.device.bench import run as device_run  # noqa: E402
from edgeq.device.bench import runner as device_runner  # noqa: E402
from edgeq.device.runtimes import open_session  # noqa: E402
from edgeq.device.runtimes.tflite import _tflite_interpreter  # noqa: E402


def bare_loop(model_path: Path, fmt: str, threads: int, feed: dict, warmup: int, runs: int) -> list[float]:
    """The loop a user would write over the runtime's own API; returns per-inference seconds."""
    clock = time.perf_counter
    samples = []
    if fmt == "tflite":
        interpreter_cls, _ = _tflite_interpreter()
        interpreter = interpreter_cls(model_path=str(model_path), num_threads=threads)
        interpreter.allocate_tensors()
        inputs = interpreter.get_input_details()
        outputs = interpreter.get_output_details()
        values = [feed[d["name"]] for d in inputs]
        for i in range(warmup + runs):
            t0 = clock()
            for detail, value in zip(inputs, values, strict=True):
                interpreter.set_tensor(detail["index"], value)
            interpreter.invoke()
            [interpreter.get_tensor(d["index"]) for d in outputs]
            t1 = clock()
            if i >= warmup:
                samples.append(t1 - t0)
    elif fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        for i in range(warmup + runs):
            t0 = clock()
            session.run(None, feed)
            t1 = clock()
            if i >= warmup:
                samples.append(t1 - t0)
    else:
        import openvino as ov

        # The runner pins f32 (fp32 artifacts); without the same pin OpenVINO runs bf16 on AVX512_BF16/AMX
        # CPUs and the comparison would be of different arithmetic, not of the harness.
        compiled = ov.Core().compile_model(str(model_path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                    "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()
        for i in range(warmup + runs):
            t0 = clock()
            request.infer(feed)
            t1 = clock()
            if i >= warmup:
                samples.append(t1 - t0)
    return samples


def runner_round(release: Path, scratch: Path, threads: int, warmup: int, runs: int) -> float:
    """p50 (ms) from the runner's own main(), in this process, as the device would run it."""
    request = {"request_version": 1, "release_dir": str(release), "warmup": warmup, "runs": runs,
               "min_seconds": 0, "threads": threads, "power": {"sensor": "none", "enabled": False}}
    (scratch / "req.json").write_text(json.dumps(request))
    if device_runner.main(["--request", str(scratch / "req.json"), "--result", str(scratch / "res.json")]) != 0:
        raise SystemExit(json.loads((scratch / "res.json").read_text())["error"])
    return json.loads((scratch / "res.json").read_text())["latency_ms"]["p50"]


def build_artifacts(root: Path, filters: int) -> list[Path]:
    from examples.digits.train import train
    from tests.test_bench_support import FORMATS, build_artifact

    digits = train(root / "digits", epochs=1, filters=filters)
    return [build_artifact(fmt, digits, root / fmt) for fmt in FORMATS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", action="append", type=Path, help="artifact dir (default: build digits ones)")
    parser.add_argument("--filters", type=int, default=64, help="width of the built digits CNN")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgeq-harness-") as tmp:
        root = Path(tmp)
        artifacts = args.artifact or build_artifacts(root, args.filters)
        rows = []
        for artifact in artifacts:
            from tests.test_bench_support import release_dir

            release = release_dir(artifact, root / "releases")
            manifest = json.loads((release / "manifest.json").read_text())
            fmt, model_path = manifest["format"], release / manifest["model_file"]
            session = open_session(model_path, fmt, threads=args.threads)
            feed = session.prepare(device_run._latency_feed(session, None, 0))
            del session
            runner_p50, bare_p50 = [], []
            for index in range(args.rounds):
                order = ("runner", "bare") if index % 2 == 0 else ("bare", "runner")
                for which in order:
                    if which == "runner":
                        runner_p50.append(runner_round(release, root, args.threads, args.warmup, args.runs))
                    else:
                        samples = bare_loop(model_path, fmt, args.threads, feed, args.warmup, args.runs)
                        bare_p50.append(statistics.median(samples) * 1000.0)
            runner_ms, bare_ms = statistics.median(runner_p50), statistics.median(bare_p50)
            spread = max(np.std(runner_p50) / runner_ms, np.std(bare_p50) / bare_ms)
            rows.append((fmt, manifest["precision"], runner_ms, bare_ms, runner_ms / bare_ms, spread))
    print(f"\nrunner vs bare perf_counter loop: {args.rounds} interleaved rounds x {args.runs} runs, "
          f"threads={args.threads}, median of per-round p50")
    print(f"{'format':<9} {'precision':<9} {'runner p50 ms':>14} {'bare p50 ms':>12} {'ratio':>7} "
          f"{'round cv':>9}  verdict")
    for fmt, precision, runner_ms, bare_ms, ratio, spread in rows:
        verdict = "ok (within 3%)" if abs(ratio - 1) <= 0.03 else "OUTSIDE 3%"
        print(f"{fmt:<9} {precision:<9} {runner_ms:>14.4f} {bare_ms:>12.4f} {ratio:>7.3f} {spread:>9.3f}  {verdict}")


if __name__ == "__main__":
    main()
