"""ONNX dynamic quantization (int8 weights, activation scales computed per input): the method for
transformers and RNNs, whose activation ranges vary per input. ``edgeq.convert.onnx`` calls it for
``--precision dynamic``.

What it does differently from ``quantize_dynamic``'s defaults: the bodies of If/Loop nodes are quantized too
(weights held by Constant nodes included); Conv only in graphs without a recurrent op (``DYNAMIC_OP_TYPES``);
and per-channel weights. Measured on
all-MiniLM-L6-v2 (seq 32, AMX host, 2 threads; benchmarks/results/bench_minilm.txt has the table): per-tensor
weights give embedding cosine 0.966 against FP32, per-channel 0.993, at the same size (23 MB from 91; keeping
the embedding lookups float instead costs 36 MB for 0.0003 of cosine). Attention-shaped graphs go through ORT's
transformer optimizer first (LayerNorm, GELU and attention fusions where its patterns match). ``reduce_range``
follows the profile, as for static INT8 (x86 without VNNI).
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgeq.convert.base import captured_stdout
from edgeq.convert.onnx_files import onnx_graphs
from edgeq.convert.prequantized import onnx_quantized_ops
from edgeq.errors import ConversionError, first_line, require_backend

log = logging.getLogger(__name__)

# What ORT's dynamic quantization turns into integer ops. Conv only in graphs without a recurrent op: there,
# dynamic quantization is for the LSTM, and silero-vad's Convs (feeding its LSTM) lost accuracy and speed as
# ConvInteger (benchmarks/results/bench_silero_vad.txt: the "dynamic+conv" row).
DYNAMIC_OP_TYPES = ("MatMul", "Attention", "LSTM", "Gather", "EmbedLayerNormalization", "Transpose")
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})


def _attention_shaped(model) -> bool:
    """Softmax beside layer normalization (fused or as ReduceMean pieces): what the optimizer's fusions target."""
    ops = {node.op_type for node in model.graph.node}
    return "Softmax" in ops and bool(ops & {"LayerNormalization", "ReduceMean", "SkipLayerNormalization"})


def _transformer_optimized(prepared: Path, scratch: Path, options: dict[str, object]) -> Path:
    onnx = require_backend("onnx", "onnx")
    if not _attention_shaped(onnx.load(str(prepared), load_external_data=False)):
        return prepared
    optimizer = require_backend("onnxruntime.transformers.optimizer", "onnx")
    target = scratch / "transformer-optimized.onnx"
    try:
        with captured_stdout(log):
            # num_heads/hidden_size 0: read from the graph. opt_level 1: ORT's basic graph optimizations only,
            # so the model stays runnable by any ORT on a device.
            optimized = optimizer.optimize_model(str(prepared), model_type="bert", num_heads=0, hidden_size=0,
                                                 opt_level=1)
            optimized.save_model_to_file(str(target))
        fused = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
    except Exception as exc:  # noqa: BLE001 - the optimizer raises plain exceptions on graphs it cannot read
        log.info("%s: ORT's transformer optimizer failed (%s); quantizing without it", prepared, first_line(exc))
        options["transformer_optimizer"] = f"failed: {first_line(exc)}"
        return prepared
    options["transformer_optimizer"] = fused or "no fusion matched"
    return target if fused else prepared


def _constants_as_initializers(model) -> int:
    """Make each Constant node's tensor an initializer of its graph, subgraphs included, in place; how many.
    ORT quantizes only weights that are initializers, and an exporter may leave them as Constant nodes inside
    If branches, where ORT's pre-processing does not fold them."""
    onnx = require_backend("onnx", "onnx")
    moved = 0
    for graph in onnx_graphs(model.graph):
        constants = [node for node in graph.node if node.op_type == "Constant" and len(node.attribute) == 1
                     and node.attribute[0].name == "value" and len(node.output) == 1]
        for node in constants:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            # In place (see onnx_graphs): rebuilding graph.node would copy the If nodes, and the bodies edited
            # next would be the discarded originals'.
            graph.node.remove(node)
        moved += len(constants)
    return moved


def quantize_dynamic(prepared: Path, target: Path, scratch: Path, reduce_range: bool,
                     options: dict[str, object], where: Path) -> None:
    """Write the dynamically quantized model of ``prepared`` (pre-processed from the source ``where``); the
    settings and the quantized op counts go into ``options`` (for the manifest)."""
    onnx = require_backend("onnx", "onnx")
    quantization = require_backend("onnxruntime.quantization", "onnx")
    source = _transformer_optimized(prepared, scratch, options)
    model = onnx.load(str(source))
    moved = _constants_as_initializers(model)
    if moved:
        source = scratch / "constants-as-initializers.onnx"
        onnx.save(model, str(source))
        options["constants_as_initializers"] = moved
    options.update(per_channel=True, reduce_range=reduce_range, weight_type="int8")
    recurrent = any(node.op_type in RECURRENT_OPS for graph in onnx_graphs(model.graph) for node in graph.node)
    op_types = DYNAMIC_OP_TYPES if recurrent else (*DYNAMIC_OP_TYPES, "Conv")
    with captured_stdout(log):
        # EnableSubgraph: the bodies of If/Loop nodes too. silero-vad keeps every Conv and LSTM in If
        # branches (one per sample rate); without it nothing at all was quantized.
        quantization.quantize_dynamic(str(source), str(target), weight_type=quantization.QuantType.QInt8,
                                      per_channel=True, reduce_range=reduce_range,
                                      op_types_to_quantize=list(op_types), extra_options={"EnableSubgraph": True})
    quantized = onnx_quantized_ops(target)
    if not quantized:  # an artifact called dynamic INT8 that computes in float would be a lie
        raise ConversionError(f"{where}: onnx dynamic: no op was quantized (ORT quantizes {', '.join(op_types)} "
                              "whose weights are constants)",
                              hint="use --precision fp16, or int8 (static, with calibration data)")
    options.update(dynamic_op_types=list(op_types), quantized_ops=quantized)
