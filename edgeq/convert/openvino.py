"""OpenVINO IR backend: fp32, fp16 (compressed weights), int8 through NNCF post-training quantization
(optionally with accuracy control: the layers that lose most kept in float)."""

from __future__ import annotations

import logging

from edgeq.convert.base import (
    ALL_SOURCES,
    BuildRequest,
    BuildResult,
    Capability,
    FormatBackend,
    captured_stdout,
)
from edgeq.convert.prequantized import FROM_SOURCE
from edgeq.convert.source import _first_line, conversion_failure
from edgeq.convert.source_torch import example_inputs
from edgeq.device.feeds import one_sample, spec_ranks, whole_inputs
from edgeq.errors import ConversionError, require_backend

log = logging.getLogger(__name__)

MODEL_FILE = "model.xml"


def build(request: BuildRequest) -> BuildResult:
    """Write ``model.xml`` + ``model.bin`` for ``request.precision`` into ``request.out_dir``."""
    ov = require_backend("openvino", "openvino")
    source = request.source
    tools: tuple[str, ...] = ("openvino",) + {"keras": ("tensorflow", "keras"), "savedmodel": ("tensorflow", "keras"),
                                              "pytorch": ("torch",), "torchscript": ("torch",)}.get(source.kind, ())
    try:
        model = _ov_model(ov, request)
        if request.input_shapes:
            model.reshape(_ports_to_shapes(model, source, request.input_shapes))
    except Exception as exc:  # OpConversionFailure, GeneralFailure: translate naming the op
        raise conversion_failure(source, "openvino", request.precision, exc) from exc
    options: dict[str, object] = {}
    method = None
    if request.precision == "dynamic":
        # Weight-only INT8 (NNCF's compress_weights): int8 weights, decompressed per layer by the CPU plugin;
        # activations stay float, so no calibration. OpenVINO's "dynamic quantization" of activations is the
        # plugin's own runtime choice (DYNAMIC_QUANTIZATION_GROUP_SIZE), not something stored in the IR.
        nncf = require_backend("nncf", "openvino")
        logging.getLogger("nncf").setLevel(logging.WARNING)  # its statistics table is INFO, to stdout
        try:
            with captured_stdout(log):
                model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        except Exception as exc:  # noqa: BLE001 - nncf raises InternalError on graphs it cannot walk
            # Seen on a model whose LSTMs sit in If branches (NNCF 3.4): "Could not find a node ... in NNCFGraph".
            raise ConversionError(f"{source.path}: cannot convert to openvino dynamic: NNCF's weight compression "
                                  f"failed: {_first_line(exc)}",
                                  hint="--format onnx --precision dynamic quantizes weights inside If bodies too") from exc
        tools += ("nncf",)
        options["weight_compression"] = "INT8_ASYM"
    if source.quantized_ops:  # int8 already (prequantized.py checked the request): converted as it is
        options.update(quantization=FROM_SOURCE, source_quantized_ops=source.quantized_ops,
                       fake_quantize_ops=sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops()))
    elif request.precision == "int8":
        preset = request.int8_preset or "performance"
        fast = request.fast_bias_correction if request.fast_bias_correction is not None else True
        model = _quantize(request, model, preset, fast)
        tools += ("nncf",)
        method = "minmax"
        if request.transformer:
            options["model_type"] = "transformer"
        options.update({"nncf_preset": preset, "fast_bias_correction": fast,
                        "overflow_fix": request.profile.openvino_overflow_fix})
        if request.accuracy_control is not None:
            control = request.accuracy_control
            floats, total = float_layers(model)
            options.update({"accuracy_control": {"max_drop": control.max_drop,
                                                 "max_iterations": control.max_iterations,
                                                 "ranking_subset": control.ranking_subset},
                            "float_layers": floats, "int8_layers": total - len(floats)})
    # save_model compresses weights to fp16 by default; fp32 and int8 keep what they computed. bf16 artifacts
    # store fp16 weights too (half the size; IR has no bf16 weight storage here) and compute in bf16: the
    # precision hint that makes them bf16 is set by the runtime from the manifest's precision.
    compress = request.precision in ("fp16", "bf16")
    if request.precision == "bf16":
        options.update({"weights": "fp16", "inference_precision": "bf16"})
    ov.save_model(model, str(request.out_dir / MODEL_FILE), compress_to_fp16=compress)
    return BuildResult(model_file=MODEL_FILE, calibration_method=method, options=options, tools=tools)


def _ov_model(ov, request: BuildRequest):
    """The source as an OpenVINO model: the ONNX file, the SavedModel, or the PyTorch module itself."""
    source = request.source
    if source.kind == "onnx":
        return ov.convert_model(str(source.path))
    if source.kind == "pytorch":
        return ov.convert_model(source.exported_program)  # the ExportedProgram, no tracing again
    if source.kind == "torchscript":
        model = ov.convert_model(source.torch_module, example_input=example_inputs(source.inputs, request.input_shapes))
        for port, name in zip(model.outputs, source.outputs, strict=False):
            if not port.get_names():  # TorchScript outputs come unnamed; runtimes and manifests need names
                port.get_tensor().set_names({name})
        return model
    return ov.convert_model(str(source.savedmodel_dir(request.scratch)))


def _ports_to_shapes(model, source, shapes: dict[str, list[int]]) -> dict:
    """``model.reshape``'s argument: each frozen source input's port (found by name, else by position:
    a SavedModel's signature names need not survive the conversion) -> its shape."""
    ports = {}
    for index, spec in enumerate(source.inputs):
        if spec.name not in shapes:
            continue
        port = next((p for p in model.inputs if spec.name in p.get_names()), None)
        if port is None and len(model.inputs) == len(source.inputs):
            port = model.inputs[index]
        if port is None:
            raise ConversionError(f"{source.path}: openvino: no model input matches source input '{spec.name}'")
        ports[port] = shapes[spec.name]
    return ports


# Ops whose inputs NNCF quantizes with a FakeQuantize when they run in int8: one without is a float layer.
WEIGHTED_OPS = {"Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData"}


def float_layers(model) -> tuple[list[str], int]:
    """(the weighted layers of a quantized model whose activations are not quantized, so run in float;
    the number of weighted layers)."""
    names, total = [], 0
    for op in model.get_ordered_ops():
        if op.get_type_name() not in WEIGHTED_OPS:
            continue
        total += 1
        feeds = [op.input_value(i).get_node().get_type_name() for i in range(op.get_input_size())]
        if "FakeQuantize" not in feeds:
            names.append(op.get_friendly_name())
    return sorted(names), total


def _model_input(sample: dict, names: list[str]):
    """What an NNCF dataset item (and a compiled model call) takes: one array for one input, a dict by name
    for several."""
    return sample[names[0]] if len(names) == 1 else sample


def _quantize(request: BuildRequest, model, preset: str, fast_bias_correction: bool):
    nncf = require_backend("nncf", "openvino")
    calibration = request.calibration
    if calibration is None:
        raise ConversionError(f"{request.source.path}: openvino int8 needs calibration data")
    names = [spec.name for spec in request.source.inputs]
    items = [_model_input(calibration.batch(i), names) for i in range(calibration.samples)]
    logging.getLogger("nncf").setLevel(logging.WARNING)
    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    common = {"preset": presets[preset], "subset_size": len(items), "fast_bias_correction": fast_bias_correction}
    if request.transformer:  # SmoothQuant (activation outliers moved into the weights) and transformer patterns
        common["model_type"] = nncf.ModelType.TRANSFORMER
    advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix(request.profile.openvino_overflow_fix))
    try:
        with captured_stdout(log):
            if request.accuracy_control is None:
                return nncf.quantize(model, nncf.Dataset(items), advanced_parameters=advanced, **common)
            return _quantize_with_accuracy_control(nncf, request, model, items, names,
                                                   {**common, "advanced_quantization_parameters": advanced})
    except Exception as exc:  # nncf raises RuntimeError/ValueError on unsupported graphs
        raise conversion_failure(request.source, "openvino", "int8", exc) from exc


def _quantize_with_accuracy_control(nncf, request: BuildRequest, model, items: list, names: list[str], common: dict):
    """NNCF ranks the quantizers by how much reverting each one helps on a capped subset, then reverts the
    best ones, one at a time, until the metric is within ``max_drop`` or ``max_iterations`` is spent."""
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    control = request.accuracy_control
    count = len(next(iter(control.inputs.values())))
    # Items carry their index, so the metric can line each output up with its label or FP32 reference.
    arrays = {n: control.inputs[n] for n in names}
    whole = whole_inputs(arrays, spec_ranks(request.source.inputs))  # a state or scalar given whole per sample
    validation = [(i, one_sample(arrays, whole, i)) for i in range(count)]

    def feed(item):
        return _model_input(item[1], names)

    scores = request.source.outputs[0] if request.source.outputs else None

    def validate(compiled, data) -> tuple[float, list[float]]:
        # The metric reads the source's first output; OpenVINO may order outputs otherwise (Basic Pitch's
        # SavedModel: contour, note, onset, where the signature lists note first), so it is found by name.
        index = next((i for i, port in enumerate(compiled.outputs) if scores in port.get_names()), 0)
        data = list(data)
        outputs = [compiled(feed(item))[index] for item in data]
        return control.metric(outputs, [item[0] for item in data])

    return nncf.quantize_with_accuracy_control(
        model, nncf.Dataset(items), nncf.Dataset(validation, feed), validate, max_drop=control.max_drop,
        drop_type=nncf.DropType.ABSOLUTE, **common,
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
            max_num_iterations=control.max_iterations, ranking_subset_size=min(control.ranking_subset, count)))


def _required_modules(precision: str, source_kind: str) -> list[tuple[str, str]]:
    return [("openvino", "openvino")] + ([("nncf", "openvino")] if precision in ("int8", "dynamic") else [])


BACKEND = FormatBackend(
    name="openvino", extra="openvino", build=build, required_modules=_required_modules,
    capabilities=(
        Capability("openvino", "fp32", ALL_SOURCES, False, "openvino", (), "openvino.convert_model + save_model"),
        Capability("openvino", "fp16", ALL_SOURCES, False, "openvino", (),
                   "openvino.save_model(compress_to_fp16=True)"),
        Capability("openvino", "bf16", ALL_SOURCES, False, "openvino", (),
                   "openvino.save_model (fp16 weights), run with INFERENCE_PRECISION_HINT bf16 (AVX512_BF16/AMX CPUs)"),
        Capability("openvino", "int8", ALL_SOURCES, True, "openvino", ("minmax",), "nncf.quantize (PTQ)"),
        Capability("openvino", "dynamic", ALL_SOURCES, False, "openvino", (),
                   "nncf.compress_weights INT8_ASYM (weight-only int8)"),
    ),
    tools={"openvino": ("openvino",), "nncf": ("nncf",)},
    int8_tunables=("int8_preset", "fast_bias_correction", "accuracy_control", "transformer"),
    freeze_free_batch=True,  # the CPU plugin's static-shape kernels are faster (edgeq.convert.shapes)
)
