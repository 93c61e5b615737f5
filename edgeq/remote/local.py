"""The transport of the built-in ``local`` target: subprocesses and file copies on this machine."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from edgeq.errors import RemoteCommandError
from edgeq.remote.base import CommandResult, ProgressCallback, RunningCommand, Transport, describe_argv

_CHUNK = 1 << 20


class _LocalRunning(RunningCommand):
    def __init__(self, process: subprocess.Popen, label: str, argv: list[str]):
        self._process = process
        self._label = label
        self._argv = argv

    def readline(self, timeout: float) -> str:
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(self._process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if reader.is_alive():
            raise RemoteCommandError(f"{self._label}: no answer from '{describe_argv(self._argv)}' in {timeout:g}s")
        return result[0].decode("utf-8", "replace")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process.stdout.close()


class LocalTransport(Transport):
    """Runs commands with ``subprocess`` (no shell) and copies files with the filesystem."""

    def _execute(self, argv: list[str], timeout: float, input: bytes | None) -> CommandResult:
        try:
            done = subprocess.run(argv, input=input, capture_output=True, timeout=timeout,
                                  stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise RemoteCommandError(f"{self.target.label}: '{describe_argv(argv)}' timed out after {timeout:g}s") from exc
        except OSError as exc:
            raise RemoteCommandError(f"{self.target.label}: cannot run '{describe_argv(argv)}': {exc.strerror}") from exc
        return CommandResult(argv, done.returncode, done.stdout.decode("utf-8", "replace"),
                             done.stderr.decode("utf-8", "replace"))

    def start(self, argv: Sequence[str]) -> RunningCommand:
        argv = list(argv)
        try:
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL)
        except OSError as exc:
            raise RemoteCommandError(f"{self.target.label}: cannot run '{describe_argv(argv)}': {exc.strerror}") from exc
        return _LocalRunning(process, self.target.label, argv)

    def home(self) -> str:
        return str(Path.home())

    def put(self, local_path: str | Path, remote_path: str, progress: ProgressCallback | None = None) -> None:
        total = os.path.getsize(local_path)
        done = 0
        try:
            with open(local_path, "rb") as source, open(remote_path, "wb") as dest:
                while chunk := source.read(_CHUNK):
                    dest.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
        except OSError as exc:
            raise RemoteCommandError(f"{self.target.label}: cannot write {remote_path}: {exc.strerror}") from exc

    def get(self, remote_path: str, local_path: str | Path) -> None:
        try:
            shutil.copyfile(remote_path, local_path)
        except OSError as exc:
            raise RemoteCommandError(f"{self.target.label}: cannot read {remote_path}: {exc.strerror}") from exc

    def close(self) -> None:
        pass
