"""Input shapes an artifact is built for: ``--input-shape name=1x3x640x640`` freezes a model's free
dimensions, and OpenVINO artifacts get a free batch dimension frozen to 1 by default.

Why: OpenVINO compiles a model with static shapes to faster kernels than one with a free dimension
(MobileNetV2 INT8, batch 1: 1.145x slower with a free batch, benchmarks/results/bench_static_shapes.txt),
and ORT's quantization tools need known shapes. A frozen dimension is recorded in the manifest
(``options.input_shapes``); data fed to the artifact must have those shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from edgeq.data import InputSpec
from edgeq.errors import ConversionError

# What a shape looks like on the command line: 1x3x640x640.
_SHAPE = re.compile(r"^[1-9][0-9]*(x[1-9][0-9]*)*$")


def parse_input_shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    """``name=1x3x640x640`` -> ("name", (1, 3, 640, 640)); ``1x3x640x640`` -> (None, ...) for a model with
    one input."""
    name, _, shape = text.rpartition("=")
    shape = shape.strip().lower()
    if not _SHAPE.match(shape):
        raise ConversionError(f"--input-shape {text!r}: expected NAME=DxDx... with positive integer dims, "
                              "e.g. images=1x3x640x640")
    return (name.strip() or None), tuple(int(d) for d in shape.split("x"))


def resolve_input_shapes(inputs: Sequence[InputSpec], requested: Mapping[str | None, Sequence[int]],
                         freeze_batch: bool, where: str) -> tuple[dict[str, list[int]], str | None]:
    """The shape to build each input with ({} when every input keeps its own), and where it came from.

    ``requested`` (name -> dims; None names the only input) must fill only the source's free dimensions;
    with ``freeze_batch``, an input whose only free dimension is the first (the batch) gets 1 there.
    """
    by_name = {spec.name: spec for spec in inputs}
    shapes: dict[str, list[int]] = {}
    for name, dims in requested.items():
        if name is None:
            if len(inputs) != 1:
                raise ConversionError(f"{where}: --input-shape without a name, but the model has {len(inputs)} "
                                      f"inputs ({', '.join(by_name)})", hint="give NAME=DxDx... per input")
            name = inputs[0].name
        spec = by_name.get(name)
        if spec is None:
            raise ConversionError(f"{where}: --input-shape names '{name}', which is not an input of the model "
                                  f"(its inputs: {', '.join(by_name)})")
        if len(dims) != len(spec.shape):
            raise ConversionError(f"{where}: --input-shape {name}: {len(dims)} dims given, the input has "
                                  f"{len(spec.shape)} ({_show(spec.shape)})")
        fixed = [(i, own, want) for i, (own, want) in enumerate(zip(spec.shape, dims, strict=True))
                 if own is not None and own != want]
        if fixed:
            i, own, want = fixed[0]
            raise ConversionError(f"{where}: --input-shape {name}: dim {i} is fixed at {own} in the model, "
                                  f"not {want} ({_show(spec.shape)})", hint="only free dims (?) can be set")
        if spec.shape and spec.shape[0] is None and dims[0] != 1:
            raise ConversionError(f"{where}: --input-shape {name}: the batch (dim 0) must be 1, not {dims[0]}: "
                                  "edgeq validates and benches one sample at a time")
        shapes[name] = [int(d) for d in dims]
    if shapes:
        return shapes, "--input-shape"
    if freeze_batch:
        batch_only = {s.name: [1, *s.shape[1:]] for s in inputs
                      if s.shape and s.shape[0] is None and all(d is not None for d in s.shape[1:])}
        if batch_only:
            return batch_only, "free batch frozen to 1 (static shapes run faster; --input-shape sets another)"
    return {}, None


def frozen_inputs(inputs: Sequence[InputSpec], shapes: Mapping[str, Sequence[int]]) -> list[InputSpec]:
    """``inputs`` as the artifact takes them, for checking data against: frozen dims filled in (the batch
    stays free: data files hold many samples)."""
    return [InputSpec(s.name, [None, *shapes[s.name][1:]] if s.name in shapes else s.shape, s.dtype) for s in inputs]


def _show(shape: Sequence[int | None]) -> str:
    return "x".join("?" if d is None else str(d) for d in shape)
