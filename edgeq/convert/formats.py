"""What edgeq can build, as data: one row per (format, precision), like ultralytics' ``export_formats()``.

The orchestrator looks a request up here; an unsupported pair or source kind gets an
error listing what is supported instead of a branch somewhere deep in a backend.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeq.errors import ConversionError


@dataclass(frozen=True)
class Capability:
    """One buildable artifact kind."""

    format: str
    precision: str
    sources: tuple[str, ...]  # source kinds accepted: keras, savedmodel, onnx
    needs_calibration: bool
    extra: str  # the pip extra whose packages build it
    calibration_methods: tuple[str, ...]  # accepted --calibration-method values (empty: no calibration)
    how: str  # one line for people: which library call builds it


TF_SOURCES = ("keras", "savedmodel")
ALL_SOURCES = ("keras", "savedmodel", "onnx")

CAPABILITIES: tuple[Capability, ...] = (
    Capability("tflite", "fp32", TF_SOURCES, False, "tflite", (), "TFLiteConverter.from_saved_model"),
    Capability("tflite", "fp16", TF_SOURCES, False, "tflite", (), "TFLiteConverter, float16 weights"),
    Capability("tflite", "int8", TF_SOURCES, True, "tflite", ("minmax",),
               "TFLiteConverter full-integer PTQ (representative dataset)"),
    Capability("tflite", "dynamic", TF_SOURCES, False, "tflite", (), "TFLiteConverter dynamic-range int8 weights"),
    Capability("onnx", "fp32", ALL_SOURCES, False, "onnx", (), "tf2onnx (opset 17), or the ONNX source shape-inferred"),
    Capability("onnx", "fp16", ALL_SOURCES, False, "onnx", (),
               "onnxconverter-common convert_float_to_float16(keep_io_types=True)"),
    Capability("onnx", "int8", ALL_SOURCES, True, "onnx", ("minmax", "entropy", "percentile"),
               "onnxruntime quant_pre_process + quantize_static (QDQ, per-channel)"),
    Capability("onnx", "dynamic", ALL_SOURCES, False, "onnx", (), "onnxruntime quantize_dynamic (int8 weights)"),
    Capability("openvino", "fp32", ALL_SOURCES, False, "openvino", (), "openvino.convert_model + save_model"),
    Capability("openvino", "fp16", ALL_SOURCES, False, "openvino", (), "openvino.save_model(compress_to_fp16=True)"),
    Capability("openvino", "bf16", ALL_SOURCES, False, "openvino", (),
               "openvino.save_model (fp16 weights), run with INFERENCE_PRECISION_HINT bf16 (AVX512_BF16/AMX CPUs)"),
    Capability("openvino", "int8", ALL_SOURCES, True, "openvino", ("minmax",), "nncf.quantize (PTQ)"),
)


def export_formats() -> list[dict[str, object]]:
    """The capability table as plain rows (for docs, ``--help`` and tests)."""
    return [
        {"format": c.format, "precision": c.precision, "sources": list(c.sources),
         "needs_calibration": c.needs_calibration, "extra": c.extra,
         "calibration_methods": list(c.calibration_methods), "how": c.how}
        for c in CAPABILITIES
    ]


def supported_pairs(source_kind: str | None = None) -> list[str]:
    """``format/precision`` strings that can be built (from ``source_kind`` when given)."""
    return [f"{c.format}/{c.precision}" for c in CAPABILITIES if source_kind is None or source_kind in c.sources]


def find_capability(fmt: str, precision: str, source_kind: str, source_name: str) -> Capability:
    """The row for this request, or a ConversionError that lists what is supported."""
    for cap in CAPABILITIES:
        if cap.format == fmt and cap.precision == precision:
            if source_kind not in cap.sources:
                raise ConversionError(
                    f"{source_name}: {fmt} {precision} cannot be built from a {source_kind} model "
                    f"(it needs one of: {', '.join(cap.sources)})",
                    hint="from a " + source_kind + " model edgeq builds: " + ", ".join(supported_pairs(source_kind)),
                )
            return cap
    same_format = [c.precision for c in CAPABILITIES if c.format == fmt]
    raise ConversionError(
        f"format/precision {fmt}/{precision} is not supported"
        + (f" ({fmt} supports: {', '.join(same_format)})" if same_format else ""),
        hint="supported: " + ", ".join(supported_pairs(source_kind)),
    )
