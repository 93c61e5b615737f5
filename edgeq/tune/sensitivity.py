"""Which layers of a full-INT8 model lose the most to quantization: the shortlist mixed precision starts
from (then measured one by one, leave-one-out, by the search). ONNX below; TFLite in ``tflite_shortlist``.

ORT's ``qdq_loss_debug`` records, for every quantized activation, the tensor before its
QuantizeLinear and after its DequantizeLinear on a few calibration samples. Each is scored by its worst
channel's signal-to-quantization-noise ratio: a whole-tensor SQNR hides the case that breaks INT8 most
often, one channel whose range is orders of magnitude above the others, which per-tensor activation
scales flatten to zero in all the rest.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.convert.base import captured_stdout
from edgeq.convert.onnx_int8 import WEIGHTED_OP_TYPES
from edgeq.data import Dataset
from edgeq.errors import require_backend

log = logging.getLogger(__name__)

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


@dataclass(frozen=True)
class SensitiveTensor:
    """One quantized activation, how much it loses and the nodes that keep it float."""

    tensor: str
    loss: float  # ONNX: worst-channel SQNR in dB (lower is worse); TFLite: RMSE / scale (higher is worse)
    nodes: tuple[str, ...]  # its producer and consumers (excluding both leaves the tensor in float)


def _sqnr_db(signal: np.ndarray, noise: np.ndarray) -> float:
    noise_power = float(np.sum(noise.astype(np.float64) ** 2))
    signal_power = float(np.sum(signal.astype(np.float64) ** 2))
    if noise_power == 0:
        return math.inf
    if signal_power == 0:
        return -math.inf
    return 10 * math.log10(signal_power / noise_power)


def worst_channel_sqnr(before: np.ndarray, after: np.ndarray) -> float:
    """The lowest per-channel SQNR over axis 1 (NCHW, and [N, features]) and the last axis (NHWC)."""
    if before.ndim < 2:
        return _sqnr_db(before, after - before)
    worst = math.inf
    for axis in {1, before.ndim - 1}:
        moved_b, moved_a = np.moveaxis(before, axis, 0), np.moveaxis(after, axis, 0)
        for channel in range(moved_b.shape[0]):
            worst = min(worst, _sqnr_db(moved_b[channel], moved_a[channel] - moved_b[channel]))
    return worst


def _node_groups(model) -> dict[str, tuple[str, ...]]:
    """Quantized activation tensor -> the named compute nodes that produce and consume it."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    groups = {}
    for quant in (n for n in graph.node if n.op_type == "QuantizeLinear"):
        tensor = quant.input[0]
        producer = producers.get(tensor)
        if producer is not None and producer.op_type in QDQ_OPS:
            continue  # a weight's or an already-quantized tensor's pair
        names = [producer.name] if producer is not None and producer.name else []
        for dq in consumers.get(quant.output[0], []):
            if dq.op_type != "DequantizeLinear":
                continue
            names += [c.name for c in consumers.get(dq.output[0], []) if c.name and c.op_type not in QDQ_OPS]
        if names:
            groups[tensor] = tuple(dict.fromkeys(names))
    return groups


@dataclass(frozen=True)
class Shortlist:
    tensors: list[SensitiveTensor]  # worst first
    quantized_nodes: frozenset[str]  # every compute node with a quantized activation: all of them float is fp32
    ranked_by: str = "worst-channel SQNR"  # or why there is no ranking (then: weighted layers in graph order)
    ranked: bool = True


def _weighted_groups(model, groups: dict[str, tuple[str, ...]]) -> list[tuple[str, tuple[str, ...]]]:
    """The groups whose tensor feeds a weighted layer, in graph order."""
    weighted = {n.name for n in model.graph.node if n.op_type in WEIGHTED_OP_TYPES}
    return [(tensor, nodes) for tensor, nodes in groups.items() if weighted & set(nodes)]


def shortlist(qdq_model_path: Path, calibration: Dataset, *, samples: int = 32, limit: int = 8) -> Shortlist:
    """The ``limit`` activations of the QDQ model at ``qdq_model_path`` that lose the most, worst first."""
    onnx = require_backend("onnx", "onnx")
    quantization = require_backend("onnxruntime.quantization", "onnx")
    ort = require_backend("onnxruntime", "onnx")
    from onnxruntime.quantization import qdq_loss_debug

    groups = _node_groups(onnx.load(str(qdq_model_path)))
    every = frozenset(n for nodes in groups.values() for n in nodes)
    if not groups:
        return Shortlist([], every)
    count = min(samples, calibration.samples)

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self._index = iter(range(count))

        def get_next(self):
            i = next(self._index, None)
            return None if i is None else calibration.batch(i)

    try:
        with tempfile.TemporaryDirectory(prefix="edgeq-sensitivity-") as tmp:
            augmented = Path(tmp) / "augmented.onnx"
            with captured_stdout(log):
                qdq_loss_debug.modify_model_output_intermediate_tensors(str(qdq_model_path), str(augmented))
                quiet = ort.SessionOptions()
                quiet.log_severity_level = 4  # a failure is reported below, once, not as ORT's log line too
                activations = qdq_loss_debug.collect_activations(str(augmented), Reader(), session_options=quiet,
                                                                 execution_providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT fails on some graphs (per-axis DQ of reshaped weights)
        # No ranking: the leave-one-out that follows measures every candidate anyway, so fall back to the
        # layers that carry weights, in graph order, which is where INT8 loses accuracy most often.
        reason = str(exc).splitlines()[0][:160]
        log.info("%s: qdq_loss_debug failed (%s); shortlisting weighted layers unranked", qdq_model_path, reason)
        weighted = _weighted_groups(onnx.load(str(qdq_model_path)), groups)
        return Shortlist([SensitiveTensor(t, math.nan, nodes) for t, nodes in weighted[:limit]], every,
                         ranked_by=f"none (ORT's qdq_loss_debug failed: {reason})", ranked=False)
    matched = qdq_loss_debug.create_activation_matching(activations)
    found = []
    for tensor, pair in matched.items():
        if tensor not in groups or "pre_qdq" not in pair or "post_qdq" not in pair:
            continue
        before, after = np.concatenate(pair["pre_qdq"]), np.concatenate(pair["post_qdq"])
        found.append(SensitiveTensor(tensor, worst_channel_sqnr(before, after), groups[tensor]))
    found.sort(key=lambda t: t.loss)
    return Shortlist(found[:limit], every)


def onnx_shortlist(full_int8_dir: Path, source, calibration: Dataset, input_shapes: dict) -> Shortlist:
    return shortlist(full_int8_dir / "model.onnx", calibration)


def tflite_shortlist(full_int8_dir: Path, source, calibration: Dataset, input_shapes: dict, *, samples: int = 32,
                     limit: int = 8) -> Shortlist:
    """The ``limit`` TFLite ops whose INT8 output loses most (RMSE over scale, TensorFlow's quantization
    debugger on ``samples`` calibration samples), worst first; each is kept float with the ops that read it,
    by their output tensor names."""
    from edgeq.convert.tflite import converter_for, representative_dataset
    from edgeq.convert.tflite_mixed import layer_losses

    tf = require_backend("tensorflow", "tflite")
    subset = calibration.head(samples)
    with tempfile.TemporaryDirectory(prefix="edgeq-sensitivity-") as tmp:
        converter = converter_for(tf, source, Path(tmp), input_shapes)
        losses = layer_losses(tf, converter, representative_dataset(subset, [s.name for s in source.inputs]))
    return Shortlist([SensitiveTensor(loss.tensor, loss.rmse_over_scale, (loss.tensor, *loss.consumers))
                      for loss in losses[:limit]],
                     frozenset(loss.tensor for loss in losses), ranked_by="RMSE / scale (TFLite QuantizationDebugger)")
