#!/usr/bin/env python3
"""What ``edgeq tune`` buys over naive INT8, per runtime, measured on this machine (the ``local`` target).

For each model: one ``edgeq tune`` run (all formats the profile allows), then, per format, naive INT8
(the first full-INT8 candidate: ORT/NNCF/TFLite defaults) against the best quantized candidate tune found
for that format (the fastest that met the budget, else the closest to it), with FP32 and what tune chose.
Latencies are the device bench's p50 (one thread per the profile), measured side by side in the tune run;
candidates that missed the budget are not benchmarked, so they show "-".

    .venv/bin/python benchmarks/bench_tune.py --magika-wheel magika-1.0.3-*.whl \
        --basic-pitch-wheel basic_pitch-0.4.0-*.whl [--only basic-pitch]   # + the digits CNN, the sensitive model
Models: Magika's content-type CNN (real, pretrained, inside the magika wheel; see magika_data.py), Basic Pitch's
note-transcription CNN (real, pretrained, a SavedModel inside the basic-pitch wheel, so TFLite can take it
too; see examples/basic_pitch), the digits CNN (examples/digits), and the constructed wide-range model of
tests/tune_fixtures.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# Cosine over every output, with basic-pitch's own view (note frames and onsets against FP32's) reported.
BASIC_PITCH_BUDGET = ["--min-cosine", "0.99", "--metric", "examples/basic_pitch/metrics.py:notes"]
# The transcription itself as the budget: 95% of FP32's active note frames kept (F1).
BASIC_PITCH_GATE = ["--gate", "examples/basic_pitch/metrics.py:notes.frame_f1>=0.95"]


def run_tune(name: str, paths: dict, out: Path, budget: list[str]) -> dict:
    argv = [sys.executable, "-m", "edgeq", "tune", str(paths["model"]), "--target", "local",
            "--calibration", str(paths["calibration"]), "--eval", str(paths["eval"]), *budget,
            "--max-time", "20m", "--runs", "200", "--output", str(out / name), "--force"]
    started = time.monotonic()
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - started
    if result.returncode != 0:
        print(result.stdout[-2000:], result.stderr[-2000:], file=sys.stderr)
        raise SystemExit(f"{name}: edgeq tune failed with exit code {result.returncode}")
    data = json.loads((out / name / "tune.json").read_text())
    data["wall_s"] = wall
    return data


def _metric(c: dict | None) -> str:
    score = (c or {}).get("host") or (c or {}).get("screen")
    if not score:
        return "error" if (c or {}).get("error") else "-"  # the error itself is in the notes below the table
    if score.get("top1_drop") is not None:
        return f"{score['top1_drop'] * 100:+.2f} pt" + (" (screen)" if not c.get("host") else "")
    notes = (score.get("metrics") or {}).get("notes")
    return f"cos {score['cosine_mean']:.4f}" + (f" f1 {notes['frame_f1']:.3f}" if notes else "")


def _p50(c: dict | None) -> str:
    value = ((c or {}).get("device") or {}).get("p50_ms")
    return "-" if value is None else f"{value:.4f}"


def table(name: str, data: dict) -> list[str]:
    candidates = data["candidates"]
    lines = [f"## {name}: budget {data['budget']}, chosen {data['chosen']}, tune wall {data['wall_s']:.0f} s "
             f"({len(candidates)} candidates)",
             f"{'format':<9} {'naive int8':<26} {'drop':>14} {'p50 ms':>8}   {'tuned quantized':<38} "
             f"{'drop':>14} {'p50 ms':>8}   {'fp32 p50':>8}"]
    for fmt in dict.fromkeys(c["format"] for c in candidates):
        mine = [c for c in candidates if c["format"] == fmt]
        naive = next((c for c in mine if c["scheme"] == "int8"), None)
        quantized = [c for c in mine if c["scheme"] in ("int8", "dynamic", "mixed") and (c["host"] or c["screen"])]
        passing = [c for c in quantized if c["passed"] and (c.get("device") or {}).get("p50_ms")]

        def closeness(c):
            score = c["host"] or c["screen"]
            return -score["top1_drop"] if score.get("top1_drop") is not None else score["cosine_mean"]
        best = (min(passing, key=lambda c: c["device"]["p50_ms"]) if passing
                else max(quantized, key=closeness) if quantized else None)
        fp32 = next((c for c in mine if c["scheme"] == "fp32"), None)
        tag = "" if best is None or best["passed"] else " (missed)"
        lines.append(f"{fmt:<9} {naive['id'] if naive else '-':<26} {_metric(naive):>14} {_p50(naive):>8}   "
                     f"{(best['id'] + tag) if best else '-':<38} {_metric(best):>14} {_p50(best):>8}   "
                     f"{_p50(fp32):>8}")
    chosen = next(c for c in candidates if c["chosen"])
    lines.append(f"chosen: {chosen['id']} p50 {_p50(chosen)} ms; notes: {'; '.join(data['notes']) or '-'}")
    lines += [f"error: {c['id']}: {c['error']}" for c in candidates if c.get("error")]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--magika-wheel", type=Path, help="magika wheel (pip download --no-deps magika)")
    parser.add_argument("--basic-pitch-wheel", type=Path, help="basic-pitch wheel (pip download --no-deps "
                        "basic-pitch==0.4.0)")
    parser.add_argument("--only", action="append", help="tune only this model (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="keep the tune directories here")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    out = args.out or Path(tempfile.mkdtemp(prefix="edgeq-bench-tune-"))
    from benchmarks import magika_data
    from examples.basic_pitch import data as basic_pitch_data
    from examples.digits.train import train
    from tests.tune_fixtures import write_sensitive_model

    def digits():
        paths = train(out / "digits-data")
        return {"model": paths["model"], "calibration": paths["calib"], "eval": paths["eval"]}

    builders = {
        "digits-cnn": (digits, ["--max-accuracy-drop", "0.01"]),
        "sensitive": (lambda: write_sensitive_model(out / "sensitive-data"), ["--max-accuracy-drop", "0.02"]),
        "magika": (lambda: magika_data.build(out / "magika-data", args.magika_wheel), ["--max-accuracy-drop", "0.01"]),
        "basic-pitch": (lambda: basic_pitch_data.build(out / "basic-pitch-data", args.basic_pitch_wheel),
                        BASIC_PITCH_BUDGET),
        "basic-pitch-notes": (lambda: basic_pitch_data.build(out / "basic-pitch-data", args.basic_pitch_wheel),
                              BASIC_PITCH_GATE)}
    models = {}
    for name, (build, budget) in builders.items():
        if args.only and name not in args.only:
            continue
        try:
            models[name] = (build(), budget)
        except SystemExit as exc:
            print(f"{name}: skipped ({exc})")
    from edgeq.targets import detect_local_profile

    print(f"edgeq tune on local (profile {detect_local_profile()}), {os.cpu_count()} cores")
    for name, (paths, budget) in models.items():
        print("\n".join(table(name, run_tune(name, paths, out, budget))), flush=True)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
