"""Where and how to connect: ``~/.ssh/config`` combined with the inventory, and connect errors in one line.

Settings follow OpenSSH: HostName, User, Port, IdentityFile, ProxyJump, ProxyCommand and UserKnownHostsFile
are resolved for the target's ``host``, then the inventory's fields win. Every host and user name that may
reach a ProxyCommand (the inventory's, ProxyJump hops', and what the config resolves) is checked with
OpenSSH's rules (``edgeq.targets.hostname_problem`` / ``user_problem``) before ``%h`` / ``%r`` are expanded.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from edgeq.errors import ConnectError
from edgeq.remote.known_hosts import (
    HostCertificateOnly,
    KnownHosts,
    RevokedHostKey,
    UnknownHostKey,
    fingerprint,
)
from edgeq.targets import Target, hostname_problem, user_problem

SYSTEM_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"


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


class _SSHConfig(paramiko.SSHConfig):
    """paramiko's ssh_config parser, leaving ProxyCommand's tokens alone: ``expand_proxy_command`` expands
    them once the names are validated, with the inventory's user and port (as OpenSSH does)."""

    def _allowed_tokens(self, key):
        return [] if key == "proxycommand" else super()._allowed_tokens(key)


def _ssh_config() -> paramiko.SSHConfig:
    path = Path(os.path.expanduser("~/.ssh/config"))
    if path.is_file():
        try:
            return _SSHConfig.from_path(str(path))
        except Exception as exc:  # paramiko raises several kinds for a bad config line
            raise ConnectError(f"{path}: cannot parse ssh config: {exc}") from exc
    return _SSHConfig()


def expand_proxy_command(command: str, hostname: str, port: int, user: str, alias: str) -> str:
    """ProxyCommand's ``%h %p %r %n %%`` tokens (and a ``~`` starting a word) expanded."""
    home = os.path.expanduser("~")
    command = re.sub(r"(?<!\S)~(?=/|\s|$)", lambda _: home, command)
    tokens = {"%%": "%", "%h": hostname, "%p": str(port), "%r": user, "%n": alias}
    return re.sub(r"%[%hprn]", lambda m: tokens[m.group()], command)


def _check_host(value: str, who: str, field: str) -> None:
    problem = hostname_problem(value)
    if problem:
        raise ConnectError(f"{who}: {field} {value!r} is not a valid host name: {problem}",
                           hint="host names must not start with '-' or contain whitespace or shell characters")


def _check_user(value: str, who: str, field: str) -> None:
    problem = user_problem(value)
    if problem:
        raise ConnectError(f"{who}: {field} {value!r} is not a valid user name: {problem}",
                           hint="user names must not start with '-' or contain shell characters")


def resolve_settings(target: Target) -> SSHSettings:
    """Combine ``~/.ssh/config`` for ``target.host`` with the inventory (inventory wins)."""
    return _resolve(target.host, target.user, target.port, target.key, target.known_hosts,
                    who=target.name or target.host)


def _resolve(host: str, user: str | None, port: int | None, key: str | None,
             extra_known_hosts: str | None = None, who: str | None = None) -> SSHSettings:
    who = who or host
    # Checked before the lookup: ssh_config's "Match exec" runs commands with %h expanded.
    _check_host(host, who, "host")
    if user is not None:
        _check_user(user, who, "user")
    config = _ssh_config().lookup(host)
    hostname = config.get("hostname", host)
    if hostname != host:
        _check_host(hostname, who, "~/.ssh/config HostName")
    try:
        resolved_port = port or int(config.get("port", 22))
    except ValueError as exc:
        raise ConnectError(f"~/.ssh/config: Port for host {host!r} is not a number") from exc
    if user is None and config.get("user"):
        _check_user(config["user"], who, "~/.ssh/config User")
    resolved_user = user or config.get("user") or getpass.getuser()
    key_files = [os.path.expanduser(key)] if key else [os.path.expanduser(k) for k in config.get("identityfile", [])]
    proxy_jump = config.get("proxyjump")
    if proxy_jump and proxy_jump.lower() == "none":
        proxy_jump = None
    for spec in (proxy_jump or "").split(","):
        if spec.strip():
            hop_host, hop_user, _ = parse_jump(spec.strip())
            _check_host(hop_host, who, "~/.ssh/config ProxyJump host")
            if hop_user is not None:
                _check_user(hop_user, who, "~/.ssh/config ProxyJump user")
    proxy_command = config.get("proxycommand")
    if proxy_command and proxy_command.lower() == "none":
        proxy_command = None
    if proxy_command:
        proxy_command = expand_proxy_command(proxy_command, hostname, resolved_port, resolved_user, host)
    known = [SYSTEM_KNOWN_HOSTS, str(user_known_hosts())]
    for extra in str(config.get("userknownhostsfile", "")).split():
        known.append(os.path.expanduser(extra))
    if extra_known_hosts:
        known.append(extra_known_hosts)
    return SSHSettings(alias=host, hostname=hostname, port=resolved_port, user=resolved_user, key_files=key_files,
                       proxy_jump=proxy_jump, proxy_command=proxy_command, known_hosts_files=known)


def parse_jump(spec: str) -> tuple[str, str | None, int | None]:
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


_parse_jump = parse_jump  # the name older callers use


def jump_hops(settings: SSHSettings, who: str) -> list[SSHSettings]:
    """The settings of each ProxyJump hop, in order (each hop validated like a target)."""
    hops = []
    for spec in (settings.proxy_jump or "").split(","):
        if not spec.strip():
            continue
        host, user, port = parse_jump(spec.strip())
        hop = _resolve(host, user, port, None, who=f"{who} (ProxyJump hop {host})")
        hop.proxy_jump = None  # the chain is walked by the caller, one hop after the other
        if hops:
            hop.proxy_command = None
        hops.append(hop)
    return hops


def known_host_keys(settings: SSHSettings) -> dict:
    """The keys the known_hosts files record for this host, by key type (the first line of a type wins;
    revoked keys left out)."""
    return KnownHosts.load(settings.known_hosts_files).keys_by_type(settings.known_hosts_name)


def _host_key_error(exc: BaseException, settings: SSHSettings, where: str, name: str) -> ConnectError | None:
    hk = settings.known_hosts_name
    trust = f"edgeq targets trust {name or settings.alias}"
    if isinstance(exc, RevokedHostKey):
        return ConnectError(
            f"{where}: host key {exc.key.get_name()} {fingerprint(exc.key)} is marked @revoked in "
            f"{exc.entry.path} line {exc.entry.lineno}; refusing to connect",
            hint="a revoked key is never trusted: the device needs a new host key (then check it and run: "
                 f"{trust})")
    if isinstance(exc, HostCertificateOnly):
        return ConnectError(
            f"{where}: host certificates are not supported: known_hosts trusts {hk} only through "
            f"@cert-authority ({exc.entry.path} line {exc.entry.lineno})",
            hint=f"check the device's key ({exc.key.get_name()} {fingerprint(exc.key)}), then record the plain "
                 f"key with: {trust}")
    if isinstance(exc, UnknownHostKey):
        return ConnectError(f"{where}: host key is not trusted (no entry for {hk} in known_hosts)",
                            hint=f"check the fingerprint, then run: {trust}")
    if isinstance(exc, paramiko.BadHostKeyException):
        offered = exc.key.get_name()
        if exc.expected_key.get_name() != offered:
            # "keys recorded, none of the offered type": OpenSSH warns loudly here too, the device's keys may
            # have been replaced.
            try:
                recorded = ", ".join(sorted(known_host_keys(settings))) or exc.expected_key.get_name()
            except ConnectError:
                recorded = exc.expected_key.get_name()
            return ConnectError(
                f"{where}: host key is not trusted (known_hosts has no key of the offered type {offered} for "
                f"{hk}, only {recorded}); refusing to connect",
                hint=f"the device offers {offered} {fingerprint(exc.key)}; if its keys were expected to change: "
                     f"ssh-keygen -R '{hk}' then {trust}")
        return ConnectError(
            f"{where}: host key has CHANGED (known_hosts has a different {exc.expected_key.get_name()} key "
            f"for {hk}); refusing to connect",
            hint=f"if the device was reinstalled: ssh-keygen -R '{hk}' then {trust}",
        )
    return None


def translate_connect_error(exc: BaseException, settings: SSHSettings, name: str, timeout: float) -> ConnectError:
    """One line naming the host for whatever went wrong while connecting."""
    where = f"{name} ({settings.where})" if name else settings.where
    host_key = _host_key_error(exc, settings, where, name)
    if host_key is not None:
        return host_key
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
    if isinstance(exc, FileNotFoundError):
        return ConnectError(f"{where}: key file not found: {exc.filename}")
    if isinstance(exc, OSError):
        return ConnectError(f"{where}: cannot connect: {exc.strerror or exc}")
    return ConnectError(f"{where}: cannot connect: {exc}")
