#!/usr/bin/env python3
"""Train a small PyTorch CNN on scikit-learn's bundled 8x8 digits in seconds and save it as ``digits.pt2``
(``torch.export.save``, batch dimension free) beside ``calib.npz`` and ``eval.npz`` (NCHW, key ``x``).

    .venv/bin/python examples/digits/train_torch.py --output demo-out/digits-torch
    .venv/bin/edgeq convert demo-out/digits-torch/digits.pt2 --profile x86-avx2 --format onnx --precision int8 \\
        --calibration demo-out/digits-torch/calib.npz --eval demo-out/digits-torch/eval.npz -o out
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

try:
    from examples.digits.train import load_digits_split
except ImportError:  # run as a script from the repository root
    from train import load_digits_split


def build_model(filters: int = 8):
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(1, filters, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(filters, filters * 2, 3, padding=1), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(filters * 2 * 4 * 4, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )


def train(output: Path, epochs: int = 40, filters: int = 8, calibration_samples: int = 300, seed: int = 0) -> dict:
    """Train full-batch with Adam, export, write the data; return paths, the module and held-out accuracy."""
    import torch

    torch.manual_seed(seed)
    x_train, y_train, x_eval, y_eval = load_digits_split(seed)
    x_train, x_eval = x_train.transpose(0, 3, 1, 2).copy(), x_eval.transpose(0, 3, 1, 2).copy()  # NHWC -> NCHW
    model = build_model(filters)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    inputs, targets = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(epochs):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_eval)).argmax(1).numpy() == y_eval).mean())
    output.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.from_numpy(x_eval[:2]),), dynamic_shapes=({0: batch},))
    torch.export.save(program, output / "digits.pt2")
    np.savez(output / "calib.npz", x=x_train[:calibration_samples])
    np.savez(output / "eval.npz", x=x_eval, labels=y_eval)
    return {"model": output / "digits.pt2", "calib": output / "calib.npz", "eval": output / "eval.npz",
            "module": model, "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("demo-out/digits-torch"))
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    info = train(args.output, epochs=args.epochs)
    print(f"trained digits CNN (PyTorch): held-out accuracy {info['accuracy']:.4f}; wrote {info['model']}")


if __name__ == "__main__":
    main()
