"""The transport of the built-in ``local`` target: subprocesses and file copies on this machine."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from edgeq.errors import RemoteCommandError
from edgeq.remote.base import (
    MAX_DOWNLOAD_BYTES,
    CommandResult,
    ProgressCallback,
    RunningCommand,
    Transport,
    check_limit,
    copy_bounded,
    describe_argv,
    download_limit_error,
    output_limit_error,
)

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

    def write(self, data: bytes) -> None:
        try:
            self._process.stdin.write(data)
            self._process.stdin.flush()
        except (OSError, ValueError) as exc:
            raise RemoteCommandError(f"{self._label}: '{describe_argv(self._argv)}' is gone: {exc}") from exc

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

    def _execute(self, argv: list[str], timeout: float, input: bytes | None, max_output: int) -> CommandResult:
        described = describe_argv(argv)
        try:
            # A session of its own, as sshd gives each command: a device step started here watches this
            # controller (its parent), not the terminal session the controller runs in.
            process = subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise RemoteCommandError(f"{self.target.label}: cannot run '{described}': {exc.strerror}") from exc
        captured = {"stdout": bytearray(), "stderr": bytearray()}
        over: list[str] = []

        def drain(stream: str, pipe) -> None:
            buffer = captured[stream]
            while chunk := pipe.read1(_CHUNK):
                if len(buffer) + len(chunk) > max_output:
                    over.append(stream)
                    process.kill()  # stop it: nothing more of its output is read
                    return
                buffer += chunk

        def feed() -> None:
            try:
                process.stdin.write(input)
            except OSError:  # the command exited without reading all of its input
                pass
            finally:
                with contextlib.suppress(OSError):
                    process.stdin.close()

        threads = [threading.Thread(target=drain, args=(name, getattr(process, name)), daemon=True)
                   for name in captured]
        if input is not None:
            threads.append(threading.Thread(target=feed, daemon=True))
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        try:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                if not over:
                    raise RemoteCommandError(f"{self.target.label}: '{described}' timed out after {timeout:g}s") from None
            for thread in threads:  # a child that outlives the command may hold the pipes open
                thread.join(max(0.0, deadline - time.monotonic()))
            if over:
                raise output_limit_error(self.target.label, argv, over[0], max_output)
            if any(thread.is_alive() for thread in threads):
                raise RemoteCommandError(f"{self.target.label}: '{described}' timed out after {timeout:g}s "
                                         "(its output stayed open)")
        finally:
            for pipe in (process.stdout, process.stderr):
                with contextlib.suppress(OSError):
                    pipe.close()
        return CommandResult(argv, process.returncode, bytes(captured["stdout"]).decode("utf-8", "replace"),
                             bytes(captured["stderr"]).decode("utf-8", "replace"))

    def start(self, argv: Sequence[str]) -> RunningCommand:
        argv = list(argv)
        try:
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
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

    def get(self, remote_path: str, local_path: str | Path, max_bytes: int | None = None) -> None:
        limit = check_limit(max_bytes, MAX_DOWNLOAD_BYTES, "max_bytes")
        label = self.target.label
        try:
            with open(remote_path, "rb") as source:
                size = os.fstat(source.fileno()).st_size
                if size > limit:
                    raise download_limit_error(label, remote_path, limit, size)
                copy_bounded(source.read, local_path, limit, _CHUNK,
                             lambda: download_limit_error(label, remote_path, limit), label)
        except OSError as exc:
            raise RemoteCommandError(f"{label}: cannot read {remote_path}: {exc.strerror}") from exc

    def close(self) -> None:
        pass
