#!/usr/bin/env python3
"""A digits CNN that post-training INT8 breaks and quantization-aware training recovers, built in seconds.

The CNN is trained on scikit-learn's 8x8 digits, then the first conv layer's channel 0 (kernel and bias) is
scaled 1000x and the second conv's weights reading that channel scaled back: the float model computes the
same, but the first layer's per-tensor INT8 activation scale now spans channel 0's range and flattens the
other seven channels. QAT fine-tunes the other layers around that rounding.

    .venv/bin/python examples/qat/wide_range.py --output demo-out/qat
    .venv/bin/edgeq qat demo-out/qat/wide_range.keras --profile x86-avx2 --train demo-out/qat/train.npz \\
          --eval demo-out/qat/eval.npz --output demo-out/qat/out
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from examples.digits.train import load_digits_split  # noqa: E402

SCALE = 1000.0


def build(output: Path, epochs: int = 15, seed: int = 0) -> dict[str, Path]:
    """Train and write ``wide_range.keras``, ``train.npz`` (x, labels), ``calib.npz`` and ``eval.npz``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(seed)
    x_train, y_train, x_eval, y_eval = load_digits_split(seed)
    model = keras.Sequential([
        keras.Input((8, 8, 1), name="x"),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1"),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c2"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(10, name="fc"),
    ], name="wide_range_cnn")
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    k1, b1 = model.get_layer("c1").get_weights()
    k2, b2 = model.get_layer("c2").get_weights()
    k1[..., 0] *= SCALE
    b1[0] *= SCALE
    k2[:, :, 0, :] /= SCALE  # relu(SCALE * z) = SCALE * relu(z): the float model is unchanged
    model.get_layer("c1").set_weights([k1, b1])
    model.get_layer("c2").set_weights([k2, b2])
    paths = write_split(output, "wide_range.keras", x_train, y_train, x_eval, y_eval)
    model.save(paths["model"])
    return paths


def write_split(output: Path, model_file: str, x_train, y_train, x_eval, y_eval) -> dict[str, Path]:
    """Write ``train.npz`` (x, labels), ``calib.npz`` (300 training samples) and ``eval.npz`` into ``output``;
    their paths, and the model's (``output/model_file``, written by the caller)."""
    output.mkdir(parents=True, exist_ok=True)
    paths = {"model": output / model_file, "train": output / "train.npz", "calib": output / "calib.npz",
             "eval": output / "eval.npz"}
    np.savez(paths["train"], x=x_train, labels=y_train)
    np.savez(paths["calib"], x=x_train[:300])
    np.savez(paths["eval"], x=x_eval, labels=y_eval)
    return paths


def main(build=build, default_output: str = "demo-out/qat", doc: str | None = __doc__) -> None:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path(default_output))
    for name, path in build(parser.parse_args().output).items():
        print(f"{name:<6} {path}")


if __name__ == "__main__":
    main()
