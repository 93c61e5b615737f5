"""TFLite backend: fp32, fp16 (float16 weights), int8 full-integer PTQ, dynamic-range, from a SavedModel."""

from __future__ import annotations

import logging

from edgeq.convert.base import TF_SOURCES, BuildRequest, BuildResult, Capability, FormatBackend
from edgeq.convert.source import conversion_failure
from edgeq.errors import ConversionError, require_backend

log = logging.getLogger(__name__)

MODEL_FILE = "model.tflite"
SIGNATURE = "serving_default"


def build(request: BuildRequest) -> BuildResult:
    """Write ``model.tflite`` for ``request.precision`` into ``request.out_dir``."""
    tf = require_backend("tensorflow", "tflite")
    source = request.source
    saved_model = source.savedmodel_dir(request.scratch)
    if request.input_shapes:
        converter = _converter_with_shapes(tf, saved_model, request.input_shapes)
    else:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=[SIGNATURE])
    options: dict[str, object] = {}
    method = None
    if request.precision != "fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if request.precision == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    elif request.precision == "int8":
        io_type = request.quantized_io or request.profile.tflite_quantized_io
        converter.representative_dataset = _representative_dataset(request)
        # Full-integer: every op in int8, so the model runs on integer-only accelerators and XNNPACK's QS8 path.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = {"int8": tf.int8, "uint8": tf.uint8, "float32": tf.float32}[io_type]
        converter.inference_output_type = converter.inference_input_type
        options["quantized_io"] = io_type
        method = "minmax"
    try:
        flatbuffer = converter.convert()
    except Exception as exc:  # ConverterError and friends: translate to one line naming model and op
        raise conversion_failure(source, "tflite", request.precision, exc) from exc
    (request.out_dir / MODEL_FILE).write_bytes(flatbuffer)
    return BuildResult(model_file=MODEL_FILE, source_names=_source_names(tf, flatbuffer),
                       calibration_method=method, options=options,
                       tools=("tensorflow", "keras", "ai-edge-litert"))


def _converter_with_shapes(tf, saved_model, shapes: dict[str, list[int]]):
    """A converter of the SavedModel's signature traced at the frozen input shapes."""
    loaded = tf.saved_model.load(str(saved_model))
    signature = loaded.signatures[SIGNATURE]
    specs = {name: tf.TensorSpec(shapes.get(name, spec.shape), spec.dtype, name=name)
             for name, spec in signature.structured_input_signature[1].items()}
    concrete = tf.function(lambda **inputs: signature(**inputs)).get_concrete_function(**specs)
    return tf.lite.TFLiteConverter.from_concrete_functions([concrete], loaded)


def _representative_dataset(request: BuildRequest):
    calibration = request.calibration
    if calibration is None:  # the orchestrator checks first; this guards direct calls
        raise ConversionError(f"{request.source.path}: tflite int8 needs calibration data")
    names = [spec.name for spec in request.source.inputs]

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
)
