#!/usr/bin/env python3
"""Train a small Keras CNN on scikit-learn's bundled 8x8 digits in seconds.

Writes ``digits.keras``, ``calib.npz`` (300 training samples, key ``x``) and
``eval.npz`` (held-out ``x`` and ``labels``) into the output directory. No
download: the data ships inside scikit-learn.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def load_digits_split(seed: int = 0):
    """(x_train, y_train, x_eval, y_eval) with x as float32 NHWC in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(len(x) * 0.75)
    return x[:split], y[:split], x[split:], y[split:]


def build_model(filters: int = 16):
    import keras

    return keras.Sequential(
        [
            keras.Input((8, 8, 1), name="x"),
            keras.layers.Conv2D(filters, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(filters * 2, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ],
        name="digits_cnn",
    )


def train(output: Path, epochs: int = 15, filters: int = 16, calibration_samples: int = 300, seed: int = 0) -> dict:
    """Train, save model and data files into ``output``; return paths and held-out accuracy."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(seed)
    x_train, y_train, x_eval, y_eval = load_digits_split(seed)
    model = build_model(filters)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    _, accuracy = model.evaluate(x_eval, y_eval, verbose=0)
    output.mkdir(parents=True, exist_ok=True)
    model_path = output / "digits.keras"
    model.save(model_path)
    np.savez(output / "calib.npz", x=x_train[:calibration_samples])
    np.savez(output / "eval.npz", x=x_eval, labels=y_eval)
    return {"model": model_path, "calib": output / "calib.npz", "eval": output / "eval.npz",
            "accuracy": float(accuracy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("demo-out/digits"))
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    info = train(args.output, epochs=args.epochs)
    print(f"trained digits CNN: held-out accuracy {info['accuracy']:.4f}; wrote {info['model']}, "
          f"{info['calib']}, {info['eval']}")


if __name__ == "__main__":
    main()
