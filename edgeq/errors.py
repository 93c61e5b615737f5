"""The one exception hierarchy of edgeq.

Library code raises these with a message that names the file, field or host,
and an optional hint. The CLI catches ``EdgeqError`` once, prints one line and
exits 1; anything else escaping is a bug and shows a traceback.
"""

from __future__ import annotations


class EdgeqError(Exception):
    """Root of every error edgeq reports to a user."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ProfileError(EdgeqError):
    """A device profile is missing, unknown or invalid."""


class InventoryError(EdgeqError):
    """A targets inventory is missing, unknown or invalid."""


class DataError(EdgeqError):
    """Calibration or evaluation data does not fit the model."""


class MissingBackendError(EdgeqError):
    """An optional backend (extra) is not installed."""


class ConversionError(EdgeqError):
    """A model could not be converted."""


class ValidationError(EdgeqError):
    """An artifact failed validation against its FP32 source (accuracy gate)."""


class ManifestError(EdgeqError):
    """An artifact directory or its manifest is missing or inconsistent."""


class ConnectError(EdgeqError):
    """A device could not be reached or authenticated."""


class RemoteCommandError(EdgeqError):
    """A command on a device failed."""


class DeployError(EdgeqError):
    """A deploy or rollback could not be completed."""


class BenchError(EdgeqError):
    """A benchmark could not be run or its result not read."""


class ReportError(EdgeqError):
    """Results could not be read or a report not written."""


def require_backend(module: str, extra: str):
    """Import a heavy optional module, or raise a MissingBackendError naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingBackendError(
            f"the {extra} backend is not installed ({module} cannot be imported: {exc})",
            hint=f"pip install 'edgeq[{extra}]'",
        ) from exc
