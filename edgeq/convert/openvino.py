"""OpenVINO IR backend: fp32, fp16 (compressed weights), int8 through NNCF post-training quantization."""

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
from edgeq.convert.source import conversion_failure
from edgeq.errors import ConversionError, require_backend

log = logging.getLogger(__name__)

MODEL_FILE = "model.xml"


def build(request: BuildRequest) -> BuildResult:
    """Write ``model.xml`` + ``model.bin`` for ``request.precision`` into ``request.out_dir``."""
    ov = require_backend("openvino", "openvino")
    source = request.source
    tools: tuple[str, ...] = ("openvino",)
    if source.kind == "onnx":
        location = source.path
    else:
        location = source.savedmodel_dir(request.scratch)
        tools += ("tensorflow", "keras")
    try:
        model = ov.convert_model(str(location))
    except Exception as exc:  # OpConversionFailure, GeneralFailure: translate naming the op
        raise conversion_failure(source, "openvino", request.precision, exc) from exc
    options: dict[str, object] = {}
    method = None
    if request.precision == "int8":
        model = _quantize(request, model)
        tools += ("nncf",)
        method = "minmax"
        options.update({"nncf_preset": "performance", "fast_bias_correction": True})
    # save_model compresses weights to fp16 by default; fp32 and int8 keep what they computed. bf16 artifacts
    # store fp16 weights too (half the size; IR has no bf16 weight storage here) and compute in bf16: the
    # precision hint that makes them bf16 is set by the runtime from the manifest's precision.
    compress = request.precision in ("fp16", "bf16")
    if request.precision == "bf16":
        options.update({"weights": "fp16", "inference_precision": "bf16"})
    ov.save_model(model, str(request.out_dir / MODEL_FILE), compress_to_fp16=compress)
    return BuildResult(model_file=MODEL_FILE, calibration_method=method, options=options, tools=tools)


def _quantize(request: BuildRequest, model):
    nncf = require_backend("nncf", "openvino")
    calibration = request.calibration
    if calibration is None:
        raise ConversionError(f"{request.source.path}: openvino int8 needs calibration data")
    names = [spec.name for spec in request.source.inputs]
    # nncf.Dataset items are what the model takes: one array for one input, a dict by name for several.
    items = [calibration.batch(i)[names[0]] if len(names) == 1 else calibration.batch(i)
             for i in range(calibration.samples)]
    logging.getLogger("nncf").setLevel(logging.WARNING)
    try:
        with captured_stdout(log):
            return nncf.quantize(model, nncf.Dataset(items), preset=nncf.QuantizationPreset.PERFORMANCE,
                                 subset_size=len(items))
    except Exception as exc:  # nncf raises RuntimeError/ValueError on unsupported graphs
        raise conversion_failure(request.source, "openvino", "int8", exc) from exc


def _required_modules(precision: str, source_kind: str) -> list[tuple[str, str]]:
    return [("openvino", "openvino")] + ([("nncf", "openvino")] if precision == "int8" else [])


BACKEND = FormatBackend(
    name="openvino", extra="openvino", build=build, required_modules=_required_modules,
    capabilities=(
        Capability("openvino", "fp32", ALL_SOURCES, False, "openvino", (), "openvino.convert_model + save_model"),
        Capability("openvino", "fp16", ALL_SOURCES, False, "openvino", (),
                   "openvino.save_model(compress_to_fp16=True)"),
        Capability("openvino", "bf16", ALL_SOURCES, False, "openvino", (),
                   "openvino.save_model (fp16 weights), run with INFERENCE_PRECISION_HINT bf16 (AVX512_BF16/AMX CPUs)"),
        Capability("openvino", "int8", ALL_SOURCES, True, "openvino", ("minmax",), "nncf.quantize (PTQ)"),
    ),
    tools={"openvino": ("openvino",), "nncf": ("nncf",)},
)
