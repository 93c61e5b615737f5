"""Model conversion: ``convert(model, profile, output, ...)`` and the table of what can be built.

Importing this package stays light: backends (TensorFlow, ONNX, OpenVINO) load inside ``convert``.
"""

from edgeq.convert.core import convert, tool_versions
from edgeq.convert.formats import Capability, capabilities, export_formats, find_capability, supported_pairs

__all__ = ["Capability", "capabilities", "convert", "export_formats", "find_capability", "supported_pairs",
           "tool_versions"]
