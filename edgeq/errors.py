"""The one exception hierarchy of edgeq.

Library code raises these with a message that names the file, field or host,
and an optional hint. The CLI catches ``EdgeqError`` once, prints one line and
exits 1; anything else escaping is a bug and shows a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

#: What went wrong, for code that decides on it (the lab's "unreachable", the report's marks) instead of on
#: message text:
#: connect  - the device could not be reached or authenticated (or the connection was lost);
#: remote   - a command or device step on the device failed (exit code, timeout, device-side error);
#: artifact - the artifact or what it is run with is unusable (manifest, files, eval data, conversion);
#: runner   - the measurement itself failed on the device (runtime missing, model does not load, no result);
#: internal - a bug in edgeq.
FailureKind = Literal["connect", "remote", "artifact", "runner", "internal"]
FAILURE_KINDS: tuple[str, ...] = FailureKind.__args__


class Failure(BaseModel):
    """A failure as data: what result files, deploy outcomes and lab runs carry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: FailureKind
    message: str
    hint: str | None = None
    host: str | None = None
    argv: list[str] | None = None
    exit_code: int | None = None

    def on(self, host: str) -> Failure:
        """This failure, attributed to ``host`` unless it already names one."""
        return self if self.host else self.model_copy(update={"host": host})


class EdgeqError(Exception):
    """Root of every error edgeq reports to a user. ``kind`` classifies it (see ``FailureKind``); each
    subclass has a default, which a raise site may override. ``host``, ``argv`` and ``exit_code`` are set
    where they are known."""

    kind: FailureKind = "internal"

    def __init__(self, message: str, hint: str | None = None, *, kind: FailureKind | None = None,
                 host: str | None = None, argv: Sequence[str] | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if kind is not None:
            self.kind = kind
        self.host = host
        self.argv = list(argv) if argv is not None else None
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message

    def failure(self, host: str | None = None) -> Failure:
        return Failure(kind=self.kind, message=" ".join(self.message.split()), hint=self.hint,
                       host=self.host or host, argv=self.argv, exit_code=self.exit_code)


def internal_failure(exc: BaseException, host: str | None = None) -> Failure:
    """A Failure for an exception that is not an EdgeqError: a bug, said as one line."""
    if isinstance(exc, EdgeqError):
        return exc.failure(host)
    text = " ".join(str(exc).split())[:300]
    return Failure(kind="internal", message=f"unexpected {type(exc).__name__}" + (f": {text}" if text else ""),
                   host=host)


class ProfileError(EdgeqError):
    """A device profile is missing, unknown or invalid."""

    kind = "artifact"


class InventoryError(EdgeqError):
    """A targets inventory is missing, unknown or invalid."""

    kind = "artifact"


class DataError(EdgeqError):
    """Calibration or evaluation data does not fit the model."""

    kind = "artifact"


class MissingBackendError(EdgeqError):
    """An optional backend (extra) is not installed."""

    kind = "artifact"


class ConversionError(EdgeqError):
    """A model could not be converted."""

    kind = "artifact"


class ValidationError(EdgeqError):
    """An artifact failed validation against its FP32 source (accuracy gate)."""

    kind = "artifact"


class ManifestError(EdgeqError):
    """An artifact directory or its manifest is missing or inconsistent."""

    kind = "artifact"


class ConnectError(EdgeqError):
    """A device could not be reached or authenticated."""

    kind = "connect"


class RemoteCommandError(EdgeqError):
    """A command on a device failed."""

    kind = "remote"


class DeployError(EdgeqError):
    """A deploy or rollback could not be completed."""

    kind = "remote"


class BenchError(EdgeqError):
    """A benchmark could not be run or its result not read."""

    kind = "runner"


class ReportError(EdgeqError):
    """Results could not be read or a report not written."""

    kind = "artifact"


class TuneError(EdgeqError):
    """A tune request that cannot be served: its budget, the formats it may use, no candidate left."""

    kind = "artifact"


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


def first_line(exc: BaseException) -> str:
    """The informative line of a (possibly multi-line) third-party error message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("in user code:"):  # tf.function errors: the cause is the last line
        return lines[-1]
    return lines[0]


class QatError(EdgeqError):
    """Quantization-aware training could not run, or was given a model or data it cannot take."""

    kind = "artifact"
