#!/usr/bin/env python3
"""Benchmark edgeq convert: INT8 vs FP32 latency per runtime, edgeq vs hand conversion, CLI start-up, digits accuracy.

Prints tables; asserts nothing. All latencies are measured in this one process, side by side,
with the same thread count, in interleaved rounds (so drift hits every model alike).

    .venv/bin/python benchmarks/bench_convert.py [--runs 30] [--calibration-samples 100]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FORMATS = ("tflite", "onnx", "openvino")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# ---- hand conversions: what a careful engineer writes with each library directly --------------------

def hand_tflite(saved_model: Path, precision: str, calib: np.ndarray, out: Path) -> Path:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if precision == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([calib[i : i + 1]] for i in range(len(calib)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = tf.int8
    path = out / f"hand-{precision}.tflite"
    path.write_bytes(converter.convert())
    return path


def _host_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def hand_onnx(saved_model: Path, precision: str, calib: np.ndarray, out: Path) -> Path:
    import tensorflow as tf
    import tf2onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    signature = (loaded := tf.saved_model.load(str(saved_model))).signatures["serving_default"]
    (name, spec), = signature.structured_input_signature[1].items()
    specs = [tf.TensorSpec(spec.shape, spec.dtype, name=name)]
    fp32 = out / "hand-fp32.onnx"
    if not fp32.exists():
        tf2onnx.convert.from_function(tf.function(lambda x: signature(**{name: x}), input_signature=specs),
                                      input_signature=specs, opset=17, output_path=str(fp32))
    del loaded
    if precision == "fp32":
        return fp32

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter({name: calib[i : i + 1]} for i in range(len(calib)))

        def get_next(self):
            return next(self.items, None)

    pre = out / "hand-pre.onnx"
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    path = out / "hand-int8.onnx"
    # What ORT's quantization guide recommends on x86-64: U8S8, 7-bit weights without VNNI.
    quantize_static(str(pre), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    reduce_range=not _host_has_vnni())
    return path


def hand_openvino(saved_model: Path, precision: str, calib: np.ndarray, out: Path) -> Path:
    import nncf
    import openvino as ov

    model = ov.convert_model(str(saved_model))
    if precision == "int8":
        model = nncf.quantize(model, nncf.Dataset([calib[i : i + 1] for i in range(len(calib))]),
                              subset_size=len(calib))
    path = out / f"hand-{precision}" / "model.xml"
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path


HAND = {"tflite": hand_tflite, "onnx": hand_onnx, "openvino": hand_openvino}


# ---- measurement ------------------------------------------------------------------------------------

def measure(sessions: dict[str, object], x: np.ndarray, runs: int, rounds: int = 5) -> dict[str, float]:
    """Median latency (ms) per session; runs split into interleaved rounds after a warm-up."""
    feeds = {key: {s.inputs[0]["name"]: x} for key, s in sessions.items()}
    for key, session in sessions.items():
        for _ in range(3):
            session.run(feeds[key])
    samples: dict[str, list[float]] = {key: [] for key in sessions}
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for key, session in sessions.items():
            for _ in range(per_round):
                start = time.perf_counter()
                session.run(feeds[key])
                samples[key].append((time.perf_counter() - start) * 1000)
    return {key: statistics.median(values) for key, values in samples.items()}


def startup_times(repeats: int) -> tuple[float, float]:
    def median_of(argv: list[str]) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True, cwd=REPO)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000

    edgeq = median_of([sys.executable, "-m", "edgeq", "--help"])
    baseline = median_of([sys.executable, "-c", "import click, numpy, yaml"])
    return edgeq, baseline


def digits_accuracy(work: Path) -> list[tuple]:
    from edgeq.convert import convert
    from edgeq.profiles import load_profile
    from examples.digits.train import train

    data = train(work / "digits")  # the demo's settings (15 epochs, 16 filters)
    rows = []
    for fmt in FORMATS:
        for precision in ("int8", "fp16"):
            m = convert(data["model"], load_profile("x86-avx2"), work / f"digits-{fmt}-{precision}", format=fmt,
                        precision=precision, calibration=data["calib"] if precision == "int8" else None,
                        eval_path=data["eval"])
            v = m.validation
            rows.append((fmt, precision, v.top1_reference, v.top1, v.top1_drop, v.top1_agreement))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model (median reported)")
    parser.add_argument("--calibration-samples", type=int, default=100)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--startup-repeats", type=int, default=7)
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.ERROR)
    import keras

    from edgeq.convert import convert
    from edgeq.device.runtimes import open_session
    from edgeq.profiles import load_profile

    flags = cpu_flags()
    print(f"host: {cpu_model()}, {os.cpu_count()} cores, avx2={'avx2' in flags}, "
          f"avx512_vnni={'avx512_vnni' in flags}, avx_vnni={'avx_vnni' in flags}; threads={args.threads}")
    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
    model_path = work / "mobilenetv2.keras"
    model.save(model_path)
    rng = np.random.default_rng(0)
    calib = rng.uniform(-1, 1, (args.calibration_samples, 224, 224, 3)).astype(np.float32)
    np.savez(work / "calib.npz", x=calib)
    saved_model = work / "savedmodel"
    model.export(str(saved_model), verbose=False)
    x = rng.uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)

    profile = load_profile("x86-avx2")
    paths: dict[tuple[str, str, str], Path] = {}
    convert_seconds: dict[tuple[str, str], float] = {}
    for fmt in FORMATS:
        for precision in ("fp32", "int8"):
            start = time.perf_counter()
            m = convert(model_path, profile, work / f"edgeq-{fmt}-{precision}", format=fmt, precision=precision,
                        calibration=work / "calib.npz" if precision == "int8" else None)
            convert_seconds[(fmt, precision)] = time.perf_counter() - start
            paths[("edgeq", fmt, precision)] = work / f"edgeq-{fmt}-{precision}" / m.model_file
            hand_dir = work / f"hand-{fmt}"
            hand_dir.mkdir(exist_ok=True)
            paths[("hand", fmt, precision)] = HAND[fmt](saved_model, precision, calib, hand_dir)
            print(f"  converted {fmt} {precision} ({convert_seconds[(fmt, precision)]:.0f}s with edgeq)", flush=True)

    sessions = {key: open_session(path, key[1], threads=args.threads) for key, path in paths.items()}
    exec_info = {key: s.execution for key, s in sessions.items()}
    latency = measure(sessions, x, args.runs)
    sizes = {key: sum(p.stat().st_size for p in path.parent.glob(path.stem + ".*")) if key[1] == "openvino"
             else path.stat().st_size for key, path in paths.items()}

    print("\nMobileNetV2 224x224 (weights=None), batch 1, median latency over", args.runs, "runs")
    print(f"{'format':<10}{'fp32 ms':>10}{'int8 ms':>10}{'int8 speedup':>14}{'fp32 MB':>9}{'int8 MB':>9}"
          f"{'edgeq/hand fp32':>17}{'edgeq/hand int8':>17}")
    for fmt in FORMATS:
        f32, i8 = latency[("edgeq", fmt, "fp32")], latency[("edgeq", fmt, "int8")]
        r32 = f32 / latency[("hand", fmt, "fp32")]
        r8 = i8 / latency[("hand", fmt, "int8")]
        print(f"{fmt:<10}{f32:>10.2f}{i8:>10.2f}{f32 / i8:>13.2f}x{sizes[('edgeq', fmt, 'fp32')] / 1e6:>9.2f}"
              f"{sizes[('edgeq', fmt, 'int8')] / 1e6:>9.2f}{r32:>17.3f}{r8:>17.3f}")
    print("hand-conversion latencies (ms): " + ", ".join(
        f"{fmt} {p} {latency[('hand', fmt, p)]:.2f}" for fmt in FORMATS for p in ("fp32", "int8")))
    print("execution: " + "; ".join(f"{k[1]} {k[2]}: {exec_info[('edgeq',) + k[1:]]}"
                                    for k in paths if k[0] == "edgeq" and k[2] == "int8"))

    edgeq_ms, baseline_ms = startup_times(args.startup_repeats)
    print(f"\nstart-up (median of {args.startup_repeats}): edgeq --help {edgeq_ms:.0f} ms, "
          f"python -c 'import click, numpy, yaml' {baseline_ms:.0f} ms, ratio {edgeq_ms / baseline_ms:.2f}x")

    if not args.skip_digits:
        print("\ndigits CNN (examples/digits, 450 held-out samples): top-1 on the host")
        print(f"{'format':<10}{'precision':<10}{'fp32 top-1':>11}{'top-1':>9}{'drop (pts)':>12}{'agreement':>11}")
        for fmt, precision, ref, top1, drop, agree in digits_accuracy(work):
            print(f"{fmt:<10}{precision:<10}{ref * 100:>10.2f}%{top1 * 100:>8.2f}%{drop * 100:>+12.2f}"
                  f"{agree * 100:>10.2f}%")


if __name__ == "__main__":
    main()
