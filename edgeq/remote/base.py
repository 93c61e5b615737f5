"""The transport interface every device connection implements, and the one argv-to-shell helper.

A transport runs argv lists (never shell strings built by hand), copies files up and down, and raises
``ConnectError`` / ``RemoteCommandError`` naming the host, the command, the exit code and stderr's tail.
"""

from __future__ import annotations

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
    def close(self) -> None:
        """Close its stdin (the command sees EOF and ends) and let go of it."""


class Transport(ABC):
    """Run argv / put / get / close on one target; use it as a context manager."""

    def __init__(self, target: Target):
        self.target = target
        self._home: str | None = None

    # -- the interface -------------------------------------------------------------------------
    @abstractmethod
    def _execute(self, argv: list[str], timeout: float, input: bytes | None) -> CommandResult:
        """Run one argv; return its result whatever the exit code."""

    @abstractmethod
    def start(self, argv: Sequence[str]) -> RunningCommand:
        """Start a long-running command with stdin open."""

    @abstractmethod
    def put(self, local_path: str | Path, remote_path: str, progress: ProgressCallback | None = None) -> None:
        """Copy a local file to ``remote_path`` (an absolute path on the device), replacing it."""

    @abstractmethod
    def get(self, remote_path: str, local_path: str | Path) -> None:
        """Copy a device file to ``local_path``."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection."""

    # -- shared behaviour ------------------------------------------------------------------------
    def run(self, argv: Sequence[str], timeout: float = DEFAULT_COMMAND_TIMEOUT, check: bool = True,
            input: bytes | None = None) -> CommandResult:
        """Run ``argv`` on the device; with ``check`` a non-zero exit raises RemoteCommandError."""
        argv = [check_argument(arg) for arg in argv]
        result = self._execute(argv, timeout, input)
        if check and result.exit_code != 0:
            raise RemoteCommandError(
                f"{self.target.label}: '{describe_argv(argv)}' failed with exit code {result.exit_code}"
                + (f": {stderr_tail(result.stderr)}" if result.stderr.strip() else "")
            )
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
