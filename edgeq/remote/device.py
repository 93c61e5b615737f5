"""The device protocol, owned here: the device package (``edgeq.device``) built into one zipapp, shipped
once per version, and every device step run through it.

- ``device_package()`` builds ``edgeq-device-<sha12>.pyz`` from ``edgeq/device/`` with ``zipapp``: files in
  sorted order with fixed timestamps and modes, so the same sources give the same bytes and the same name.
- ``ensure_package()`` puts it at ``WORKDIR/bin/`` once per version: uploaded to a temp name, checked on
  the device with ``selfcheck <sha256>``, then renamed into place (a half-written package is never run).
- ``device_op()`` runs ``python -I WORKDIR/bin/edgeq-device-<sha12>.pyz OP`` with JSON on stdin and reads
  its one JSON line; ``device_lock()`` holds the deploy lock (or the bench lock) for a block and yields a
  ``LockedDevice``, whose ``op()`` runs a step through the lock's holder, so it is stopped with it.

Names never reach a shell: argv lists only, parameters as JSON.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import socket
import time
import zipapp
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from edgeq.errors import ConnectError, DeployError, RemoteCommandError
from edgeq.remote.base import (
    CommandResult,
    RunningCommand,
    Transport,
    check_argument,
    describe_argv,
    stderr_tail,
)
from edgeq.targets import Target

DEVICE_SOURCE = Path(__file__).resolve().parent.parent / "device"
# The package's name inside the zipapp (its modules import each other relatively, so any name works).
ARCHIVE_PACKAGE = "edgeq_device"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_MAIN = f"import sys\nfrom {ARCHIVE_PACKAGE}.protocol import main\nsys.exit(main())\n"
STEP_TIMEOUT = 300.0  # hashing a big model on a slow SD card takes a while
LOCK_TIMEOUT = 30.0
# Operations that need site-packages (the runtime, numpy): the others start with -S, which is faster.
_NEEDS_SITE = {"facts", "bench"}


@dataclass(frozen=True)
class DevicePackage:
    data: bytes
    sha256: str

    @property
    def name(self) -> str:
        return f"edgeq-device-{self.sha256[:12]}.pyz"


def _source_files() -> list[Path]:
    return sorted(p for p in DEVICE_SOURCE.rglob("*.py") if "__pycache__" not in p.parts)


@lru_cache(maxsize=1)
def device_package() -> DevicePackage:
    """The zipapp of ``edgeq/device/``, byte-for-byte the same for the same sources."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as archive:
        entries = [("__main__.py", _MAIN.encode())]
        entries += [(f"{ARCHIVE_PACKAGE}/{p.relative_to(DEVICE_SOURCE).as_posix()}", p.read_bytes())
                    for p in _source_files()]
        for name, data in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    inner.seek(0)
    out = io.BytesIO()
    zipapp.create_archive(inner, out, interpreter="/usr/bin/env python3")
    data = out.getvalue()
    return DevicePackage(data, hashlib.sha256(data).hexdigest())


def device_workdir(transport: Transport, target: Target) -> str:
    """The target's workdir as an absolute device path."""
    return transport.expand(target.workdir).rstrip("/") or "/"


def release_dir(transport: Transport, target: Target, release_id: str) -> str:
    """Absolute device path of one release."""
    return f"{device_workdir(transport, target)}/releases/{release_id}"


def current_dir(transport: Transport, target: Target) -> str:
    """Absolute device path of the ``current`` symlink (the active release)."""
    return f"{device_workdir(transport, target)}/current"


def package_path(transport: Transport, target: Target) -> str:
    return f"{device_workdir(transport, target)}/bin/{device_package().name}"


def _no_python(target: Target, python: str) -> RemoteCommandError:
    return RemoteCommandError(f"{target.label}: the device has no '{python}' interpreter",
                              hint="set 'python:' for this target in the inventory")


def _selfcheck(transport: Transport, python: str, path: str, sha256: str):
    result = transport.run([python, "-I", "-S", path, "selfcheck"], timeout=60, check=False,
                           input=json.dumps({"sha256": sha256}).encode())
    return result, _last_json(result.stdout)


def ensure_package(transport: Transport, target: Target) -> str:
    """The device path of this controller's device package, uploaded first if the device lacks it."""
    package = device_package()
    cache = transport.__dict__.setdefault("_edgeq_device_packages", {})
    if package.sha256 in cache:
        return cache[package.sha256]
    path = package_path(transport, target)
    result, answer = _selfcheck(transport, target.python, path, package.sha256)
    if answer is None or not answer.get("ok"):
        if result.exit_code == 127:
            raise _no_python(target, target.python)
        _install(transport, target, package, path)
    cache[package.sha256] = path
    return path


def _install(transport: Transport, target: Target, package: DevicePackage, path: str) -> None:
    directory = path.rsplit("/", 1)[0]
    tmp = f"{directory}/.tmp-{package.name}-{secrets.token_hex(4)}"
    transport.run(["mkdir", "-p", directory], timeout=30)
    local = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgeq-{os.getpid()}-{secrets.token_hex(4)}-{package.name}"
    try:
        local.write_bytes(package.data)
        transport.put(local, tmp)
    finally:
        local.unlink(missing_ok=True)
    result, answer = _selfcheck(transport, target.python, tmp, package.sha256)
    if answer is None or not answer.get("ok"):
        transport.run(["rm", "-f", tmp], timeout=30, check=False)
        if result.exit_code == 127:
            raise _no_python(target, target.python)
        detail = (f"its sha256 is {answer.get('sha256')}" if answer else
                  stderr_tail(result.stderr) or f"exit code {result.exit_code}")
        raise RemoteCommandError(
            f"{target.label}: the device package did not check out with '{target.python}': {detail}",
            hint="edgeq's device side needs Python 3.8+ on the device; set 'python:' for this target")
    transport.run(["mv", "-f", tmp, path], timeout=30)


def _last_json(stdout: str) -> dict | None:
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        data = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def device_argv(transport: Transport, target: Target, python: str, op: str, *args: str) -> list[str]:
    """argv running one device operation with ``python``: ``-I`` (no PYTHON* variables, no user site, no
    script directory on sys.path) always, ``-S`` (no site-packages, faster) unless the op needs them."""
    flags = ["-I"] if op in _NEEDS_SITE else ["-I", "-S"]
    return [python, *flags, ensure_package(transport, target), op, *args]


def device_op(transport: Transport, target: Target, op: str, params: dict, *, python: str | None = None,
              timeout: float = STEP_TIMEOUT) -> dict:
    """Run one device operation (JSON in on stdin, one JSON line out) with ``python`` (default the
    target's) and return its answer. Steps that change the device run under its lock instead
    (``LockedDevice.op``), which stops them when the controller goes."""
    python = python or target.python
    argv = device_argv(transport, target, python, op)
    result = transport.run(argv, timeout=timeout, check=False, input=json.dumps(params).encode())
    return _answer(target, op, python, argv, result.exit_code, result.stdout, result.stderr)


def _answer(target: Target, op: str, python: str, argv: list[str], exit_code: int | None, stdout: str,
            stderr: str) -> dict:
    """A device step's JSON answer, or the error its exit code, output and error kind say."""
    data = _last_json(stdout)
    label = target.label
    where = {"host": target.name, "argv": argv, "exit_code": exit_code}
    if exit_code == 127 or (data is None and "not found" in stderr):
        raise _no_python(target, python)
    if data is None:
        raise RemoteCommandError(f"{label}: device step '{op}' failed (exit {exit_code})"
                                 + (f": {stderr_tail(stderr)}" if stderr.strip() else ""), **where)
    if data.get("error") == "os":
        raise DeployError(f"{label}: {op} failed on the device: {data.get('message')}", **where)
    if data.get("error") in ("usage", "internal"):
        raise RemoteCommandError(f"{label}: device step '{op}' failed: {data.get('message')}", **where)
    return data


# How long past a step's own limit the controller waits for the holder's answer (it stops the step first).
STOP_MARGIN = 30.0


def _start_within_s() -> float:
    """A step request that reaches the device later than this after it was sent is not started: sooner than
    the controller reports a silent device frozen (edgeq.remote.liveness), so a request it gave up on never
    runs when the device wakes."""
    from edgeq.remote.liveness import frozen_after_s

    return max(1.0, frozen_after_s() - 1.0)


def _heartbeat_s() -> float:
    """How often the lock's holder reports a running step (EDGEQ_STEP_HEARTBEAT_S, default 10 s)."""
    return float(os.environ.get("EDGEQ_STEP_HEARTBEAT_S", 10.0))


def _silent_holder_s(beat_s: float) -> float:
    """Silence after which the holder is given up: three beats, and longer than a frozen device takes to be
    reported (edgeq.remote.liveness), so that a device gone silent as a whole is a connect failure."""
    from edgeq.remote.liveness import frozen_after_s

    return max(3 * beat_s, frozen_after_s() + beat_s)


class LockedDevice:
    """A device whose lock this controller holds: ``op`` runs a step through the lock's holder process,
    which stops the step's process group when its time limit passes or this controller goes, and keeps the
    lock until then (edgeq/device/ops/steps.py)."""

    def __init__(self, transport: Transport, target: Target, holder: RunningCommand, workdir: str,
                 device_clock: float | None = None, heartbeats: bool = False):
        self.transport, self.target, self.workdir = transport, target, workdir
        self._holder = holder
        self._heartbeats = heartbeats
        self._lost: str | None = None  # why the holder was given up: no later step may read its answers
        # The holder's monotonic clock minus ours, low by the answer's one-way latency L: a request's start_by
        # then falls L early, and the request travels L, so its window (_start_within_s) shrinks by 2L.
        self._clock_offset = None if device_clock is None else device_clock - time.monotonic()

    def op(self, op: str, params: dict, *, python: str | None = None, timeout: float | None = None) -> dict:
        """Run device operation ``op`` (with ``python``, default the target's) under the lock, stopped after
        ``timeout`` seconds (default ``STEP_TIMEOUT``); its answer."""
        python = python or self.target.python
        timeout = STEP_TIMEOUT if timeout is None else timeout
        argv = device_argv(self.transport, self.target, python, op)
        exit_code, stdout, stderr = self._step(argv, json.dumps(params), timeout, f"device step '{op}'")
        return _answer(self.target, op, python, argv, exit_code, stdout, stderr)

    def run(self, argv: list[str], timeout: float) -> CommandResult:
        """Run a command (say pip) under the lock; RemoteCommandError when it fails or runs past ``timeout``."""
        argv = [check_argument(arg) for arg in argv]
        exit_code, stdout, stderr = self._step(argv, "", timeout, f"'{describe_argv(argv)}'")
        if exit_code != 0:
            raise RemoteCommandError(f"{self.target.label}: '{describe_argv(argv)}' failed with exit code {exit_code}"
                                     + (f": {stderr_tail(stderr)}" if stderr.strip() else ""),
                                     host=self.target.name, argv=argv, exit_code=exit_code)
        return CommandResult(argv, exit_code, stdout, stderr)

    def _step(self, argv: list[str], input: str, timeout: float, what: str) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) of ``argv`` run by the lock's holder."""
        if self._lost:
            raise RemoteCommandError(f"{self.target.label}: {what} not sent: {self._lost}", host=self.target.name,
                                     argv=argv)
        request = {"argv": argv, "input": input, "timeout_s": timeout}
        if self._clock_offset is not None:  # not started if it reaches the device after we would give up on it
            request["start_by"] = time.monotonic() + self._clock_offset + _start_within_s()
        beat_s = _heartbeat_s() if self._heartbeats else None
        if beat_s:
            request["heartbeat_s"] = beat_s
        self._holder.write((json.dumps(request) + "\n").encode())
        where = {"host": self.target.name, "argv": argv}
        deadline = time.monotonic() + timeout + STOP_MARGIN
        while True:
            wait = deadline - time.monotonic()
            try:
                line = self._holder.readline(min(wait, _silent_holder_s(beat_s)) if beat_s else wait)
            except (RemoteCommandError, ConnectError) as exc:
                # The step's answer may still come (a starved holder): close the channel, so that it never
                # passes for a later step's, and the holder stops the step when it sees the EOF.
                self._lost = f"the lock process was given up during {what}"
                self._holder.close()
                if not beat_s or time.monotonic() >= deadline or isinstance(exc, ConnectError):
                    raise
                raise RemoteCommandError(f"{self.target.label}: the device's lock process sent nothing for "
                                         f"{_silent_holder_s(beat_s):g}s during {what} (stopped, or starved); given up",
                                         hint="check the device's load and memory; the device stops the step "
                                              "when it reads the closed connection", **where) from None
            try:
                reply = json.loads(line)
                if not isinstance(reply, dict):
                    raise json.JSONDecodeError("not an object", line, 0)
            except json.JSONDecodeError:
                raise RemoteCommandError(f"{self.target.label}: the device's lock process ended during {what}"
                                         + (f": {line.strip()}" if line.strip() else ""), **where) from None
            if "heartbeat" not in reply:
                break
        if reply.get("expired"):
            raise RemoteCommandError(f"{self.target.label}: {what} reached the device {reply.get('late_s')}s too "
                                     "late (frozen, or the link stalled); it was not started", **where)
        if reply.get("timed_out"):
            raise RemoteCommandError(f"{self.target.label}: {what} timed out after {timeout:g}s; the device "
                                     "stopped it", **where)
        if not isinstance(reply.get("exit_code"), int):  # the holder's own refusal (a malformed request)
            raise RemoteCommandError(f"{self.target.label}: {what} failed: {reply.get('message')}", **where)
        return reply["exit_code"], reply.get("stdout") or "", reply.get("stderr") or ""


def device_python(transport: Transport, target: Target) -> str:
    """The interpreter to run benches with: the one ``targets setup`` recorded, else ``target.python``."""
    data = device_op(transport, target, "read_python", {"workdir": device_workdir(transport, target)}, timeout=60)
    return data.get("python") or target.python


def current_release(transport: Transport, target: Target) -> str | None:
    """The id ``current`` points at, or None."""
    data = device_op(transport, target, "inspect", {"workdir": device_workdir(transport, target)}, timeout=60)
    return data.get("current")


@contextmanager
def device_lock(transport: Transport, target: Target, workdir: str, purpose: str = "deploy", *,
                lock: str = "deploy", shared: bool = False) -> Iterator[LockedDevice]:
    """Hold one of the device's locks for the duration; fail fast when it is taken.

    ``lock="deploy"``: exclusive for deploy, rollback and setup, shared (``shared=True``) for a bench, so no
    release is swapped or pruned under a live run. ``lock="bench"``: one bench at a time (two would share the
    device's CPUs and distort each other's latency and energy). The lock is a flock held by a process whose
    stdin is this connection: if the controller dies, the channel closes, the process sees EOF and the kernel
    releases the lock. Steps run under the lock go through the yielded ``LockedDevice``.
    """
    holder = f"edgeq {purpose} on {socket.gethostname()} pid {os.getpid()} since " \
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}"
    params = {"workdir": workdir, "holder": holder, "lock": lock, "shared": shared}
    argv = device_argv(transport, target, target.python, "lock", json.dumps(params))
    process = transport.start(argv)
    try:
        line = process.readline(LOCK_TIMEOUT)
        try:
            answer = json.loads(line)
        except json.JSONDecodeError:
            raise DeployError(f"{target.label}: could not take the deploy lock in {workdir}"
                              + (f": {line.strip()}" if line.strip() else " (is 'python' right for this target?)"),
                              hint="check 'python:' and 'workdir:' of this target") from None
        if answer.get("error") == "os":
            raise DeployError(f"{target.label}: could not take the deploy lock: {answer.get('message')}")
        if not answer.get("locked"):
            held_by = answer.get("holder") or "another process"
            if lock == "bench":
                raise DeployError(f"{target.label}: another bench is running on this device (held by {held_by})",
                                  hint=f"benches on one device share its CPUs: run them one after another; if "
                                       f"that controller is gone: edgeq targets unlock {target.name}")
            what = "a bench is running" if held_by.startswith("edgeq bench") else "another deploy is in progress"
            raise DeployError(f"{target.label}: {what} on this device "
                              f"(lock {workdir}/.deploy.lock held by {held_by})",
                              hint=f"wait for it to finish; if that controller is gone (crashed, or cut off "
                                   f"by a partition): edgeq targets unlock {target.name}")
        clock = answer.get("clock")
        yield LockedDevice(transport, target, process, workdir,
                           device_clock=float(clock) if isinstance(clock, (int, float)) else None,
                           heartbeats=answer.get("heartbeats") is True)
    finally:
        process.close()
