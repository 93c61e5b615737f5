"""QAT of a PyTorch ``.pt2`` (torch.export) model with torchao's PT2E flow, written as a QDQ ONNX model.

Why this flow: a ``.pt2`` carries an exported ATen graph, not the model's ``nn.Module`` class. NNCF 3.4's PyTorch
QAT traces an eager module's function calls and finds nothing to quantize in an exported graph ("The model has
no operations to apply quantization"); its torch.fx backend is post-training only. torchao's
``prepare_qat_pt2e`` works on exactly that graph: it inserts fake-quantize modules (per-tensor u8 activations,
per-channel s8 weights, X86InductorQuantizer's QAT scheme), which are calibrated on the float model's ranges,
fine-tuned, and folded by ``convert_pt2e`` into quantize/dequantize ops with int8 weights. The dynamo ONNX
exporter writes those as QuantizeLinear/DequantizeLinear pairs: a pre-quantized ONNX model, which ``convert``
keeps as it is for ONNX and OpenVINO reads as FakeQuantize (``edgeq.convert.prequantized``).

On CPUs without VNNI (the profile's ``onnx_reduce_range``, or OpenVINO's overflow fix on every layer) the
weights are learned in 7 bits, as ORT's reduce_range and NNCF's overflow fix quantize them: the u8 x s8 pair sums
of AVX2's int8 kernels then cannot saturate. (torchao's own ``reduce_range`` narrows the activations instead,
which the ONNX exporter drops: QuantizeLinear has no quant_max, so the file would round to 8 bits.)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np

from edgeq.convert.source_torch import load_exported
from edgeq.errors import MissingBackendError, QatError
from edgeq.profiles import DeviceProfile

log = logging.getLogger(__name__)

SCHEME = "torchao pt2e X86InductorQuantizer (QAT): per-tensor u8 activations, per-channel symmetric s8 weights"
ONNX_OPSET = 18  # the dynamo exporter's lowest


def needs_7bit_weights(profile: DeviceProfile) -> bool:
    """Whether the device's int8 kernels saturate with 8-bit activations times 8-bit weights (no VNNI)."""
    return bool(profile.onnx_reduce_range) or profile.openvino_overflow_fix == "enable"


def pt2e_api():
    """torchao's PT2E entry points, with its import-time chatter (CUDA kernels it cannot load here) silenced."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
    except ImportError as exc:
        raise MissingBackendError(f"QAT of a PyTorch model needs torchao ({exc})",
                                  hint="pip install 'edgeq[torch]'") from None
    return (prepare_qat_pt2e, convert_pt2e, move_exported_model_to_train, move_exported_model_to_eval,
            X86InductorQuantizer, get_default_x86_inductor_quantization_config)


def check_program(model: Path) -> None:
    """Refuse (QatError) a program QAT cannot fine-tune as a classifier: one tensor input, one output."""
    _refuse_unless_classifier(model, *load_exported(model)[1:])


def _refuse_unless_classifier(model: Path, inputs, outputs) -> None:
    if len(inputs) != 1 or len(outputs) != 1:
        raise QatError(f"{model}: QAT fine-tunes a classifier with one input and one output (logits); this "
                       f"program has {len(inputs)} inputs and {len(outputs)} outputs")
    if inputs[0].dtype != "float32":
        raise QatError(f"{model}: QAT needs a float32 input; '{inputs[0].name}' is {inputs[0].dtype}")


def fine_tune_pt2(model: Path, train: dict[str, np.ndarray], input_name: str, onnx_path: Path,
                  profile: DeviceProfile, *, epochs: int, lr: float, batch_size: int, calibration_samples: int,
                  seed: int = 0) -> dict:
    """``model`` fine-tuned on ``train`` with fake quantization, written to ``onnx_path`` as QDQ ONNX; the
    training record (samples, per-epoch mean loss, seconds, scheme)."""
    import torch

    (prepare_qat_pt2e, convert_pt2e, to_train, to_eval, X86InductorQuantizer,
     quantization_config) = pt2e_api()
    program, inputs, outputs = load_exported(model)
    _refuse_unless_classifier(model, inputs, outputs)
    started = time.monotonic()
    torch.manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(train[input_name], dtype=np.float32))
    labels = torch.from_numpy(np.asarray(train["labels"]).astype(np.int64))
    seven_bit = needs_7bit_weights(profile)
    config = quantization_config(is_qat=True)
    if seven_bit:
        config = dataclasses.replace(config, weight=dataclasses.replace(config.weight, quant_min=-64, quant_max=63))
    quantizer = X86InductorQuantizer().set_global(config)
    try:
        prepared = prepare_qat_pt2e(program.module(), quantizer)
    except Exception as exc:  # noqa: BLE001 - torchao raises many types for a graph it cannot annotate
        raise QatError(f"{model}: torchao cannot prepare this program for QAT ({_first_line(exc)})") from exc
    try:
        losses = _train(prepared, x, labels, to_train, to_eval, epochs=epochs, lr=lr, batch_size=batch_size,
                        calibration_samples=calibration_samples, seed=seed)
    except (RuntimeError, IndexError, ValueError) as exc:  # a shape or label the model cannot take
        raise QatError(f"{model}: training on '{input_name}' failed ({_first_line(exc)})",
                       hint="the train file's input must have the program's shape after the sample axis, and "
                            "its labels must be class ids below the number of outputs") from exc
    converted = convert_pt2e(prepared)  # int8 weights folded in; activations as quantize/dequantize pairs
    _export_onnx(model, converted, inputs[0], outputs[0], x[:2], onnx_path)
    return {"samples": len(x), "epochs": epochs, "loss": losses, "seconds": time.monotonic() - started,
            "lr": lr, "batch_size": batch_size, "calibration_samples": min(calibration_samples, len(x)),
            "scheme": SCHEME, "weight_bits": 7 if seven_bit else 8, "framework": "pytorch"}


def _train(prepared, x, labels, to_train, to_eval, *, epochs: int, lr: float, batch_size: int,
           calibration_samples: int, seed: int) -> list[float]:
    """Calibrate the fake quantizers on the float model's ranges, then fine-tune with Adam; per-epoch mean loss."""
    import torch

    # Start from the float model's ranges rather than the fake quantizers' initial ones: without it the first
    # steps train against ranges that have seen one batch (the Keras path measured 90.4% against 94.9% top-1).
    to_eval(prepared)
    with torch.no_grad():
        for start in range(0, min(calibration_samples, len(x)), batch_size):
            prepared(x[start:min(start + batch_size, calibration_samples)])
    to_train(prepared)
    optimizer = torch.optim.Adam(prepared.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        total, batches = 0.0, 0
        for index in torch.randperm(len(x), generator=order).split(batch_size):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(prepared(x[index]), labels[index])
            loss.backward()
            optimizer.step()
            total, batches = total + float(loss.detach()), batches + 1
        losses.append(total / batches)
    to_eval(prepared)
    return losses


def _export_onnx(model: Path, converted, spec, output_name: str, example, onnx_path: Path) -> None:
    """The converted graph as QDQ ONNX, under the program's own input and output names (as PTQ of it is), with
    the program's free dims left free. ``example`` is two real samples: a dim of 1 would be specialised."""
    import torch

    free = {i: torch.export.Dim.AUTO for i, d in enumerate(spec.shape) if d is None}
    try:
        exported = torch.export.export(converted, (example,), dynamic_shapes=(free or None,))
        program = torch.onnx.export(exported, (example,), dynamo=True, opset_version=ONNX_OPSET,
                                    input_names=[spec.name], output_names=[output_name], verbose=False)
    except Exception as exc:  # noqa: BLE001 - the exporters raise many types
        raise QatError(f"{model}: the fine-tuned program does not export to QDQ ONNX ({_first_line(exc)})") from exc
    import onnx

    proto = program.model_proto
    for node in proto.graph.node:  # the exporter's per-node PyTorch stack traces: half the file, no use on a device
        del node.metadata_props[:]
    dropped = drop_relu_before_quantize(proto)
    log.debug("QAT ONNX: %d Relu folded into the QuantizeLinear after it", dropped)
    onnx.save(proto, str(onnx_path))


def drop_relu_before_quantize(model) -> int:
    """Remove each Relu whose only reader is a QuantizeLinear with a uint8 zero point of 0 (the count removed).

    Exact: such a QuantizeLinear already clamps every negative input to 0. It matters for speed: the PT2E graph
    puts the activation's quantizer after the Relu (Conv -> Relu -> Q), a pattern ONNX Runtime does not fuse,
    so every Conv and Gemm ran in float on dequantized weights; DQ -> Conv -> Q becomes QLinearConv.
    """
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    dropped = []
    for node in graph.node:
        after = readers.get(node.output[0], []) if node.op_type == "Relu" else []
        if len(after) != 1 or after[0].op_type != "QuantizeLinear" or node.output[0] in outputs:
            continue
        quantize = after[0]
        zero = constants.get(quantize.input[2]) if len(quantize.input) > 2 else None
        if zero is None or zero.data_type != TensorProto.UINT8 or numpy_helper.to_array(zero).any():
            continue
        quantize.input[0] = node.input[0]
        dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    return len(dropped)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
