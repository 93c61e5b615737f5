"""What edgeq can build, as data: one row per (format, precision), like ultralytics' ``export_formats()``,
collected from the format backends (``edgeq.convert.registry``).

The orchestrator looks a request up here; an unsupported pair or source kind gets an
error listing what is supported instead of a branch somewhere deep in a backend.
"""

from __future__ import annotations

from edgeq.convert.base import Capability
from edgeq.convert.registry import capabilities
from edgeq.errors import ConversionError

__all__ = ["Capability", "capabilities", "export_formats", "find_capability", "supported_pairs"]


def export_formats() -> list[dict[str, object]]:
    """The capability table as plain rows (for docs, ``--help`` and tests)."""
    return [
        {"format": c.format, "precision": c.precision, "sources": list(c.sources),
         "needs_calibration": c.needs_calibration, "extra": c.extra,
         "calibration_methods": list(c.calibration_methods), "how": c.how}
        for c in capabilities()
    ]


def supported_pairs(source_kind: str | None = None) -> list[str]:
    """``format/precision`` strings that can be built (from ``source_kind`` when given)."""
    return [f"{c.format}/{c.precision}" for c in capabilities() if source_kind is None or source_kind in c.sources]


def find_capability(fmt: str, precision: str, source_kind: str, source_name: str) -> Capability:
    """The row for this request, or a ConversionError that lists what is supported."""
    for cap in capabilities():
        if cap.format == fmt and cap.precision == precision:
            if source_kind not in cap.sources:
                raise ConversionError(
                    f"{source_name}: {fmt} {precision} cannot be built from a {source_kind} model "
                    f"(it needs one of: {', '.join(cap.sources)})",
                    hint="from a " + source_kind + " model edgeq builds: " + ", ".join(supported_pairs(source_kind)),
                )
            return cap
    same_format = [c.precision for c in capabilities() if c.format == fmt]
    raise ConversionError(
        f"format/precision {fmt}/{precision} is not supported"
        + (f" ({fmt} supports: {', '.join(same_format)})" if same_format else ""),
        hint="supported: " + ", ".join(supported_pairs(source_kind)),
    )
