"""TFLite INT8 with named layers kept in float, through TensorFlow's ``QuantizationDebugger``: calibrate once,
then quantize with ``denylisted_nodes`` (op output tensor names). Also the per-layer loss that ranks which
layers to keep in float (``layer_losses``), from the same debugger's NumericVerify statistics.

``edgeq.convert.tflite`` builds through ``build_mixed`` when a request has float nodes; tune's sensitivity
shortlist calls ``layer_losses``. The I/O of such a model is float32: its first or last layer may be float.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from edgeq.convert.base import captured_stdout
from edgeq.errors import ConversionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerLoss:
    """One quantized op's output: its tensor name (what ``denylisted_nodes`` takes) and its loss."""

    tensor: str
    op: str
    rmse_over_scale: float  # RMSE of the op's quantized output against float, in quantization steps
    consumers: tuple[str, ...]  # the output names of the ops that read it: kept float too, it stays float


def _debugger(tf, converter, dataset: Callable, float_nodes: tuple[str, ...] = ()):
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = dataset
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(float_nodes) or None)
    with captured_stdout(log):  # the MLIR quantizer prints its settings to stdout
        return tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=dataset,
                                                         debug_options=options)


def _consumers(debugger) -> dict[str, tuple[str, ...]]:
    """Each op output tensor name of the calibrated model (the names ``denylisted_nodes`` accepts) -> the
    output names of the ops that read it. An op kept float still gets its input quantized by a quantized
    consumer, so keeping an activation in float means its producer and its consumers."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=debugger.calibrated_model)
    names = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()  # noqa: SLF001 - the only API that lists each op's tensors
    outputs = {i: names[i] for op in ops for i in op["outputs"] if i in names}
    readers: dict[str, list[str]] = {name: [] for name in outputs.values()}
    for op in ops:
        for i in op["inputs"]:
            if i in outputs:
                readers[outputs[i]] += [names[o] for o in op["outputs"] if o in names]
    return {name: tuple(dict.fromkeys(found)) for name, found in readers.items()}


def build_mixed(tf, converter, dataset: Callable, float_nodes: tuple[str, ...], source_path) -> bytes:
    """The flatbuffer of the model quantized to INT8 except the ops whose outputs are ``float_nodes``."""
    debugger = _debugger(tf, converter, dataset)
    missing = sorted(set(float_nodes) - set(_consumers(debugger)))
    if missing:
        raise ConversionError(f"{source_path}: no TFLite op output named {', '.join(repr(m) for m in missing[:5])} "
                              "to keep in float", hint="float nodes of a TFLite model are op output tensor names, "
                              "as edgeq tune's candidates list them")
    debugger.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(float_nodes))
    with captured_stdout(log):
        return debugger.get_nondebug_quantized_model()


def layer_losses(tf, converter, dataset: Callable) -> list[LayerLoss]:
    """Every quantized op's loss on ``dataset``, worst first: RMSE over scale, the ranking TensorFlow's
    quantization debugger guide uses (about 0.29, 1/sqrt(12), is the rounding error of a good layer)."""
    debugger = _debugger(tf, converter, dataset)
    consumers = _consumers(debugger)
    with captured_stdout(log):
        debugger.run()
        dump = io.StringIO()
        debugger.layer_statistics_dump(dump)
    losses = []
    for row in csv.DictReader(io.StringIO(dump.getvalue())):
        scale = float(row["scale"])
        rmse = math.sqrt(max(float(row["mean_squared_error"]), 0.0))
        losses.append(LayerLoss(row["tensor_name"], row["op_name"], rmse / scale if scale > 0 else math.inf,
                                consumers.get(row["tensor_name"], ())))
    losses.sort(key=lambda loss: -loss.rmse_over_scale)
    return losses
