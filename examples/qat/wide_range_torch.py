#!/usr/bin/env python3
"""The PyTorch twin of ``wide_range.py``: a digits CNN, saved as a ``.pt2``, that post-training INT8 breaks and
quantization-aware training recovers, built in seconds.

The CNN of ``examples/digits/train_torch.py`` is trained, then its first conv's channel 0 (kernel and bias) is
scaled 1000x and the second conv's weights reading that channel scaled back: the float model computes the same
(relu(1000 z) = 1000 relu(z)), but a per-tensor INT8 scale for the first layer's output now spans channel 0's
range and flattens the other seven channels.

    .venv/bin/python examples/qat/wide_range_torch.py --output demo-out/qat-torch
    .venv/bin/edgeq qat demo-out/qat-torch/wide_range.pt2 --profile x86-avx2 --train demo-out/qat-torch/train.npz \\
          --eval demo-out/qat-torch/eval.npz --output demo-out/qat-torch/out
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from examples.digits.train import load_digits_split  # noqa: E402
from examples.digits.train_torch import train  # noqa: E402
from examples.qat.wide_range import main, write_split  # noqa: E402

SCALE = 1000.0


def build(output: Path, epochs: int = 60, seed: int = 0) -> dict[str, Path]:
    """Train and write ``wide_range.pt2``, ``train.npz`` (x, labels), ``calib.npz`` and ``eval.npz`` (NCHW)."""
    import torch

    info = train(output / "float", epochs=epochs, seed=seed)
    model = info["module"]
    with torch.no_grad():
        model[0].weight[0] *= SCALE
        model[0].bias[0] *= SCALE
        model[2].weight[:, 0] /= SCALE
    x_train, y_train, x_eval, y_eval = load_digits_split(seed)
    x_train, x_eval = x_train.transpose(0, 3, 1, 2).copy(), x_eval.transpose(0, 3, 1, 2).copy()  # NHWC -> NCHW
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.from_numpy(x_eval[:2]),), dynamic_shapes=({0: batch},))
    paths = write_split(output, "wide_range.pt2", x_train, y_train, x_eval, y_eval)
    torch.export.save(program, paths["model"])
    return paths


if __name__ == "__main__":
    main(build, "demo-out/qat-torch", __doc__)
