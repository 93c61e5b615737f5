"""``edgeq targets trust``: fetch a device's host key, show its fingerprint, record it in known_hosts.

The key is written in OpenSSH's format (``[host]:port`` for ports other than 22) so ``ssh`` and edgeq
trust the same thing. known_hosts is read with the parser the connect check uses (``known_hosts.py``):
a key that differs from the one already recorded is never overwritten, and a key marked ``@revoked`` is
never written.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import paramiko

from edgeq.errors import ConnectError
from edgeq.remote.known_hosts import KnownHosts, fingerprint, host_key_algorithms
from edgeq.remote.ssh_config import SSHSettings, resolve_settings, translate_connect_error, user_known_hosts
from edgeq.targets import Target

TRUST_TIMEOUT = 10.0


@dataclass
class TrustResult:
    """What ``trust_target`` found and did for one target."""

    target: Target
    known_hosts_name: str
    key_type: str
    fingerprint: str
    status: str  # "added" | "already-trusted"
    known_hosts: Path


def fetch_host_key(settings: SSHSettings, name: str, preferred_types: list[str] | None = None,
                   timeout: float = TRUST_TIMEOUT) -> paramiko.PKey:
    """The server's host key, from the key exchange only (no authentication, nothing trusted)."""
    if settings.proxy_jump or settings.proxy_command:
        raise ConnectError(f"{name}: trusting a host behind ProxyJump/ProxyCommand is not supported",
                           hint=f"run: ssh {settings.alias} once and accept the key, or add it with ssh-keyscan")
    try:
        sock = socket.create_connection((settings.hostname, settings.port), timeout=timeout)
    except OSError as exc:
        raise translate_connect_error(exc, settings, name, timeout) from exc
    transport = paramiko.Transport(sock)
    try:
        transport.banner_timeout = timeout
        if preferred_types:
            options = transport.get_security_options()
            known = [t for t in host_key_algorithms(preferred_types) if t in options.key_types]
            options.key_types = tuple(known + [t for t in options.key_types if t not in known])
        transport.start_client(timeout=timeout)
        return transport.get_remote_server_key()
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise translate_connect_error(exc, settings, name, timeout) from exc
    finally:
        transport.close()


def trust_target(target: Target, known_hosts: Path | None = None) -> TrustResult:
    """Fetch ``target``'s host key and append it to its known_hosts (the target's own file, else
    ``~/.ssh/known_hosts``) unless already there.

    Raises ConnectError when a *different* key of the same type is already recorded, or when keys are
    recorded for the host but none of the type the device now offers (either may be an attack, or a
    reinstalled device: the user decides and removes the old entries with ``ssh-keygen -R``), and when the
    device's key is marked ``@revoked`` in any known_hosts file.
    """
    if target.local:
        raise ConnectError("the built-in 'local' target does not use SSH; there is no host key to trust")
    settings = resolve_settings(target)
    known_hosts = known_hosts or (Path(target.known_hosts) if target.known_hosts else user_known_hosts())
    name = settings.known_hosts_name
    paths = list(dict.fromkeys([*settings.known_hosts_files, str(known_hosts)]))
    files = KnownHosts.load(paths)
    entries = files.host_keys(name)  # plain keys for the host, revoked ones left out
    key = fetch_host_key(settings, target.name, preferred_types=list(files.keys_by_type(name)))
    revoked = files.revoked(key)
    if revoked is not None:
        raise ConnectError(
            f"{target.label}: host key {key.get_name()} {fingerprint(key)} is marked @revoked in {revoked.path} "
            f"line {revoked.lineno}; not recording it",
            hint="a revoked key is never trusted: the device needs a new host key")
    if any(entry.same_key(key) for entry in entries):
        return TrustResult(target, name, key.get_name(), fingerprint(key), "already-trusted", known_hosts)
    same_type = [entry for entry in entries if entry.key.get_name() == key.get_name()]
    if same_type:
        raise ConnectError(
            f"{target.label}: host key has CHANGED: known_hosts has {fingerprint(same_type[0].key)} "
            f"({same_type[0].where}), the device now offers {fingerprint(key)}; not overwriting",
            hint=f"if the device was reinstalled: ssh-keygen -R '{name}' then edgeq targets trust {target.name}",
        )
    if entries:
        types = ", ".join(sorted({entry.key.get_name() for entry in entries}))
        raise ConnectError(
            f"{target.label}: known_hosts has a {types} key for {name}, but the device now "
            f"offers only {key.get_name()} ({fingerprint(key)}); refusing",
            hint=f"if this is expected: ssh-keygen -R '{name}' then edgeq targets trust {target.name} again",
        )
    known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    needs_newline = known_hosts.is_file() and known_hosts.stat().st_size > 0 and \
        not known_hosts.read_bytes().endswith(b"\n")
    fd = os.open(known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(("\n" if needs_newline else "") + f"{name} {key.get_name()} {key.get_base64()}\n")
    return TrustResult(target, name, key.get_name(), fingerprint(key), "added", known_hosts)
