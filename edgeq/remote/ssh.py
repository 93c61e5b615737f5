"""SSH transport on paramiko: host keys verified (never auto-trusted), every timeout set, errors translated.

Connection settings follow OpenSSH: ``~/.ssh/config`` (HostName, User, Port, IdentityFile, ProxyJump,
ProxyCommand, UserKnownHostsFile) resolved for the target's ``host``, then the inventory's fields win.
Keys come from the inventory/config key files and ssh-agent. Host keys come from ``~/.ssh/known_hosts``
and ``/etc/ssh/ssh_known_hosts``; an unknown key is refused with a hint to ``edgeq targets trust``.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import logging
import os
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from edgeq.errors import ConnectError, RemoteCommandError
from edgeq.remote.base import (
    CommandResult,
    ProgressCallback,
    RunningCommand,
    Transport,
    describe_argv,
    shell_join,
)
from edgeq.targets import Target

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = float(os.environ.get("EDGEQ_CONNECT_TIMEOUT", "10"))
KEEPALIVE_SECONDS = 15
SYSTEM_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
# Bigger windows and packets than paramiko's defaults keep SFTP writes flowing on fast links.
WINDOW_SIZE = 64 * 1024 * 1024
MAX_PACKET_SIZE = 256 * 1024
# OpenSSH's sftp-server drops the connection for messages over 256 KiB (data + header): stay well below.
SFTP_WRITE_CHUNK = 128 * 1024
# AES-GCM (AEAD, one pass) is the cheapest cipher for paramiko; keep the others as fallbacks.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")


def user_known_hosts() -> Path:
    return Path(os.path.expanduser("~/.ssh/known_hosts"))


def known_hosts_name(hostname: str, port: int) -> str:
    """How OpenSSH names a host in known_hosts: ``host`` on port 22, ``[host]:port`` otherwise."""
    return hostname if port == 22 else f"[{hostname}]:{port}"


@dataclass
class SSHSettings:
    """Where and how to connect, after ~/.ssh/config and the inventory are combined."""

    alias: str
    hostname: str
    port: int
    user: str
    key_files: list[str] = field(default_factory=list)
    proxy_jump: str | None = None
    proxy_command: str | None = None
    known_hosts_files: list[str] = field(default_factory=list)

    @property
    def known_hosts_name(self) -> str:
        return known_hosts_name(self.hostname, self.port)

    @property
    def where(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"


def _ssh_config() -> paramiko.SSHConfig:
    path = Path(os.path.expanduser("~/.ssh/config"))
    if path.is_file():
        try:
            return paramiko.SSHConfig.from_path(str(path))
        except Exception as exc:  # paramiko raises several kinds for a bad config line
            raise ConnectError(f"{path}: cannot parse ssh config: {exc}") from exc
    return paramiko.SSHConfig()


def resolve_settings(target: Target) -> SSHSettings:
    """Combine ``~/.ssh/config`` for ``target.host`` with the inventory (inventory wins)."""
    return _resolve(target.host, target.user, target.port, target.key, target.known_hosts)


def _resolve(host: str, user: str | None, port: int | None, key: str | None,
             extra_known_hosts: str | None = None) -> SSHSettings:
    config = _ssh_config().lookup(host)
    hostname = config.get("hostname", host)
    try:
        resolved_port = port or int(config.get("port", 22))
    except ValueError as exc:
        raise ConnectError(f"~/.ssh/config: Port for host {host!r} is not a number") from exc
    resolved_user = user or config.get("user") or getpass.getuser()
    key_files = [os.path.expanduser(key)] if key else [os.path.expanduser(k) for k in config.get("identityfile", [])]
    proxy_jump = config.get("proxyjump")
    if proxy_jump and proxy_jump.lower() == "none":
        proxy_jump = None
    proxy_command = config.get("proxycommand")
    if proxy_command and proxy_command.lower() == "none":
        proxy_command = None
    known = [SYSTEM_KNOWN_HOSTS, str(user_known_hosts())]
    for extra in str(config.get("userknownhostsfile", "")).split():
        known.append(os.path.expanduser(extra))
    if extra_known_hosts:
        known.append(extra_known_hosts)
    return SSHSettings(alias=host, hostname=hostname, port=resolved_port, user=resolved_user, key_files=key_files,
                       proxy_jump=proxy_jump, proxy_command=proxy_command, known_hosts_files=known)


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:base64`` fingerprint of a public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_host_keys(settings: SSHSettings) -> dict[str, paramiko.PKey]:
    """The keys the known_hosts files record for this host, by key type (the first file that has a type wins)."""
    keys: dict[str, paramiko.PKey] = {}
    for path in settings.known_hosts_files:
        if not os.path.isfile(path):
            continue
        host_keys = paramiko.HostKeys()
        try:
            host_keys.load(path)
        except (OSError, paramiko.SSHException) as exc:
            raise ConnectError(f"{path}: cannot read known_hosts: {exc}") from exc
        found = host_keys.lookup(settings.known_hosts_name)
        if found:
            for key_type in found:
                keys.setdefault(key_type, found[key_type])
    return keys


class UnknownHostKey(paramiko.SSHException):
    """Raised by the host key policy: the server's key is in no known_hosts file."""

    def __init__(self, hostname: str, key: paramiko.PKey):
        super().__init__(f"host key for {hostname} is unknown")
        self.hostname = hostname
        self.key = key


class RejectUnknownPolicy(paramiko.RejectPolicy):
    """paramiko's RejectPolicy, raising a typed exception so the error can name the fix."""

    def missing_host_key(self, client, hostname, key):
        raise UnknownHostKey(hostname, key)


def _transport_factory(sock, **kwargs) -> paramiko.Transport:
    transport = paramiko.Transport(sock, default_window_size=WINDOW_SIZE,
                                   default_max_packet_size=MAX_PACKET_SIZE, **kwargs)
    options = transport.get_security_options()
    available = [c for c in PREFERRED_CIPHERS if c in options.ciphers]
    options.ciphers = tuple(available + [c for c in options.ciphers if c not in available])
    return transport


def translate_connect_error(exc: BaseException, settings: SSHSettings, name: str, timeout: float) -> ConnectError:
    """One line naming the host for whatever went wrong while connecting."""
    where = f"{name} ({settings.where})" if name else settings.where
    hk = settings.known_hosts_name
    if isinstance(exc, UnknownHostKey):
        return ConnectError(f"{where}: host key is not trusted (no entry for {hk} in known_hosts)",
                            hint=f"check the fingerprint, then run: edgeq targets trust {name or settings.alias}")
    if isinstance(exc, paramiko.BadHostKeyException):
        offered = exc.key.get_name()
        if exc.expected_key.get_name() != offered:
            # paramiko reports "keys recorded, none of the offered type" as a bad key; OpenSSH warns loudly
            # here too: the device's keys may have been replaced.
            try:
                recorded = ", ".join(sorted(known_host_keys(settings))) or exc.expected_key.get_name()
            except ConnectError:
                recorded = exc.expected_key.get_name()
            return ConnectError(
                f"{where}: host key is not trusted (known_hosts has no key of the offered type {offered} for "
                f"{hk}, only {recorded}); refusing to connect",
                hint=f"the device offers {offered} {fingerprint(exc.key)}; if its keys were expected to change: "
                     f"ssh-keygen -R '{hk}' then edgeq targets trust {name or settings.alias}")
        return ConnectError(
            f"{where}: host key has CHANGED (known_hosts has a different {exc.expected_key.get_name()} key "
            f"for {hk}); refusing to connect",
            hint=f"if the device was reinstalled: ssh-keygen -R '{hk}' then edgeq targets trust {name or settings.alias}",
        )
    if isinstance(exc, socket.gaierror):
        return ConnectError(f"{where}: cannot resolve host name {settings.hostname!r}",
                            hint="check the host in the inventory or ~/.ssh/config")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectError(f"{where}: connection refused (is sshd running on port {settings.port}?)")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return ConnectError(f"{where}: timed out after {timeout:g}s connecting")
    if isinstance(exc, paramiko.PasswordRequiredException):
        return ConnectError(f"{where}: the private key is encrypted",
                            hint="add it to ssh-agent (ssh-add KEY) so edgeq can use it")
    if isinstance(exc, paramiko.AuthenticationException):
        return ConnectError(f"{where}: authentication failed for user {settings.user!r}",
                            hint="set 'key:' in the inventory, IdentityFile in ~/.ssh/config, or load the key into ssh-agent")
    if isinstance(exc, paramiko.SSHException):
        message = str(exc)
        if "banner" in message.lower():
            return ConnectError(f"{where}: no SSH banner within {timeout:g}s (not an SSH server, or frozen)")
        return ConnectError(f"{where}: SSH negotiation failed: {message}")
    if isinstance(exc, EOFError):
        return ConnectError(f"{where}: connection closed by the device during SSH negotiation")
    if isinstance(exc, OSError):
        return ConnectError(f"{where}: cannot connect: {exc.strerror or exc}")
    if isinstance(exc, FileNotFoundError):
        return ConnectError(f"{where}: key file not found: {exc.filename}")
    return ConnectError(f"{where}: cannot connect: {exc}")


def _parse_jump(spec: str) -> tuple[str, str | None, int | None]:
    """One ProxyJump hop, ``[user@]host[:port]`` (``[v6]:port``, ``ssh://`` URIs too) -> host, user, port."""
    text = spec[len("ssh://"):] if spec.startswith("ssh://") else spec
    user = None
    if "@" in text:
        user, text = text.rsplit("@", 1)
    port_text = None
    if text.startswith("[") and "]:" in text:
        host, port_text = text[1:].split("]:", 1)
    elif text.startswith("[") and text.endswith("]"):
        host = text[1:-1]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host = text
    port = None
    if port_text is not None:
        if not port_text.isdigit():
            raise ConnectError(f"~/.ssh/config: ProxyJump {spec!r}: port is not a number")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ConnectError(f"~/.ssh/config: ProxyJump {spec!r}: port must be from 1 to 65535")
    if not host:
        raise ConnectError(f"~/.ssh/config: ProxyJump {spec!r}: no host name")
    return host, user, port


def _close_quietly(channel: paramiko.Channel) -> None:
    """Close a channel whose connection may already be dead (paramiko then raises EOFError/OSError)."""
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        channel.close()


class _SSHRunning(RunningCommand):
    def __init__(self, channel: paramiko.Channel, label: str, argv: list[str]):
        self._channel = channel
        self._label = label
        self._argv = argv
        self._buffer = b""

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            if self._channel.recv_ready():
                data = self._channel.recv(65536)
                if not data:
                    break
                self._buffer += data
                continue
            if self._channel.exit_status_ready() or self._channel.closed:
                while self._channel.recv_ready():
                    self._buffer += self._channel.recv(65536)
                break
            if time.monotonic() > deadline:
                raise RemoteCommandError(f"{self._label}: no answer from '{describe_argv(self._argv)}' in {timeout:g}s")
            select.select([self._channel], [], [], 0.05)
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", "replace")

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
            hops = []
            for hop in settings.proxy_jump.split(","):
                host, user, port = _parse_jump(hop.strip())
                hop_settings = _resolve(host, user, port, None)
                hop_settings.proxy_jump = None  # the chain is walked here, one hop after the other
                if hops:
                    hop_settings.proxy_command = None
                hops.append(hop_settings)
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
        try:
            return socket.create_connection((settings.hostname, settings.port), timeout=self.connect_timeout)
        except (TimeoutError, OSError) as exc:
            raise translate_connect_error(exc, settings, name, self.connect_timeout) from exc

    def _connect(self, settings: SSHSettings, name: str, sock=None) -> paramiko.SSHClient:
        if sock is None:
            sock = self._open_sock(settings, name)
        client = paramiko.SSHClient()
        try:
            for path in settings.known_hosts_files:
                if os.path.isfile(path):
                    client.load_system_host_keys(path)
        except (OSError, paramiko.SSHException) as exc:
            raise ConnectError(f"{name}: cannot read known_hosts: {exc}") from exc
        client.set_missing_host_key_policy(RejectUnknownPolicy())
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
                transport_factory=_transport_factory,
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

    def _execute(self, argv: list[str], timeout: float, input: bytes | None) -> CommandResult:
        channel = self._open_channel(argv)
        stdout, stderr = bytearray(), bytearray()
        deadline = time.monotonic() + timeout
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
                if channel.recv_stderr_ready():
                    stderr += channel.recv_stderr(1 << 16)
                    progressed = True
                if progressed:
                    continue
                if channel.exit_status_ready():
                    break
                if not self._transport.is_active():
                    raise ConnectError(f"{self.target.label}: connection lost while running '{describe_argv(argv)}'")
                if time.monotonic() > deadline:
                    raise RemoteCommandError(f"{self.target.label}: '{describe_argv(argv)}' timed out after {timeout:g}s")
                select.select([channel], [], [], 0.05)
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
        return _SSHRunning(self._open_channel(argv), self.target.label, argv)

    # -- files -----------------------------------------------------------------------------------
    def sftp(self) -> paramiko.SFTPClient:
        """The connection's SFTP session (opened once, with a large window)."""
        if self._sftp is None:
            try:
                self._sftp = paramiko.SFTPClient.from_transport(
                    self._transport, window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET_SIZE)
                self._sftp.get_channel().settimeout(max(self.connect_timeout, 30.0))
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise self._lost(exc, "opening SFTP") from exc
        return self._sftp

    def put(self, local_path: str | Path, remote_path: str, progress: ProgressCallback | None = None) -> None:
        total = os.path.getsize(local_path)
        done = 0
        sftp = self.sftp()
        try:
            with open(local_path, "rb") as source, sftp.open(remote_path, "wb") as dest:
                dest.set_pipelined(True)
                # SFTPFile splits writes at MAX_REQUEST_SIZE (32 KiB); OpenSSH's sftp-server takes 256 KiB.
                dest.MAX_REQUEST_SIZE = SFTP_WRITE_CHUNK
                while chunk := source.read(SFTP_WRITE_CHUNK * 4):
                    dest.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            if self._transport.is_active() and isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
                detail = exc.strerror or str(exc)
                if detail == "Failure":  # sftp-server's answer to ENOSPC, EDQUOT and friends
                    detail = "write failed on the device (disk full?)"
                raise RemoteCommandError(f"{self.target.label}: cannot write {remote_path}: {detail}") from exc
            raise self._lost(exc, f"uploading to {remote_path}") from exc

    def get(self, remote_path: str, local_path: str | Path) -> None:
        sftp = self.sftp()
        try:
            sftp.get(remote_path, str(local_path))
        except OSError as exc:
            if self._transport.is_active():
                raise RemoteCommandError(f"{self.target.label}: cannot read {remote_path}: {exc.strerror or exc}") from exc
            raise self._lost(exc, f"downloading {remote_path}") from exc
        except (paramiko.SSHException, EOFError) as exc:
            raise self._lost(exc, f"downloading {remote_path}") from exc

    def close(self) -> None:
        for closeable in (self._sftp, self.client, *reversed(self._jump_clients), self._proxy):
            if closeable is not None:
                # closing a dead connection may raise anything; there is nothing left to do about it
                with contextlib.suppress(Exception):
                    closeable.close()
        self._sftp = None
