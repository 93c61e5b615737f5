"""File transfer over an SSH connection's SFTP session: opened with large windows, uploads pipelined and
watched for a frozen peer, downloads bounded. Used by ``SSHTransport`` (ssh.py); errors become edgeq's."""

from __future__ import annotations

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


def put_file(sftp: paramiko.SFTPClient, transport: paramiko.Transport, label: str, local_path: str | Path,
             remote_path: str, progress: ProgressCallback | None, lost: Lost) -> None:
    total = Path(local_path).stat().st_size
    done = 0
    try:
        with UploadWatch(transport, label) as watch, open(local_path, "rb") as source, \
                sftp.open(remote_path, "wb") as dest:
            dest.set_pipelined(True)
            # SFTPFile splits writes at MAX_REQUEST_SIZE (32 KiB); OpenSSH's sftp-server takes 256 KiB.
            dest.MAX_REQUEST_SIZE = SFTP_WRITE_CHUNK
            while chunk := source.read(SFTP_WRITE_CHUNK):
                dest.write(chunk)
                watch.moved()
                done += len(chunk)
                if progress:
                    progress(done, total)
    except (paramiko.SSHException, EOFError, OSError) as exc:
        if transport.is_active() and isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
            detail = exc.strerror or str(exc)
            if detail == "Failure":  # sftp-server's answer to ENOSPC, EDQUOT and friends
                detail = "write failed on the device (disk full?)"
            raise RemoteCommandError(f"{label}: cannot write {remote_path}: {detail}") from exc
        raise watch.error(f"uploading to {remote_path}") or lost(exc, f"uploading to {remote_path}") from exc


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
        if transport.is_active():
            raise RemoteCommandError(f"{label}: cannot read {remote_path}: {exc.strerror or exc}") from exc
        raise lost(exc, f"downloading {remote_path}") from exc
    except (paramiko.SSHException, EOFError) as exc:
        raise lost(exc, f"downloading {remote_path}") from exc
