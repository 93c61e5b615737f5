#!/usr/bin/env python3
"""Benchmark: edgeq's OpenVINO INT8 of a Keras MobileNetV2 against hand conversions, and what a free batch
dimension costs.

Side by side in one process, every model opened through edgeq's own runtime session (the same pinned
precision and threads), interleaved rounds, medians:

- ``edgeq``: ``edgeq convert --format openvino --precision int8`` (free batch frozen to 1 by default);
- ``free batch``: the same through the SavedModel with the batch left free (what edgeq built before);
- ``hand via ONNX``: the issue's hand conversion, tf2onnx with a static 1x224x224x3 input, then
  ``ov.convert_model`` and default ``nncf.quantize``;
- with ``--all-formats``, edgeq and hand TFLite / ONNX Runtime INT8 and FP32 too, for "the fastest artifact
  on this host";
- with ``--tune``, ``edgeq tune`` on ``local`` (no labels: ``--min-cosine``) first, its wall time and its
  candidates; its chosen artifact is then measured in the same rounds as the others, and every artifact's
  output cosine against the Keras FP32 model on the eval set says which meet the same budget.

    .venv/bin/python benchmarks/bench_static_shapes.py [--runs 300] [--all-formats] [--tune [--tune-again]]
        [--profile P]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_convert import HAND, cpu_flags, cpu_model  # noqa: E402


def hand_openvino_via_onnx(model, calib: np.ndarray, out: Path) -> Path:
    """The issue's hand conversion: static 1x224x224x3 through ONNX, default nncf.quantize."""
    import nncf
    import openvino as ov
    import tensorflow as tf
    import tf2onnx

    onnx_path = out / "static.onnx"
    spec = [tf.TensorSpec((1, 224, 224, 3), tf.float32, name="x")]
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=str(onnx_path))
    quantized = nncf.quantize(ov.convert_model(str(onnx_path)),
                              nncf.Dataset([calib[i : i + 1] for i in range(len(calib))]), subset_size=len(calib))
    path = out / "hand-via-onnx" / "model.xml"
    ov.save_model(quantized, str(path), compress_to_fp16=False)
    return path


def free_batch_openvino(saved_model: Path, calib: np.ndarray, out: Path) -> Path:
    """edgeq's OpenVINO INT8 before shapes were frozen: SavedModel -> convert_model (batch ?) -> nncf."""
    import nncf
    import openvino as ov

    model = ov.convert_model(str(saved_model))
    assert model.inputs[0].get_partial_shape().is_dynamic
    quantized = nncf.quantize(model, nncf.Dataset([calib[i : i + 1] for i in range(len(calib))]),
                              subset_size=len(calib))
    path = out / "free-batch" / "model.xml"
    ov.save_model(quantized, str(path), compress_to_fp16=False)
    return path


def measure(sessions: dict, x: np.ndarray, runs: int, rounds: int = 10) -> dict[str, float]:
    """Median ms per session; each round runs every session ``runs // rounds`` times, in turn."""
    calls = {}
    for key, session in sessions.items():  # bind: the runner's timed call (input prepared once, outside)
        calls[key] = session.bind(session.prepare({session.inputs[0]["name"]: x}))
        for _ in range(10):
            calls[key]()
    samples: dict[str, list[float]] = {key: [] for key in sessions}
    for _ in range(rounds):
        for key, call in calls.items():
            for _ in range(max(1, runs // rounds)):
                start = time.perf_counter()
                call()
                samples[key].append((time.perf_counter() - start) * 1000)
    return {key: statistics.median(values) for key, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--calibration-samples", type=int, default=100)
    parser.add_argument("--all-formats", action="store_true")
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--tune-again", action="store_true", help="With --tune: tune a second time on the caches.")
    parser.add_argument("--profile", help="Profile for edgeq's conversions and tune [the one this host fits].")
    parser.add_argument("--min-cosine", type=float, default=0.99, help="The budget (tune and the table).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("nncf").setLevel(logging.ERROR)

    import keras

    from edgeq.convert import convert
    from edgeq.device.runtimes import open_session
    from edgeq.profiles import load_profile

    flags = cpu_flags()
    print(f"host: {cpu_model()}, {os.cpu_count()} cores, avx512_vnni={'avx512_vnni' in flags}, "
          f"amx={'amx_int8' in flags}, avx512_bf16={'avx512_bf16' in flags}; threads={args.threads}")
    work = Path(tempfile.mkdtemp(prefix="bench-static-"))
    keras.utils.set_random_seed(0)
    # Logits, not softmax: with random weights a softmax output is near-uniform (all ~0.001), which an int8
    # softmax output (scale 1/256 in ORT and TFLite) rounds to zero, and any cosine of it says nothing.
    model = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3), classifier_activation=None)
    # And batch-norm statistics set from data (one training-mode pass at momentum 0): at its initial statistics
    # this random network's logits are ~1e-12 and the same for every input, so INT8 rounds them all to zero.
    # With them its activations have a healthy range layer by layer (logits std ~0.4), as a trained one's do.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(np.random.default_rng(1).uniform(-1, 1, (32, 224, 224, 3)).astype(np.float32), training=True)
    model.save(work / "mobilenetv2.keras")
    saved_model = work / "savedmodel"
    model.export(str(saved_model), verbose=False)
    rng = np.random.default_rng(0)
    calib = rng.uniform(-1, 1, (args.calibration_samples, 224, 224, 3)).astype(np.float32)
    np.savez(work / "calib.npz", **{model.inputs[0].name: calib})
    np.savez(work / "eval.npz", **{model.inputs[0].name: rng.uniform(-1, 1, (100, 224, 224, 3)).astype(np.float32)})
    x = rng.uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)
    from edgeq.convert.validate import host_profile_name

    profile = load_profile(args.profile or host_profile_name() or "x86-avx2")
    print(f"profile {profile.name}")
    tuned = _tune(args, work, profile) if args.tune else None

    paths: dict[str, tuple[str, str, Path]] = {}  # label -> (format, precision, model file)
    formats = ("openvino", "tflite", "onnx") if args.all_formats else ("openvino",)
    for fmt in formats:
        for precision in ("int8", "fp32") if args.all_formats else ("int8",):
            started = time.perf_counter()
            m = convert(work / "mobilenetv2.keras", profile, work / f"edgeq-{fmt}-{precision}", format=fmt,
                        precision=precision, calibration=work / "calib.npz" if precision == "int8" else None)
            print(f"  edgeq {fmt} {precision}: {time.perf_counter() - started:.0f}s, inputs "
                  f"{[i.shape for i in m.inputs]} ({m.options.get('input_shapes_from') or 'as the source'})",
                  flush=True)
            paths[f"edgeq {fmt} {precision}"] = (fmt, precision, work / f"edgeq-{fmt}-{precision}" / m.model_file)
            if fmt != "openvino":
                (work / f"hand-{fmt}").mkdir(exist_ok=True)
                paths[f"hand {fmt} {precision}"] = (fmt, precision, HAND[fmt](saved_model, precision, calib,
                                                                              work / f"hand-{fmt}"))
    paths["free batch openvino int8"] = ("openvino", "int8", free_batch_openvino(saved_model, calib, work))
    paths["hand via ONNX openvino int8"] = ("openvino", "int8", hand_openvino_via_onnx(model, calib, work))

    if tuned is not None and tuned.chosen is not None:
        chosen = tuned.chosen
        from edgeq.manifest import read_manifest

        paths[f"tuned: {chosen.id}"] = (chosen.format, chosen.precision,
                                        tuned.chosen_dir / read_manifest(tuned.chosen_dir).model_file)
    sessions = {label: open_session(path, fmt, threads=args.threads, precision=precision)
                for label, (fmt, precision, path) in paths.items()}
    evaluation = np.load(work / "eval.npz")[model.inputs[0].name]
    reference_out = np.asarray(model(evaluation, training=False))
    cosine = {label: _cosine(session, evaluation, reference_out) for label, session in sessions.items()}
    latency = measure(sessions, x, args.runs)
    reference = latency["hand via ONNX openvino int8"]
    print(f"\nMobileNetV2 224x224 (weights=None), batch 1, median of {args.runs} runs in 10 interleaved rounds, "
          "all through edgeq's runtime sessions (pinned precision); cosine of the outputs against the Keras "
          f"FP32 model on the {len(evaluation)} eval inputs")
    print(f"{'artifact':<34}{'input':>18}{'p50 ms':>9}{'/ hand via ONNX':>17}{'cos mean':>10}"
          f"{'>= ' + str(args.min_cosine):>9}")
    for label, ms in sorted(latency.items(), key=lambda kv: kv[1]):
        shape = "x".join("?" if d is None else str(d) for d in sessions[label].inputs[0]["shape"])
        print(f"{label:<34}{shape:>18}{ms:>9.3f}{ms / reference:>16.3f}x{cosine[label]:>10.4f}"
              f"{'yes' if cosine[label] >= args.min_cosine else 'no':>9}")
    passing_hand = [label for label in latency if label.startswith("hand") and cosine[label] >= args.min_cosine]
    tuned_label = next((label for label in latency if label.startswith("tuned")), None)
    if passing_hand and tuned_label:
        fastest = min(passing_hand, key=latency.get)
        print(f"\ntuned {latency[tuned_label]:.3f} ms against the fastest hand conversion within the budget, "
              f"{fastest} {latency[fastest]:.3f} ms: {latency[fastest] / latency[tuned_label]:.2f}x")


def _cosine(session, x: np.ndarray, reference: np.ndarray) -> float:
    """Mean per-sample cosine of ``session``'s first output against ``reference``, one sample per call."""
    name = session.inputs[0]["name"]
    out = np.concatenate([session.run({name: x[i : i + 1]})[0] for i in range(len(x))]).reshape(len(x), -1)
    ref = reference.reshape(len(x), -1)
    return float(np.mean(np.sum(out * ref, 1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))))


def _tune(args, work: Path, profile):
    """edgeq tune on ``local`` with the cosine budget: prints its wall time, candidates and notes."""
    from edgeq.targets import local_target
    from edgeq.tune import Budget, tune

    os.environ.setdefault("EDGEQ_CACHE_DIR", str(work / "cache"))
    started = time.perf_counter()
    result = tune(work / "mobilenetv2.keras", local_target(), profile, calibration=work / "calib.npz",
                  eval_path=work / "eval.npz", budget=Budget(min_cosine=args.min_cosine), output=work / "tuned",
                  calibration_samples=args.calibration_samples, runs=200)
    wall = time.perf_counter() - started
    print(f"\nedgeq tune on local (profile {profile.name}, --min-cosine {args.min_cosine}, random-input eval of "
          f"100): {wall:.0f} s wall, {len(result.candidates)} candidates")
    for c in result.candidates:
        p50 = c.bench.get("p50_ms")
        metric = c.score.summary() if c.score else (c.error or c.rejected_by or "-")[:70]
        print(f"  {c.id:<40} {metric:<44} passed={c.passed!s:<5} p50={'-' if p50 is None else f'{p50:.3f} ms'} "
              f"({c.seconds:.0f} s)")
    if result.chosen is not None:
        print(f"chosen: {result.chosen.id} at {result.chosen.bench['p50_ms']:.3f} ms on the device bench")
    for note in result.notes:
        print(f"note: {note}")
    if args.tune_again:
        # The same tune again, with the caches the first one filled (FP32 outputs, ORT calibration ranges).
        started = time.perf_counter()
        again = tune(work / "mobilenetv2.keras", local_target(), profile, calibration=work / "calib.npz",
                     eval_path=work / "eval.npz", budget=Budget(min_cosine=args.min_cosine),
                     output=work / "tuned-again", calibration_samples=args.calibration_samples, runs=200)
        print(f"\nthe same tune again: {time.perf_counter() - started:.0f} s wall (first: {wall:.0f} s), "
              f"{len(again.candidates)} candidates, fp32 reference cached={again.reference_cached}, "
              f"chosen {again.chosen.id if again.chosen else None}")
        for first, second in zip(result.candidates, again.candidates, strict=False):
            if first.calibration_cache or second.calibration_cache:
                print(f"  {second.id:<40} {first.seconds:5.1f} s -> {second.seconds:5.1f} s (calibration ranges: "
                      f"{first.calibration_cache} -> {second.calibration_cache})")
        print("\n".join(f"note: {note}" for note in again.notes if "calibration" in note))
    return result


if __name__ == "__main__":
    main()
