#!/usr/bin/env python3
"""Silero VAD (voice activity, a Conv + LSTM model with a state input), offline: eval and calibration data for
edgeq in the form the model takes it, one 32 ms window per sample.

The ONNX model ships in the PyPI package ``silero-vad`` (``silero_vad/data/silero_vad.onnx``). Its inputs:

- ``input`` [batch, 576]: 512 new samples at 16 kHz after the 64 last samples of the window before
  (silero-vad's own ``OnnxWrapper`` prepends them);
- ``state`` [2, batch, 128]: the LSTM's state from the window before. Its batch is its second axis, so each
  sample's state is given whole: the array is [samples, 2, 1, 128] (see ``edgeq.device.feeds``);
- ``sr`` (a scalar): the sample rate, 16000, also given per sample ([samples]).

No speech recordings ship in any package here, so the audio is synthetic and deterministic: voiced segments (a
harmonic series with a gliding pitch, two formant-like resonances and syllable-rate amplitude), unvoiced
noise bursts and near-silence, mixed at several levels. The state of each window is the one the FP32 model
reached on the windows before it, so every sample is the model's real situation one step into a stream; a
quantized model is scored one step at a time and its error does not feed the next window's state.

    .venv/bin/python examples/silero_vad/data.py --output demo-out/silero   # eval.npz, calibration.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

RATE = 16000
WINDOW = 512
CONTEXT = 64  # samples of the window before, prepended (silero-vad 5's OnnxWrapper at 16 kHz)


def model_path() -> Path:
    """The ONNX model inside the installed ``silero-vad`` wheel."""
    import importlib.resources

    return Path(str(importlib.resources.files("silero_vad") / "data" / "silero_vad.onnx"))


def _resonate(signal: np.ndarray, centre_hz: float, bandwidth_hz: float) -> np.ndarray:
    """A two-pole resonator (a formant's shape), as a direct-form recursion."""
    radius = np.exp(-np.pi * bandwidth_hz / RATE)
    a1, a2 = -2 * radius * np.cos(2 * np.pi * centre_hz / RATE), radius * radius
    out = np.zeros_like(signal)
    for i in range(len(signal)):
        out[i] = signal[i] - a1 * out[i - 1] - a2 * out[i - 2] if i >= 2 else signal[i]
    return out * (1 - radius)


def synthetic_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-like audio in [-1, 1]: alternating voiced, unvoiced and quiet segments (deterministic)."""
    rng = np.random.default_rng(seed)
    pieces = []
    total = int(seconds * RATE)
    while sum(len(p) for p in pieces) < total:
        kind = rng.choice(["voiced", "voiced", "unvoiced", "quiet"])
        length = int(rng.uniform(0.2, 0.9) * RATE)
        t = np.arange(length) / RATE
        if kind == "voiced":
            f0 = rng.uniform(90, 230) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t))
            phase = 2 * np.pi * np.cumsum(f0) / RATE
            source = sum(np.sin(k * phase) / k for k in range(1, 25))
            voiced = _resonate(source, rng.uniform(400, 900), 120) + _resonate(source, rng.uniform(1000, 2400), 200)
            syllables = 0.5 * (1 - np.cos(2 * np.pi * rng.uniform(3, 6) * t))
            piece = voiced * syllables
        elif kind == "unvoiced":
            piece = _resonate(rng.standard_normal(length), rng.uniform(2500, 5000), 1500) * \
                np.hanning(length)
        else:
            piece = 0.002 * rng.standard_normal(length)
        peak = float(np.max(np.abs(piece))) or 1.0
        pieces.append(piece / peak * (rng.uniform(0.05, 0.6) if kind != "quiet" else 1.0))
    audio = np.concatenate(pieces)[:total] + 0.001 * rng.standard_normal(total)
    return np.clip(audio, -1, 1).astype(np.float32)


def stream_samples(audio: np.ndarray, session) -> dict[str, np.ndarray]:
    """Each 512-sample window with its 64 samples of context and the FP32 state reached before it, and the
    FP32 speech probability (for reading the example's output; edgeq computes its own reference)."""
    windows = len(audio) // WINDOW
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros(CONTEXT, np.float32)
    inputs, states, probabilities = [], [], []
    for index in range(windows):
        chunk = audio[index * WINDOW:(index + 1) * WINDOW]
        window = np.concatenate([context, chunk])[None, :]
        inputs.append(window[0])
        states.append(state)
        probability, state = session.run(None, {"input": window, "state": state, "sr": np.array(RATE, np.int64)})
        probabilities.append(float(probability.reshape(-1)[0]))
        context = chunk[-CONTEXT:]
    count = len(inputs)
    return {"input": np.stack(inputs), "state": np.stack(states), "sr": np.full(count, RATE, np.int64),
            "speech_probability": np.asarray(probabilities, np.float32)}


def write(output: Path, eval_seconds: float = 12.0, calibration_seconds: float = 12.0) -> dict[str, Path]:
    """``eval.npz`` and ``calibration.npz`` (different audio) in ``output``; returns their paths."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path()), providers=["CPUExecutionProvider"])
    output.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, seconds, seed in (("eval", eval_seconds, 1), ("calibration", calibration_seconds, 2)):
        arrays = stream_samples(synthetic_audio(seconds, seed), session)
        probabilities = arrays.pop("speech_probability")
        paths[name] = output / f"{name}.npz"
        np.savez(paths[name], **arrays)
        speech = float(np.mean(probabilities > 0.5))
        print(f"{paths[name]}: {len(probabilities)} windows, fp32 speech probability > 0.5 in {speech:.0%}")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=12.0, help="Audio per file (375 windows per 12 s).")
    args = parser.parse_args()
    write(args.output, args.seconds, args.seconds)


if __name__ == "__main__":
    main()
