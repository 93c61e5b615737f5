"""The format and precision names, in one place and without imports, so the CLI's choices, the typed
configs (profiles, manifests, lab files) and the capability table cannot drift apart."""

from typing import Literal

FORMATS = ("tflite", "onnx", "openvino")
PRECISIONS = ("int8", "fp16", "bf16", "fp32", "dynamic")

# Literal[tuple] is Literal of its members: the same names, checked by pydantic.
Format = Literal[FORMATS]  # type: ignore[valid-type]
Precision = Literal[PRECISIONS]  # type: ignore[valid-type]
