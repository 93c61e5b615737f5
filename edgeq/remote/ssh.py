"""SSH transport on paramiko: host keys verified (never auto-trusted), every timeout set, errors translated.

Connection settings (``~/.ssh/config`` + the inventory) are resolved in ``ssh_config.py``. Keys come from
the inventory/config key files and ssh-agent. Host keys come from ``/etc/ssh/ssh_known_hosts``,
``~/.ssh/known_hosts``, UserKnownHostsFile and the target's own file, parsed by ``known_hosts.py``; an unknown
key is refused with a hint to ``edgeq targets trust``. Command output and downloads are bounded
(``MAX_OUTPUT_BYTES``, ``MAX_DOWNLOAD_BYTES`` in base.py).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import paramiko

from edgeq.errors import ConnectError, RemoteCommandError
from edgeq.remote.base import (
    MAX_DOWNLOAD_BYTES,
    CommandResult,
    ProgressCallback,
    RunningCommand,
    Transport,
    check_limit,
    describe_argv,
    output_limit_error,
    shell_join,
)
from edgeq.remote.known_hosts import (
    HostCertificateOnly,
    KnownHosts,
    KnownHostsPolicy,
    RevokedHostKey,
    UnknownHostKey,
    fingerprint,
    host_key_algorithms,
)
from edgeq.remote.liveness import Liveness
from edgeq.remote.sftp import MAX_PACKET_SIZE, WINDOW_SIZE, get_file, open_sftp, put_file
from edgeq.remote.ssh_config import (
    SYSTEM_KNOWN_HOSTS,
    SSHSettings,
    _parse_jump,
    jump_hops,
    known_host_keys,
    known_hosts_name,
    resolve_settings,
    translate_connect_error,
    user_known_hosts,
)
from edgeq.targets import Target

# Names other modules (and older callers) import from here.
__all__ = [
    "CONNECT_TIMEOUT", "SYSTEM_KNOWN_HOSTS", "HostCertificateOnly", "KnownHosts", "RevokedHostKey", "SSHSettings",
    "SSHTransport", "UnknownHostKey", "_parse_jump", "fingerprint", "known_host_keys", "known_hosts_name",
    "resolve_settings", "translate_connect_error", "user_known_hosts",
]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = float(os.environ.get("EDGEQ_CONNECT_TIMEOUT", "10"))
KEEPALIVE_SECONDS = 15
# A transient link failure (Wi-Fi roaming, a rebooting switch, a device still booting) is retried at the TCP
# connect only, never around commands: attempts and the pause before each retry, in seconds.
CONNECT_ATTEMPTS = int(os.environ.get("EDGEQ_CONNECT_ATTEMPTS", "3"))
CONNECT_BACKOFF = (1.0, 2.0, 4.0)
# The errors worth another try, by kind (errno), not by message: refused, reset, unreachable, timed out.
TRANSIENT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTUNREACH,
                              errno.ENETUNREACH, errno.ENETDOWN, errno.ETIMEDOUT, errno.EHOSTDOWN})
# After a command's exit status, how long to wait for output still on its way when no EOF comes.
EXIT_DRAIN_SECONDS = 1.0
# AES-GCM (AEAD, one pass) is the cheapest cipher for paramiko; keep the others as fallbacks.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")


def _transport_factory(sock, *, host_key_types: Sequence[str] = (), **kwargs) -> paramiko.Transport:
    transport = paramiko.Transport(sock, default_window_size=WINDOW_SIZE,
                                   default_max_packet_size=MAX_PACKET_SIZE, **kwargs)
    options = transport.get_security_options()
    available = [c for c in PREFERRED_CIPHERS if c in options.ciphers]
    options.ciphers = tuple(available + [c for c in options.ciphers if c not in available])
    # Ask first for the host key types known_hosts records (paramiko does this only with its own host keys).
    wanted = [a for a in host_key_algorithms(host_key_types) if a in options.key_types]
    if wanted:
        options.key_types = tuple(wanted + [t for t in options.key_types if t not in wanted])
    return transport


POLL_SECONDS = 0.005


def _wait_for_data() -> None:
    """A short pause between polls of a channel. Not select() on the channel: its fileno() makes paramiko
    create a pipe that the transport thread writes to on every packet, and closing the channel while data
    still arrives (an output cap stopping a flood) races that write: os.write on the closed pipe raises EBADF
    in the transport thread, which paramiko takes for a socket error and ends the whole connection."""
    time.sleep(POLL_SECONDS)


def _close_quietly(channel: paramiko.Channel) -> None:
    """Close a channel whose connection may already be dead (paramiko then raises EOFError/OSError)."""
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        channel.close()


class _SSHRunning(RunningCommand):
    def __init__(self, channel: paramiko.Channel, label: str, argv: list[str], liveness: Liveness | None = None):
        self._channel = channel
        self._label = label
        self._argv = argv
        self._buffer = b""
        self._liveness = liveness

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            if self._channel.recv_ready():
                data = self._channel.recv(65536)
                if not data:
                    break
                self._buffer += data
                if self._liveness:
                    self._liveness.heard_from()
                continue
            if self._channel.exit_status_ready() or self._channel.closed:
                while self._channel.recv_ready():
                    self._buffer += self._channel.recv(65536)
                break
            if time.monotonic() > deadline:
                raise RemoteCommandError(f"{self._label}: no answer from '{describe_argv(self._argv)}' in {timeout:g}s")
            if self._liveness:
                self._liveness.check(f"waiting on '{describe_argv(self._argv)}'")
            _wait_for_data()
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", "replace")

    def write(self, data: bytes) -> None:
        try:
            self._channel.sendall(data)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise RemoteCommandError(f"{self._label}: '{describe_argv(self._argv)}' is gone (connection lost?): "
                                     f"{exc or type(exc).__name__}") from exc

    def close(self) -> None:
        try:
            self._channel.shutdown_write()
            deadline = time.monotonic() + 5
            while not self._channel.exit_status_ready() and time.monotonic() < deadline:
                time.sleep(0.02)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        finally:
            _close_quietly(self._channel)


class SSHTransport(Transport):
    """A paramiko connection to one target (connects in the constructor)."""

    def __init__(self, target: Target, connect_timeout: float = CONNECT_TIMEOUT):
        super().__init__(target)
        self.connect_timeout = connect_timeout
        self.settings = resolve_settings(target)
        self._jump_clients: list[paramiko.SSHClient] = []
        self._proxy: paramiko.ProxyCommand | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._more_sftp: list[paramiko.SFTPClient] = []
        self._sessions_refused = False
        self.client = self._connect(self.settings, target.name)
        self._transport = self.client.get_transport()
        self._transport.set_keepalive(KEEPALIVE_SECONDS)

    # -- connecting ------------------------------------------------------------------------------
    def _open_sock(self, settings: SSHSettings, name: str):
        if settings.proxy_command:
            try:
                self._proxy = paramiko.ProxyCommand(settings.proxy_command)
                self._proxy.settimeout(self.connect_timeout)
            except Exception as exc:
                raise ConnectError(f"{name or settings.alias}: ProxyCommand failed to start: {exc}") from exc
            return self._proxy
        if settings.proxy_jump:
            hops = jump_hops(settings, name or settings.alias)
            sock = None
            for index, hop_settings in enumerate(hops):
                hop_client = self._connect(hop_settings, f"jump host {hop_settings.alias}", sock=sock)
                self._jump_clients.append(hop_client)
                after = hops[index + 1] if index + 1 < len(hops) else settings
                try:
                    sock = hop_client.get_transport().open_channel(
                        "direct-tcpip", (after.hostname, after.port), ("127.0.0.1", 0),
                        timeout=self.connect_timeout)
                except (paramiko.SSHException, OSError, EOFError) as exc:
                    raise ConnectError(f"{name or settings.alias}: jump host {hop_settings.alias} could not open a "
                                       f"channel to {after.hostname}:{after.port}: {exc}") from exc
            return sock
        for attempt in range(1, max(CONNECT_ATTEMPTS, 1) + 1):
            try:
                return socket.create_connection((settings.hostname, settings.port), timeout=self.connect_timeout)
            except (TimeoutError, OSError) as exc:
                transient = isinstance(exc, TimeoutError) or exc.errno in TRANSIENT_ERRNOS
                if not transient or attempt >= CONNECT_ATTEMPTS:
                    raise translate_connect_error(exc, settings, name, self.connect_timeout) from exc
                pause = CONNECT_BACKOFF[min(attempt - 1, len(CONNECT_BACKOFF) - 1)]
                log.info("%s: connect attempt %d of %d failed (%s); retrying in %gs", name or settings.alias,
                         attempt, CONNECT_ATTEMPTS, exc, pause)
                time.sleep(pause)
        raise AssertionError("unreachable: the loop returns or raises")

    def _connect(self, settings: SSHSettings, name: str, sock=None) -> paramiko.SSHClient:
        known = KnownHosts.load(settings.known_hosts_files)
        if sock is None:
            sock = self._open_sock(settings, name)
        client = paramiko.SSHClient()
        # The client holds no host keys of its own: paramiko asks the policy about every server key.
        client.set_missing_host_key_policy(KnownHostsPolicy(known, settings.known_hosts_name))
        host_key_types = list(known.keys_by_type(settings.known_hosts_name))
        for key_file in settings.key_files:
            if not os.path.isfile(key_file):
                raise ConnectError(f"{name or settings.alias} ({settings.where}): key file not found: {key_file}",
                                   hint="fix 'key:' in the inventory or IdentityFile in ~/.ssh/config")
        log.debug("connecting to %s (%s)", name, settings.where)
        try:
            client.connect(
                settings.hostname, port=settings.port, username=settings.user,
                key_filename=settings.key_files or None, allow_agent=True,
                look_for_keys=not settings.key_files, sock=sock,
                timeout=self.connect_timeout, banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout, channel_timeout=self.connect_timeout,
                transport_factory=functools.partial(_transport_factory, host_key_types=host_key_types),
            )
        except (paramiko.SSHException, OSError, EOFError) as exc:
            transport = client.get_transport()
            silent = transport is not None and not transport.remote_version
            client.close()
            if silent and type(exc) in (paramiko.SSHException, EOFError):
                # paramiko reports a missing banner in several ways ("No existing session", EOF...)
                raise ConnectError(f"{name or settings.alias} ({settings.where}): no SSH banner within "
                                   f"{self.connect_timeout:g}s (not an SSH server, or frozen)") from exc
            raise translate_connect_error(exc, settings, name, self.connect_timeout) from exc
        return client

    # -- commands --------------------------------------------------------------------------------
    def _lost(self, exc: BaseException, doing: str) -> ConnectError:
        return ConnectError(f"{self.target.label}: connection lost while {doing}: {exc or type(exc).__name__}")

    def _open_channel(self, argv: list[str]) -> paramiko.Channel:
        try:
            channel = self._transport.open_session(timeout=self.connect_timeout)
            channel.exec_command(shell_join(argv))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self._lost(exc, f"starting '{describe_argv(argv)}'") from exc
        return channel

    def _execute(self, argv: list[str], timeout: float, input: bytes | None, max_output: int) -> CommandResult:
        channel = self._open_channel(argv)
        liveness = Liveness(self._transport, self.target.label)
        stdout, stderr = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        try:
            channel.settimeout(max(1.0, timeout))
            if input:
                channel.sendall(input)
            channel.shutdown_write()
            while True:
                progressed = False
                if channel.recv_ready():
                    stdout += channel.recv(1 << 16)
                    progressed = True
                    if len(stdout) > max_output:  # the finally below closes the channel: the command stops
                        raise output_limit_error(self.target.label, argv, "stdout", max_output)
                if channel.recv_stderr_ready():
                    stderr += channel.recv_stderr(1 << 16)
                    progressed = True
                    if len(stderr) > max_output:
                        raise output_limit_error(self.target.label, argv, "stderr", max_output)
                if progressed:
                    quiet_since = None
                    liveness.heard_from()
                    continue
                if channel.exit_status_ready():
                    # sshd sends the exit status when the command ends, possibly before the rest of its
                    # buffered output: read on until EOF, or a moment of silence (a background child may
                    # hold stdout open).
                    if channel.eof_received or channel.closed:
                        break
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since > EXIT_DRAIN_SECONDS:
                        break
                if not self._transport.is_active():
                    raise ConnectError(f"{self.target.label}: connection lost while running '{describe_argv(argv)}'")
                if time.monotonic() > deadline:
                    raise RemoteCommandError(f"{self.target.label}: '{describe_argv(argv)}' timed out after {timeout:g}s")
                liveness.check(f"running '{describe_argv(argv)}'")
                _wait_for_data()
            exit_code = channel.recv_exit_status()
        except TimeoutError as exc:
            raise RemoteCommandError(f"{self.target.label}: '{describe_argv(argv)}' timed out after {timeout:g}s") from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self._lost(exc, f"running '{describe_argv(argv)}'") from exc
        finally:
            _close_quietly(channel)
        return CommandResult(argv, exit_code, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace"))

    def start(self, argv: Sequence[str]) -> RunningCommand:
        argv = list(argv)
        return _SSHRunning(self._open_channel(argv), self.target.label, argv,
                           Liveness(self._transport, self.target.label))

    # -- files -----------------------------------------------------------------------------------
    def sftp(self) -> paramiko.SFTPClient:
        """The connection's SFTP session (opened once, with a large window)."""
        if self._sftp is None:
            self._sftp = open_sftp(self._transport, self.target.label, self.connect_timeout, self._lost)
        return self._sftp

    def sftp_sessions(self, count: int) -> list[paramiko.SFTPClient]:
        """Up to ``count`` SFTP sessions of this connection (the first is ``sftp()``), kept for the next upload.
        Fewer where the server refuses more (sshd's MaxSessions): the upload goes over those it has."""
        first = self.sftp()
        while len(self._more_sftp) < count - 1 and not self._sessions_refused:
            try:
                self._more_sftp.append(open_sftp(self._transport, self.target.label, self.connect_timeout,
                                                 self._lost))
            except ConnectError:
                if not self._transport.is_active():
                    raise
                self._sessions_refused = True
                log.info("%s: the server refused SFTP session %d (MaxSessions?); uploading over %d",
                         self.target.label, len(self._more_sftp) + 2, len(self._more_sftp) + 1)
        return [first, *self._more_sftp[:count - 1]]

    def put(self, local_path: str | Path, remote_path: str, progress: ProgressCallback | None = None) -> None:
        put_file(self.sftp_sessions, self._transport, self.target.label, local_path, remote_path, progress, self._lost)

    def get(self, remote_path: str, local_path: str | Path, max_bytes: int | None = None) -> None:
        limit = check_limit(max_bytes, MAX_DOWNLOAD_BYTES, "max_bytes")
        get_file(self.sftp(), self._transport, self.target.label, remote_path, local_path, limit, self._lost)

    def close(self) -> None:
        for closeable in (*self._more_sftp, self._sftp, self.client, *reversed(self._jump_clients), self._proxy):
            if closeable is not None:
                # closing a dead connection may raise anything; there is nothing left to do about it
                with contextlib.suppress(Exception):
                    closeable.close()
        self._sftp, self._more_sftp = None, []
