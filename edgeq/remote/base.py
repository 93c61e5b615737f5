"""The transport interface every device connection implements, and the one argv-to-shell helper.

A transport runs argv lists (never shell strings built by hand), copies files up and down, and raises
``ConnectError`` / ``RemoteCommandError`` naming the host, the command, the exit code and stderr's tail.

What a device sends back is bounded, so a broken or hostile device cannot make the controller read without
end: ``run`` keeps at most ``max_output`` bytes (default ``MAX_OUTPUT_BYTES``) of stdout and of stderr, and
``get`` copies at most ``max_bytes`` (default ``MAX_DOWNLOAD_BYTES``); over the cap a ``SizeLimitError``
(a ``RemoteCommandError``) names the host, the command or path, and the cap.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import RemoteCommandError
from edgeq.targets import Target

# progress(bytes_done, bytes_total) for one file
ProgressCallback = Callable[[int, int], None]

DEFAULT_COMMAND_TIMEOUT = 60.0
# The most a command may write to stdout (and, separately, to stderr) before it is stopped.
MAX_OUTPUT_BYTES = 16 << 20
# The largest file ``get`` copies from a device unless the caller allows more.
MAX_DOWNLOAD_BYTES = 256 << 20


class SizeLimitError(RemoteCommandError):
    """A device sent more than the caller allowed (command output or a downloaded file)."""

    def __init__(self, message: str, *, host: str, limit: int, command: str | None = None,
                 path: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.host = host
        self.limit = limit
        self.command = command
        self.path = path


def format_size(size: int) -> str:
    """``16 MiB`` for whole MiB/KiB, else ``N bytes``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


def check_limit(value: int | None, default: int, what: str) -> int:
    """``value`` (or ``default`` for None) as a byte cap; raises RemoteCommandError unless a positive int."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RemoteCommandError(f"{what} must be a positive number of bytes, not {value!r}")
    return value


def output_limit_error(label: str, argv: Sequence[str], stream: str, limit: int) -> SizeLimitError:
    command = describe_argv(argv)
    return SizeLimitError(
        f"{label}: '{command}' wrote more than {format_size(limit)} to {stream} (max_output); stopped it",
        host=label, limit=limit, command=command,
        hint="a command's output is capped so a device cannot flood the controller; pass a larger max_output "
             "if this much output is expected")


def download_limit_error(label: str, path: str, limit: int, size: int | None = None) -> SizeLimitError:
    found = f"it is {size} bytes" if size is not None else "it grew past that while downloading"
    return SizeLimitError(
        f"{label}: {path} is larger than the {format_size(limit)} download cap (max_bytes): {found}; "
        "not downloaded", host=label, limit=limit, path=path)


def copy_bounded(read: Callable[[int], bytes], local_path: str | Path, limit: int, chunk_size: int,
                 too_big: Callable[[], SizeLimitError], label: str) -> int:
    """Copy ``read(chunk_size)`` chunks into ``local_path`` until EOF; more than ``limit`` bytes raise
    ``too_big()``. On any failure the partial local file is removed. Returns the bytes copied."""
    done = 0
    try:
        dest = open(local_path, "wb")  # noqa: SIM115 - closed below, removed on failure
    except OSError as exc:
        raise RemoteCommandError(f"{label}: cannot write {local_path}: {exc.strerror or exc}") from exc
    try:
        with dest:
            while chunk := read(chunk_size):
                done += len(chunk)
                if done > limit:
                    raise too_big()
                try:
                    dest.write(chunk)
                except OSError as exc:
                    raise RemoteCommandError(f"{label}: cannot write {local_path}: {exc.strerror or exc}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(local_path)
        raise
    return done


def check_argument(value: str) -> str:
    """Reject arguments no remote command should ever carry (NUL or newline); return the value."""
    if not isinstance(value, str):
        raise RemoteCommandError(f"command argument {value!r} is not a string")
    if "\0" in value or "\n" in value or "\r" in value:
        raise RemoteCommandError(f"refusing a command argument containing NUL or newline: {value[:60]!r}")
    return value


def shell_join(argv: Sequence[str]) -> str:
    """The one place argv becomes a shell command line: every argument checked and ``shlex.quote``d."""
    if not argv:
        raise RemoteCommandError("empty command")
    return " ".join(shlex.quote(check_argument(arg)) for arg in argv)


def describe_argv(argv: Sequence[str], limit: int = 120) -> str:
    """A short human form of a command for messages (long inline scripts shown by size only)."""
    parts = [arg if len(arg) <= 80 else f"<{len(arg)} chars>" for arg in argv]
    text = shlex.join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def stderr_tail(text: str, lines: int = 5) -> str:
    """The last few non-empty lines of stderr, joined with ' | ' so an error stays on one line."""
    tail = [line.strip() for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(tail)


@dataclass
class CommandResult:
    """What a finished command left behind."""

    argv: list[str]
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class RunningCommand(ABC):
    """A command that keeps running while the controller works (e.g. a held lock)."""

    @abstractmethod
    def readline(self, timeout: float) -> str:
        """One line of stdout ('' at EOF); raises RemoteCommandError when nothing arrives in time."""

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Send ``data`` to its stdin; raises RemoteCommandError when the command or connection is gone."""

    @abstractmethod
    def close(self) -> None:
        """Close its stdin (the command sees EOF and ends) and let go of it."""


class Transport(ABC):
    """Run argv / put / get / close on one target; use it as a context manager."""

    def __init__(self, target: Target):
        self.target = target
        self._home: str | None = None

    # -- the interface -------------------------------------------------------------------------
    @abstractmethod
    def _execute(self, argv: list[str], timeout: float, input: bytes | None, max_output: int) -> CommandResult:
        """Run one argv; return its result whatever the exit code. More than ``max_output`` bytes on stdout
        or on stderr stops the command and raises ``SizeLimitError`` (see ``output_limit_error``)."""

    @abstractmethod
    def start(self, argv: Sequence[str]) -> RunningCommand:
        """Start a long-running command with stdin open."""

    @abstractmethod
    def put(self, local_path: str | Path, remote_path: str, progress: ProgressCallback | None = None) -> None:
        """Copy a local file to ``remote_path`` (an absolute path on the device), replacing it."""

    @abstractmethod
    def get(self, remote_path: str, local_path: str | Path, max_bytes: int | None = None) -> None:
        """Copy a device file to ``local_path``.

        ``max_bytes`` (default ``MAX_DOWNLOAD_BYTES``) caps the download: a file whose size is over it is
        refused before anything is copied, and the bytes are counted while copying too (a file may grow, or
        not be a regular file); over the cap the partial local file is removed and ``SizeLimitError`` names
        the host, the path and the cap."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection."""

    # -- shared behaviour ------------------------------------------------------------------------
    def run(self, argv: Sequence[str], timeout: float = DEFAULT_COMMAND_TIMEOUT, check: bool = True,
            input: bytes | None = None, max_output: int | None = None) -> CommandResult:
        """Run ``argv`` on the device; with ``check`` a non-zero exit raises RemoteCommandError.

        ``input`` is sent to its stdin. ``max_output`` (default ``MAX_OUTPUT_BYTES``) caps what is kept of
        stdout and, separately, of stderr: a command that writes more is stopped (its channel or process
        closed) and ``SizeLimitError`` names the host, the command and the cap."""
        argv = [check_argument(arg) for arg in argv]
        limit = check_limit(max_output, MAX_OUTPUT_BYTES, "max_output")
        result = self._execute(argv, timeout, input, limit)
        if check and result.exit_code != 0:
            raise RemoteCommandError(
                f"{self.target.label}: '{describe_argv(argv)}' failed with exit code {result.exit_code}"
                + (f": {stderr_tail(result.stderr)}" if result.stderr.strip() else ""),
                host=self.target.name, argv=argv, exit_code=result.exit_code)
        return result

    def home(self) -> str:
        """The login user's home directory on the device."""
        if self._home is None:
            result = self.run(["sh", "-c", 'printf "%s" "$HOME"'], timeout=30)
            home = result.stdout.strip()
            if not home.startswith("/"):
                raise RemoteCommandError(f"{self.target.label}: cannot tell the home directory ($HOME={home!r})")
            self._home = home.rstrip("/") or "/"
        return self._home

    def expand(self, path: str) -> str:
        """An absolute device path: ``~`` and relative paths are taken from the login user's home."""
        check_argument(path)
        if path == "~":
            return self.home()
        if path.startswith("~/"):
            return self.home().rstrip("/") + "/" + path[2:].lstrip("/")
        if path.startswith("~"):
            raise RemoteCommandError(f"{self.target.label}: '~user' paths are not supported: {path!r}")
        if not path.startswith("/"):
            return self.home().rstrip("/") + "/" + path
        return path

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
