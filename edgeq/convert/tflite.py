"""TFLite backend: fp32, fp16 (float16 weights), int8 full-integer PTQ (8-bit activations, or 16-bit: "16x8"),
dynamic-range, from a SavedModel."""

from __future__ import annotations

import logging

from edgeq.convert.base import TF_SOURCES, BuildRequest, BuildResult, Capability, FormatBackend
from edgeq.convert.prequantized import FROM_SOURCE
from edgeq.convert.source import conversion_failure
from edgeq.convert.tflite_mixed import build_mixed
from edgeq.errors import ConversionError, require_backend

log = logging.getLogger(__name__)

MODEL_FILE = "model.tflite"
SIGNATURE = "serving_default"


def build(request: BuildRequest) -> BuildResult:
    """Write ``model.tflite`` for ``request.precision`` into ``request.out_dir``."""
    tf = require_backend("tensorflow", "tflite")
    source = request.source
    converter = converter_for(tf, source, request.scratch, request.input_shapes)
    options: dict[str, object] = {}
    method = None
    if request.precision != "fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if request.precision == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    elif request.precision == "int8" and (request.activation_bits == 16 or request.float_nodes):
        if request.activation_bits == 16 and request.float_nodes:
            raise ConversionError(f"{source.path}: tflite int8 keeps layers in float with 8-bit activations only",
                                  hint="leave out activation_bits=16 or the float nodes")
        if request.quantized_io not in (None, "float32"):
            what = "with 16-bit activations" if request.activation_bits == 16 else "with float layers"
            raise ConversionError(f"{source.path}: tflite int8 {what} has float32 I/O, not {request.quantized_io}",
                                  hint="leave out --quantized-io")
        converter.representative_dataset = _representative_dataset(request)
        options["quantized_io"] = "float32"  # int16 I/O suits no caller edgeq knows; a float layer may be first
        method = "minmax"
        if request.float_nodes:
            options["float_nodes"] = sorted(request.float_nodes)
            flatbuffer = _convert(source, request, lambda: build_mixed(
                tf, converter, converter.representative_dataset, request.float_nodes, source.path))
            return _result(tf, request, flatbuffer, method, options)
        # 16x8: int8 weights, int16 activations (TFLite's "post-training integer quantization with int16
        # activations"). Every op must have a 16x8 kernel: one without fails the conversion rather than
        # falling back to float.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        options["activation_bits"] = 16
    elif request.precision == "int8" and source.quantized_ops:
        # A QAT SavedModel: its FakeQuant ranges are the scales, so no representative dataset.
        io_type = request.quantized_io or request.profile.tflite_quantized_io
        converter.inference_input_type = {"int8": tf.int8, "uint8": tf.uint8, "float32": tf.float32}[io_type]
        converter.inference_output_type = converter.inference_input_type
        options.update(quantized_io=io_type, quantization=FROM_SOURCE, source_quantized_ops=source.quantized_ops)
    elif request.precision == "int8":
        io_type = request.quantized_io or request.profile.tflite_quantized_io
        converter.representative_dataset = _representative_dataset(request)
        # Full-integer: every op in int8, so the model runs on integer-only accelerators and XNNPACK's QS8 path.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = {"int8": tf.int8, "uint8": tf.uint8, "float32": tf.float32}[io_type]
        converter.inference_output_type = converter.inference_input_type
        options["quantized_io"] = io_type
        method = "minmax"
    return _result(tf, request, _convert(source, request, converter.convert), method, options)


def _convert(source, request: BuildRequest, run) -> bytes:
    try:
        return run()
    except ConversionError:
        raise
    except Exception as exc:  # ConverterError and friends: translate to one line naming model and op
        raise conversion_failure(source, "tflite", request.precision, exc) from exc


def _result(tf, request: BuildRequest, flatbuffer: bytes, method, options) -> BuildResult:
    (request.out_dir / MODEL_FILE).write_bytes(flatbuffer)
    return BuildResult(model_file=MODEL_FILE, source_names=_source_names(tf, flatbuffer),
                       calibration_method=method, options=options,
                       tools=("tensorflow", "keras", "ai-edge-litert"))


def converter_for(tf, source, scratch, shapes: dict[str, list[int]]):
    """A converter of the source's SavedModel signature, traced at the frozen input shapes when there are."""
    saved_model = source.savedmodel_dir(scratch)
    if not shapes:
        return tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=[SIGNATURE])
    loaded = tf.saved_model.load(str(saved_model))
    signature = loaded.signatures[SIGNATURE]
    specs = {name: tf.TensorSpec(shapes.get(name, spec.shape), spec.dtype, name=name)
             for name, spec in signature.structured_input_signature[1].items()}
    concrete = tf.function(lambda **inputs: signature(**inputs)).get_concrete_function(**specs)
    return tf.lite.TFLiteConverter.from_concrete_functions([concrete], loaded)


def _representative_dataset(request: BuildRequest):
    if request.calibration is None:  # the orchestrator checks first; this guards direct calls
        raise ConversionError(f"{request.source.path}: tflite int8 needs calibration data")
    return representative_dataset(request.calibration, [spec.name for spec in request.source.inputs])


def representative_dataset(calibration, names: list[str]):
    """The converter's calibration feed: one sample at a time, in order."""

    def samples():
        for index in range(calibration.samples):
            batch = calibration.batch(index)
            # One input: a list is accepted everywhere; several: a dict keyed by signature input name.
            yield [batch[names[0]]] if len(names) == 1 else batch

    return samples


def _source_names(tf, flatbuffer: bytes) -> dict[str, str]:
    """TFLite renames tensors (``serving_default_x:0``); map them back to the signature's names."""
    try:  # LiteRT's interpreter: tf.lite.Interpreter is deprecated and warns on every use
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter  # noqa: N806
    interpreter = Interpreter(model_content=flatbuffer)
    by_index = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
    runner = interpreter.get_signature_runner(SIGNATURE)
    names = {}
    for details in (runner.get_input_details(), runner.get_output_details()):
        for source_name, detail in details.items():
            tensor_name = by_index.get(detail["index"])
            if tensor_name and tensor_name != source_name:
                names[tensor_name] = source_name
    return names


def _required_modules(precision: str, source_kind: str) -> list[tuple[str, str]]:
    return [("tensorflow", "tflite")]


BACKEND = FormatBackend(
    name="tflite", extra="tflite", build=build, required_modules=_required_modules,
    capabilities=(
        Capability("tflite", "fp32", TF_SOURCES, False, "tflite", (), "TFLiteConverter.from_saved_model"),
        Capability("tflite", "fp16", TF_SOURCES, False, "tflite", (), "TFLiteConverter, float16 weights"),
        Capability("tflite", "int8", TF_SOURCES, True, "tflite", ("minmax",),
                   "TFLiteConverter full-integer PTQ (representative dataset)"),
        Capability("tflite", "dynamic", TF_SOURCES, False, "tflite", (),
                   "TFLiteConverter dynamic-range int8 weights"),
    ),
    tools={"tensorflow": ("tensorflow-cpu", "tensorflow"), "keras": ("keras",),
           "ai-edge-litert": ("ai-edge-litert",)},
    quantized_io_precisions=("int8",),
    float_node_precisions=("int8",),
    int8_tunables=("activation_bits",),
)
