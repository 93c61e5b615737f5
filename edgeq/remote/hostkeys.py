"""``edgeq targets trust``: fetch a device's host key, show its fingerprint, record it in known_hosts.

The key is written in OpenSSH's format (``[host]:port`` for ports other than 22) so ``ssh`` and edgeq
trust the same thing. A key that differs from the one already recorded is never overwritten.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import paramiko

from edgeq.errors import ConnectError
from edgeq.remote.ssh import (
    SSHSettings,
    fingerprint,
    known_host_keys,
    resolve_settings,
    translate_connect_error,
    user_known_hosts,
)
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


# A known_hosts "ssh-rsa" key is negotiated as one of these signature algorithms (OpenSSH servers refuse the
# SHA-1 "ssh-rsa" one by default).
_ALGORITHMS_FOR_KEY_TYPE = {"ssh-rsa": ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]}


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
            wanted = [a for t in preferred_types for a in _ALGORITHMS_FOR_KEY_TYPE.get(t, [t])]
            known = [t for t in wanted if t in options.key_types]
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
    reinstalled device: the user decides and removes the old entries with ``ssh-keygen -R``).
    """
    if target.local:
        raise ConnectError("the built-in 'local' target does not use SSH; there is no host key to trust")
    settings = resolve_settings(target)
    known_hosts = known_hosts or (Path(target.known_hosts) if target.known_hosts else user_known_hosts())
    known = known_host_keys(settings)
    key = fetch_host_key(settings, target.name, preferred_types=list(known))
    name = settings.known_hosts_name
    recorded = known.get(key.get_name())
    if known and recorded is None:
        raise ConnectError(
            f"{target.label}: known_hosts has a {', '.join(sorted(known))} key for {name}, but the device now "
            f"offers only {key.get_name()} ({fingerprint(key)}); refusing",
            hint=f"if this is expected: ssh-keygen -R '{name}' then edgeq targets trust {target.name} again",
        )
    if recorded is not None:
        if recorded.asbytes() == key.asbytes():
            return TrustResult(target, name, key.get_name(), fingerprint(key), "already-trusted", known_hosts)
        raise ConnectError(
            f"{target.label}: host key has CHANGED: known_hosts has {fingerprint(recorded)}, the device now "
            f"offers {fingerprint(key)}; not overwriting",
            hint=f"if the device was reinstalled: ssh-keygen -R '{name}' then edgeq targets trust {target.name}",
        )
    known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    needs_newline = known_hosts.is_file() and known_hosts.stat().st_size > 0 and \
        not known_hosts.read_bytes().endswith(b"\n")
    fd = os.open(known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(("\n" if needs_newline else "") + f"{name} {key.get_name()} {key.get_base64()}\n")
    return TrustResult(target, name, key.get_name(), fingerprint(key), "added", known_hosts)
