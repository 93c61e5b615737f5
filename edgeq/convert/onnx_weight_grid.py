"""Int8 weights back from a QAT graph whose weight fake-quantizers were folded into float constants.

tf2onnx constant-folds tfmot's weight FakeQuant (``LastValueQuant``): the ONNX model keeps the fake-quantized
float weights with no DequantizeLinear, while the activations keep their QDQ pairs. ONNX Runtime then quantizes
those float weights itself to fuse DQ -> Conv -> Q into QLinearConv, with a scale of its own choosing, not the
one the model was trained with. Measured on the wide-range digits CNN (examples/qat/wide_range.py, AVX2): top-1
88.0% with ORT's fusions, 93.3% with them off.

The folded values still lie on their quantizer's grid: tfmot's weights are symmetric with a narrow range, so
channel c's values are integers times ``max|w_c| / 127``. Where a weight lies on that grid (per output channel,
else per tensor), it is written back as int8 with a DequantizeLinear of that scale, which is exact; any other
weight is left as it is.
"""

from __future__ import annotations

import numpy as np

LEVELS = 127  # symmetric, narrow range: -127..127
ON_GRID = 1e-3  # largest distance from an integer, in steps, that still counts as on the grid


def _grid_scale(weight: np.ndarray, axis: int | None) -> np.ndarray | None:
    """The scale (per ``axis``, or one) whose integer multiples are exactly ``weight``, or None."""
    peak = np.abs(weight).max() if axis is None else \
        np.abs(np.moveaxis(weight, axis, 0)).reshape(weight.shape[axis], -1).max(axis=1)
    if np.any(peak == 0):
        return None
    scale = (peak / LEVELS).astype(np.float32)
    steps = weight / scale.reshape(_along(weight.ndim, axis))
    return scale if np.abs(steps - np.round(steps)).max() < ON_GRID else None


def _along(ndim: int, axis: int | None) -> list[int]:
    """The shape that broadcasts a per-``axis`` scale (or a single one) against a weight of ``ndim`` dims."""
    return [-1 if i == axis else 1 for i in range(ndim)]


def _weight_axis(node) -> int | None:
    """The output-channel axis of ``node``'s weight (input 1), or None for an op this pass leaves alone."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "MatMul":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return None


def restore_weight_quantizers(model) -> int:
    """Rewrite, in place, each float weight on its int8 grid that feeds a Conv/MatMul/Gemm as int8 +
    DequantizeLinear; the number of weights rewritten. (For a QDQ graph: its activations are quantized, and ORT
    carries their QDQ through Reshape and Transpose to reach the weight's op.)"""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    rewritten = []
    for node in graph.node:
        axis = _weight_axis(node)
        if axis is None or len(node.input) < 2 or node.input[1] not in initializers or readers[node.input[1]] != 1:
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if weight.dtype != np.float32 or weight.ndim < 2:
            continue
        scale = _grid_scale(weight, axis)
        if scale is None and (scale := _grid_scale(weight, None)) is not None:
            axis = None
        if scale is None:
            continue
        name = node.input[1]
        quantized = np.round(weight / scale.reshape(_along(weight.ndim, axis))).astype(np.int8)
        graph.initializer.remove(initializers[name])
        graph.initializer.extend([numpy_helper.from_array(quantized, f"{name}_int8"),
                                  numpy_helper.from_array(np.atleast_1d(scale) if axis is not None else scale.reshape(()),
                                                          f"{name}_scale"),
                                  numpy_helper.from_array(np.zeros(scale.shape if axis is not None else (), np.int8),
                                                          f"{name}_zero")])
        dequantize = helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero"],
                                      [f"{name}_dequantized"], name=f"{name}_DequantizeLinear",
                                      **({"axis": axis} if axis is not None else {}))
        rewritten.append((node, dequantize))
    for node, dequantize in rewritten:
        node.input[1] = dequantize.output[0]
        graph.node.insert(list(graph.node).index(node), dequantize)
    return len(rewritten)
