"""``edgeq targets trust``: fetch a device's host key, show its fingerprint, record it in known_hosts.

The key is written in OpenSSH's format (``[host]:port`` for ports other than 22) so ``ssh`` and edgeq
trust the same thing. known_hosts is read with the parser the connect check uses (``known_hosts.py``):
a key that differs from the one already recorded is never overwritten, and a key marked ``@revoked`` is
never written. With a pinned fingerprint (``--fingerprint SHA256:...``, read off the device's console or its
provisioning record) only the key with that fingerprint is accepted, and it replaces the host's old entries in
the file edgeq writes: the safe way to re-key a reinstalled device.
"""

from __future__ import annotations

import os
import re
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
    status: str  # "added" | "already-trusted" | "replaced"
    known_hosts: Path
    replaced: int = 0  # old entries removed for a pinned key


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


# Host key types to ask a device for, one at a time, when looking for the key with a pinned fingerprint.
PINNABLE_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa")
_FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")


def _pinned_key(settings: SSHSettings, target: Target, pinned: str) -> paramiko.PKey:
    """The device's host key whose fingerprint is ``pinned``; ConnectError naming what it offers otherwise."""
    offered: dict[str, paramiko.PKey] = {}
    for key_type in PINNABLE_TYPES:
        key = fetch_host_key(settings, target.name, preferred_types=[key_type])
        offered.setdefault(fingerprint(key), key)
        if pinned in offered:
            return offered[pinned]
    listing = ", ".join(f"{k.get_name()} {f}" for f, k in offered.items())
    raise ConnectError(f"{target.label}: no host key with the pinned fingerprint {pinned}; the device offers "
                       f"{listing}; not recording anything",
                       hint="check the fingerprint on the device itself (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub)")


def _remove_entries(known_hosts: Path, entries: list, target: Target, name: str) -> int:
    """Delete the host's old lines from ``known_hosts`` (only lines naming this host alone)."""
    ours = [e for e in entries if Path(e.path) == known_hosts]
    others = [e for e in entries if Path(e.path) != known_hosts or len(e.patterns) != 1]
    if others:
        raise ConnectError(f"{target.label}: the old key is recorded at {others[0].where}, which edgeq does not "
                           "edit; not replacing it", hint=f"remove it with ssh-keygen -R '{name}' -f {others[0].path}")
    drop = {e.lineno for e in ours}
    lines = known_hosts.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for number, line in enumerate(lines, start=1) if number not in drop]
    temp = known_hosts.with_name(f".{known_hosts.name}.edgeq-tmp-{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.writelines(kept)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, known_hosts)
    return len(drop)


def trust_target(target: Target, known_hosts: Path | None = None, pinned: str | None = None) -> TrustResult:
    """Fetch ``target``'s host key and append it to its known_hosts (the target's own file, else
    ``~/.ssh/known_hosts``) unless already there.

    Raises ConnectError when a *different* key of the same type is already recorded, or when keys are
    recorded for the host but none of the type the device now offers (either may be an attack, or a
    reinstalled device: the user decides and removes the old entries with ``ssh-keygen -R``), and when the
    device's key is marked ``@revoked`` in any known_hosts file. With ``pinned`` (an OpenSSH
    ``SHA256:...`` fingerprint) only that key is accepted, and it replaces the host's old entries.
    """
    if pinned is not None and not _FINGERPRINT.match(pinned):
        raise ConnectError(f"--fingerprint '{pinned}' is not an OpenSSH SHA256 fingerprint",
                           hint="it looks like SHA256: followed by 43 base64 characters (ssh-keygen -lf KEY.pub)")
    if target.local:
        raise ConnectError("the built-in 'local' target does not use SSH; there is no host key to trust")
    settings = resolve_settings(target)
    known_hosts = known_hosts or (Path(target.known_hosts) if target.known_hosts else user_known_hosts())
    name = settings.known_hosts_name
    paths = list(dict.fromkeys([*settings.known_hosts_files, str(known_hosts)]))
    files = KnownHosts.load(paths)
    entries = files.host_keys(name)  # plain keys for the host, revoked ones left out
    key = _pinned_key(settings, target, pinned) if pinned else \
        fetch_host_key(settings, target.name, preferred_types=list(files.keys_by_type(name)))
    revoked = files.revoked(key)
    if revoked is not None:
        raise ConnectError(
            f"{target.label}: host key {key.get_name()} {fingerprint(key)} is marked @revoked in {revoked.path} "
            f"line {revoked.lineno}; not recording it",
            hint="a revoked key is never trusted: the device needs a new host key")
    if any(entry.same_key(key) for entry in entries):
        return TrustResult(target, name, key.get_name(), fingerprint(key), "already-trusted", known_hosts)
    replaced = 0
    if pinned and entries:  # the user vouched for this key out of band: it replaces the old ones
        replaced = _remove_entries(known_hosts, entries, target, name)
        entries = []
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
    return TrustResult(target, name, key.get_name(), fingerprint(key), "replaced" if replaced else "added",
                       known_hosts, replaced)
