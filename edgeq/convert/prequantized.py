"""Models that arrive already quantized (quantization-aware training, or a quantizer run elsewhere).

An ONNX model with QuantizeLinear/DequantizeLinear pairs (QDQ) or quantized operators (QLinearConv,
MatMulInteger, ...), or a SavedModel with FakeQuant ops (a QAT model: ``edgeq qat`` writes one), carries
scales it learned or was calibrated with. Calibrating and quantizing it again would throw them away, so
``--precision int8`` keeps them: the ONNX artifact is the model itself (input shapes frozen where asked; from
a SavedModel, tf2onnx turns FakeQuant into QDQ), the OpenVINO artifact is the model converted as it is (QDQ
and FakeQuant become FakeQuantize), TFLite is full INT8 from the FakeQuant ranges with no representative
dataset, and the manifest records ``options.quantization: from source``. No calibration is needed.
fp32, fp16 and dynamic are refused: each would either quantize the model again or call int8 work float.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from edgeq.convert.onnx_files import onnx_graphs, read_onnx
from edgeq.errors import ConversionError, require_backend

log = logging.getLogger(__name__)

#: ONNX operators that only a quantized model contains (the standard domain and ORT's com.microsoft one).
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "MatMulInteger", "ConvInteger", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QLinearSoftmax", "QGemm",
    "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QOrderedMatMul", "DynamicQuantizeLSTM",
})

#: TensorFlow ops that simulate quantization in a float graph (tfmot's QAT layers save these).
FAKE_QUANT_OPS = frozenset({
    "FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxVarsPerChannel", "FakeQuantWithMinMaxArgs",
    "QuantizeAndDequantizeV2", "QuantizeAndDequantizeV3", "QuantizeAndDequantizeV4",
})

FROM_SOURCE = "from source"

#: The formats each kind of pre-quantized source becomes at int8 (keeping its scales).
KEPT_BY = {"onnx": ("onnx", "openvino"), "savedmodel": ("tflite", "onnx", "openvino")}


def quantized_ops(path: Path, kind: str) -> dict[str, int]:
    """The quantization ops a source model already carries ({} for a float model, and for other kinds)."""
    if kind == "onnx":
        return onnx_quantized_ops(path)
    if kind == "savedmodel":
        return savedmodel_fake_quant_ops(path)
    return {}


def savedmodel_fake_quant_ops(path: Path) -> dict[str, int]:
    """FakeQuant op counts in a SavedModel's graphs and functions, read from ``saved_model.pb`` as data."""
    if not (path / "saved_model.pb").is_file():
        return {}
    require_backend("tensorflow", "tflite")
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString((path / "saved_model.pb").read_bytes())
    except Exception as exc:  # DecodeError: let the loader report the unreadable file
        log.debug("%s: saved_model.pb not parsed for FakeQuant ops: %s", path, exc)
        return {}
    counts: Counter[str] = Counter()
    for meta in saved.meta_graphs:
        nodes = list(meta.graph_def.node) + [n for f in meta.graph_def.library.function for n in f.node_def]
        counts.update(node.op for node in nodes if node.op in FAKE_QUANT_OPS)
    return dict(sorted(counts.items()))


def onnx_quantized_ops(path: Path) -> dict[str, int]:
    """Quantized operator counts in the ONNX model at ``path`` (subgraphs included); {} for a float model."""
    onnx = require_backend("onnx", "onnx")
    model = read_onnx(onnx, path)
    counts = Counter(node.op_type for graph in onnx_graphs(model.graph) for node in graph.node
                     if node.op_type in QUANTIZED_OPS)
    return dict(sorted(counts.items()))


def describe(ops: dict[str, int]) -> str:
    return ", ".join(f"{count} {op}" for op, count in ops.items())


def check_prequantized_request(path: Path, kind: str, ops: dict[str, int], fmt: str, precision: str,
                               calibration: Path | None, float_nodes, tunables: dict) -> None:
    """Refuse what a pre-quantized model cannot become, before any work; warn about calibration given."""
    if precision != "int8":
        raise ConversionError(
            f"{path}: the model is already quantized ({describe(ops)}); "
            + ("dynamic would quantize it a second time" if precision == "dynamic"
               else f"an {precision} artifact of it would still compute its int8 ops"),
            hint="use --precision int8: the model's own scales are kept, no calibration needed")
    if fmt not in KEPT_BY[kind]:
        raise ConversionError(f"{path}: a pre-quantized {kind} model becomes {' or '.join(KEPT_BY[kind])}, not {fmt}",
                              hint=f"use --format {' or --format '.join(KEPT_BY[kind])}")
    asked = [name for name, value in tunables.items() if value is not None] + (["float_nodes"] if float_nodes else [])
    if asked:
        raise ConversionError(f"{path}: the model is already quantized; {', '.join(asked)} would re-quantize it",
                              hint="its scales are kept as they are; quantize the float model to choose them")
    if calibration is not None:
        log.warning("%s is already quantized: its own scales are kept; ignoring %s", path, calibration)
