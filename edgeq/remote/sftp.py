"""File transfer over an SSH connection's SFTP session: opened with large windows, uploads pipelined and
watched for a frozen peer, downloads bounded. Used by ``SSHTransport`` (ssh.py); errors become edgeq's."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import paramiko

from edgeq.errors import ConnectError, RemoteCommandError
from edgeq.remote.base import ProgressCallback, copy_bounded, download_limit_error
from edgeq.remote.liveness import UploadWatch, frozen_after_s

# Bigger windows and packets than paramiko's defaults keep SFTP writes flowing on fast links.
WINDOW_SIZE = 64 * 1024 * 1024
MAX_PACKET_SIZE = 256 * 1024
# OpenSSH's sftp-server drops the connection for messages over 256 KiB (data + header): stay well below.
SFTP_WRITE_CHUNK = 128 * 1024
SFTP_READ_CHUNK = 256 * 1024
# Uploads of at least 2 x STREAM_MIN_BYTES are split over sessions (upload_streams).
DEFAULT_UPLOAD_STREAMS = 4
STREAM_MIN_BYTES = 8 * 1024 * 1024

# (the exception, what was being done) -> the ConnectError for a lost connection
Lost = Callable[[BaseException, str], ConnectError]


def open_sftp(transport: paramiko.Transport, label: str, connect_timeout: float, lost: Lost) -> paramiko.SFTPClient:
    """An SFTP session on ``transport``; a server without the sftp subsystem is a clear error."""
    try:
        channel = transport.open_session(window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET_SIZE,
                                         timeout=connect_timeout)
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise lost(exc, "opening SFTP") from exc
    try:
        channel.invoke_subsystem("sftp")
    except (paramiko.SSHException, EOFError) as exc:
        channel.close()
        if not transport.is_active():
            raise lost(exc, "opening SFTP") from exc
        # The server said no: its sshd_config has no (or a broken) sftp subsystem.
        raise RemoteCommandError(
            f"{label}: the SSH server has no SFTP subsystem; edgeq copies files over SFTP",
            hint="enable 'Subsystem sftp internal-sftp' (or the sftp-server path) in the device's "
                 "sshd_config and reload sshd") from exc
    # A read that gets nothing this long is a frozen device (or a dead link): at most 30 s, sooner where
    # liveness is set to report a frozen device sooner.
    channel.settimeout(max(connect_timeout, min(30.0, frozen_after_s())))
    try:
        return paramiko.SFTPClient(channel)
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise lost(exc, "opening SFTP") from exc


def upload_streams(size: int) -> int:
    """SFTP sessions an upload of ``size`` bytes is split over. Each session is an SSH channel whose window the
    device's sshd sets (OpenSSH: 2 MiB), so one stream carries at most that per round trip: 40 MB/s at 50 ms,
    less at a Wi-Fi link's 100 ms. Big files go over several (EDGEQ_UPLOAD_STREAMS, default 4)."""
    streams = int(os.environ.get("EDGEQ_UPLOAD_STREAMS", DEFAULT_UPLOAD_STREAMS))
    return max(1, min(streams, size // STREAM_MIN_BYTES))


def put_file(sessions: Callable[[int], list[paramiko.SFTPClient]], transport: paramiko.Transport, label: str,
             local_path: str | Path, remote_path: str, progress: ProgressCallback | None, lost: Lost) -> None:
    """Upload ``local_path`` to ``remote_path``, pipelined, over ``upload_streams(size)`` SFTP sessions
    (``sessions(n)`` gives them; each writes its own byte range of the file)."""
    total = Path(local_path).stat().st_size
    moved = _Moved(total, progress)
    try:
        with UploadWatch(transport, label) as watch:
            moved.watch = watch
            clients = sessions(upload_streams(total))
            step = -(-total // len(clients))  # ceil: the last range is the shorter one
            with clients[0].open(remote_path, "wb") as first:  # created (and truncated) before the others write
                others = [threading.Thread(target=moved.run, args=(_write_range, client, local_path, remote_path,
                                                                   index * step, min(total, (index + 1) * step)),
                                           name=f"edgeq-upload-{label}-{index}", daemon=True)
                          for index, client in enumerate(clients[1:], start=1)]
                for thread in others:
                    thread.start()
                try:
                    moved.run(_write_range, first, local_path, remote_path, 0, min(total, step))
                finally:
                    for thread in others:  # every stream is done before the file is closed or an error raised
                        thread.join()
            if moved.errors:
                error = moved.errors[0]
                if not isinstance(error, (paramiko.SSHException, EOFError, OSError)):  # SFTPError, a bad answer
                    raise RemoteCommandError(f"{label}: uploading to {remote_path} failed: {error}") from error
                raise error
    except (paramiko.SSHException, EOFError, OSError) as exc:
        if isinstance(exc, TimeoutError):
            # A session that timed out may still get its answers: none of them must pass for a later request's.
            transport.close()
        if transport.is_active() and isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
            detail = exc.strerror or str(exc)
            if detail == "Failure":  # sftp-server's answer to ENOSPC, EDQUOT and friends
                detail = "write failed on the device (disk full?)"
            raise RemoteCommandError(f"{label}: cannot write {remote_path}: {detail}") from exc
        raise watch.error(f"uploading to {remote_path}") or lost(exc, f"uploading to {remote_path}") from exc


def _write_range(client_or_file, local_path: str | Path, remote_path: str, start: int, end: int,
                 moved: _Moved) -> None:
    """Write bytes [start, end) of the local file at the same offsets of the remote one."""
    with contextlib.ExitStack() as stack:
        dest = client_or_file
        if isinstance(client_or_file, paramiko.SFTPClient):  # a second stream opens the file the first made
            dest = stack.enter_context(client_or_file.open(remote_path, "r+b"))
        source = stack.enter_context(open(local_path, "rb"))
        dest.set_pipelined(True)
        # SFTPFile splits writes at MAX_REQUEST_SIZE (32 KiB); OpenSSH's sftp-server takes 256 KiB.
        dest.MAX_REQUEST_SIZE = SFTP_WRITE_CHUNK
        source.seek(start)
        dest.seek(start)
        position = start
        while position < end and not moved.errors:  # stop once another stream failed: the upload has failed
            chunk = source.read(min(SFTP_WRITE_CHUNK, end - position))
            if not chunk:
                raise OSError(f"{local_path} shrank during the upload")
            dest.write(chunk)
            position += len(chunk)
            moved.add(len(chunk))
        # Wait for every pipelined write's answer, in order, raising the first error. paramiko's close does not:
        # its writes register no file for their answers, so an error answer that arrives while the close
        # waits for its own (a full disk) is dropped, and the upload looks complete.
        pending = getattr(dest, "_reqs", None)  # paramiko's own queue (3.x); without it, close's checks only
        while pending:
            dest.sftp._read_response(pending.popleft())


class _Moved:
    """Bytes moved across streams: progress in order, the watch fed, the first stream error kept."""

    def __init__(self, total: int, progress: ProgressCallback | None):
        self.total, self.progress, self.done = total, progress, 0
        self.watch: UploadWatch | None = None
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        with self._lock:
            self.done += count
            if self.watch is not None:
                self.watch.moved()
            if self.progress:
                self.progress(self.done, self.total)

    def run(self, write, *args) -> None:
        try:
            write(*args, self)
        except Exception as exc:  # noqa: BLE001 - any stream's failure is the upload's: put_file raises it
            self.errors.append(exc)


def get_file(sftp: paramiko.SFTPClient, transport: paramiko.Transport, label: str, remote_path: str,
             local_path: str | Path, limit: int, lost: Lost) -> None:
    try:
        size = sftp.stat(remote_path).st_size
        if size is not None and size > limit:
            raise download_limit_error(label, remote_path, limit, size)
        with sftp.open(remote_path, "rb") as source:
            if size:
                source.prefetch(size)  # pipelined reads, as sftp.get does; reads past it are counted too
            copy_bounded(source.read, local_path, limit, SFTP_READ_CHUNK,
                         lambda: download_limit_error(label, remote_path, limit), label)
    except OSError as exc:
        if isinstance(exc, TimeoutError):  # as in put_file: a late answer must not pass for a later request's
            transport.close()
        if transport.is_active():
            raise RemoteCommandError(f"{label}: cannot read {remote_path}: {exc.strerror or exc}") from exc
        raise lost(exc, f"downloading {remote_path}") from exc
    except (paramiko.SSHException, EOFError) as exc:
        raise lost(exc, f"downloading {remote_path}") from exc
