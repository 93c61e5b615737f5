"""ONNX dynamic quantization (int8 weights, activation scales computed per input): the method for
transformers and RNNs, whose activation ranges vary per input. ``edgeq.convert.onnx`` calls it for
``--precision dynamic``.

What it does differently from ``quantize_dynamic``'s defaults: per-channel weights. Measured on
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
from edgeq.errors import first_line, require_backend

log = logging.getLogger(__name__)


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


def quantize_dynamic(prepared: Path, target: Path, scratch: Path, reduce_range: bool,
                     options: dict[str, object]) -> None:
    """Write the dynamically quantized model; the settings go into ``options`` (for the manifest)."""
    quantization = require_backend("onnxruntime.quantization", "onnx")
    source = _transformer_optimized(prepared, scratch, options)
    options.update(per_channel=True, reduce_range=reduce_range, weight_type="int8")
    with captured_stdout(log):  # every op type ORT quantizes dynamically: MatMul, Attention, LSTM, Gather...
        quantization.quantize_dynamic(str(source), str(target), weight_type=quantization.QuantType.QInt8,
                                      per_channel=True, reduce_range=reduce_range)
