#!/usr/bin/env python3
"""Basic Pitch (Spotify's polyphonic note-transcription CNN, a real pretrained TensorFlow SavedModel) offline:
the model and eval and calibration data for edgeq, in the form the model takes them.

The SavedModel ships in the PyPI package ``basic-pitch`` (``basic_pitch/saved_models/icassp_2022/nmp``). It is
taken from an installed package, else from its wheel (``pip download --no-deps basic-pitch==0.4.0``: its
dependencies pin an older TensorFlow, and only the model files are needed). Nothing is fetched at run time.

- input ``input_2`` [batch, 43844, 1]: 2 s of mono audio at 22050 Hz, the window basic-pitch itself feeds;
- outputs ``note`` and ``onset`` [batch, 172, 88] (per-frame probabilities for each piano key) and ``contour``
  [batch, 172, 264] (pitch salience at a third of a semitone).

No music recordings ship in any package here, so the audio is synthetic and deterministic: per window one to
four notes at once (MIDI 36-96), each a harmonic series of eight partials with a random brightness, a short
attack and an exponential, piano-like decay, random onsets and lengths, some with vibrato, over low noise.

    .venv/bin/python examples/basic_pitch/data.py --wheel basic_pitch-0.4.0-py2.py3-none-any.whl --output OUT
    # OUT/nmp (the SavedModel), OUT/calibration.npz (100 windows), OUT/eval.npz (200 windows)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import zipfile
from pathlib import Path

import numpy as np

RATE = 22050
WINDOW = 43844
MODEL_DIR = "basic_pitch/saved_models/icassp_2022/nmp"
INPUT = "input_2"


def model_path(out: Path, wheel: Path | None) -> Path:
    """The SavedModel directory: the installed package's, else extracted from ``wheel`` into ``out/nmp``."""
    try:
        installed = Path(str(importlib.metadata.distribution("basic-pitch").locate_file(MODEL_DIR)))
        if (installed / "saved_model.pb").is_file():
            return installed
    except importlib.metadata.PackageNotFoundError:
        pass
    if wheel is None:
        raise SystemExit("basic-pitch is not installed: pass --wheel (pip download --no-deps basic-pitch==0.4.0)")
    target = out / "nmp"
    if target.exists():
        shutil.rmtree(target)
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member.startswith(MODEL_DIR + "/") and not member.endswith("/"):
                path = target / member[len(MODEL_DIR) + 1 :]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(archive.read(member))
    if not (target / "saved_model.pb").is_file():
        raise SystemExit(f"{wheel}: no {MODEL_DIR}/saved_model.pb in this wheel (basic-pitch 0.4.0 has it)")
    return target


def _note(rng: np.random.Generator, time: np.ndarray) -> np.ndarray:
    midi = rng.integers(36, 97)
    start = rng.uniform(-0.5, 1.8)
    length = rng.uniform(0.15, 1.5)
    frequency = 440.0 * 2.0 ** ((midi - 69) / 12)
    vibrato = rng.uniform(0, 0.004) * np.sin(2 * np.pi * rng.uniform(4, 7) * time) if rng.random() < 0.3 else 0.0
    # A frequency per sample (broadcast: a scalar vibrato of 0 must not collapse the phase to one value).
    phase = 2 * np.pi * frequency * np.cumsum(np.ones_like(time) + vibrato) / RATE
    brightness = rng.uniform(0.6, 1.6)
    tone = sum(np.sin(k * phase) / k**brightness for k in range(1, 9) if k * frequency < RATE / 2)
    since = time - start
    envelope = np.where(since < 0, 0.0, np.minimum(since / 0.01, 1.0) * np.exp(-since / rng.uniform(0.3, 1.2)))
    envelope = envelope * (since < length) + envelope * (since >= length) * np.exp(-(since - length) / 0.05)
    return rng.uniform(0.2, 0.8) * envelope * tone


def windows(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    time = np.arange(WINDOW) / RATE
    audio = np.empty((count, WINDOW, 1), np.float32)
    for index in range(count):
        mix = sum(_note(rng, time) for _ in range(rng.integers(1, 5)))
        mix = mix + rng.normal(0, 0.003, WINDOW)
        audio[index, :, 0] = mix / max(1.0, float(np.max(np.abs(mix))))
    return audio


def build(out: Path, wheel: Path | None = None, calibration: int = 100, evaluation: int = 200) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"model": model_path(out, wheel), "calibration": out / "calibration.npz", "eval": out / "eval.npz"}
    np.savez(paths["calibration"], **{INPUT: windows(calibration, seed=1)})
    np.savez(paths["eval"], **{INPUT: windows(evaluation, seed=2)})
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--wheel", type=Path, help="basic-pitch wheel (pip download --no-deps basic-pitch==0.4.0)")
    parser.add_argument("--calibration", type=int, default=100)
    parser.add_argument("--eval", type=int, default=200)
    args = parser.parse_args()
    for name, path in build(args.output, args.wheel, args.calibration, args.eval).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
