"""known_hosts files, read line by line the way OpenSSH reads them, and the host key check on connect.

paramiko's own ``HostKeys.load`` stops at the first line it cannot handle (an ``@cert-authority`` or
``@revoked`` marker, truncated base64) and knows no wildcards, so edgeq parses the files itself:

- ``[host]:port`` names, comma-separated name lists, ``!negated`` patterns, ``*`` / ``?`` wildcards
  (case-insensitive) and hashed ``|1|salt|hash`` names, as OpenSSH matches them;
- ``@revoked``: a key on such a line is refused for every host, even where another line trusts it;
- ``@cert-authority``: paramiko cannot verify host certificates, so these lines only explain why a host
  known through nothing else is refused;
- a line OpenSSH would skip (too few fields, unknown marker, bad base64, unknown key type) is skipped with
  a warning naming the file and line; the other lines still count.

``targets trust`` (hostkeys.py) and the connect-time check (``KnownHostsPolicy``, ssh.py) use this one parser.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import paramiko

from edgeq.errors import ConnectError

log = logging.getLogger(__name__)

CERT_AUTHORITY = "@cert-authority"
REVOKED = "@revoked"
HASH_MAGIC = "|1|"

# A known_hosts "ssh-rsa" key is negotiated as one of these signature algorithms (OpenSSH servers refuse the
# SHA-1 "ssh-rsa" one by default).
ALGORITHMS_FOR_KEY_TYPE = {"ssh-rsa": ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]}


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:base64`` fingerprint of a public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def host_key_algorithms(key_types: Iterable[str]) -> list[str]:
    """The host key algorithms to ask for first, for keys of these types (known_hosts order)."""
    return list(dict.fromkeys(a for t in key_types for a in ALGORITHMS_FOR_KEY_TYPE.get(t, [t])))


@functools.lru_cache(maxsize=512)
def _pattern_regex(pattern: str) -> re.Pattern:
    """OpenSSH's ``match_pattern``: ``*`` any run of characters, ``?`` one character, nothing else special."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern),
                      re.DOTALL)


def _hashed_name_matches(name: str, hashed: str) -> bool:
    """Whether ``|1|base64(salt)|base64(HMAC-SHA1(salt, name))`` is the hash of ``name``."""
    parts = hashed.split("|")
    try:
        salt, expected = base64.b64decode(parts[2], validate=True), base64.b64decode(parts[3], validate=True)
    except (IndexError, binascii.Error, ValueError):
        return False
    return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), expected)


def host_matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether a known_hosts name list matches ``name`` (e.g. ``[10.0.0.5]:2222``), as OpenSSH's
    ``match_hostname``: a matching ``!pattern`` excludes the host whatever else matches."""
    name = name.lower()
    matched = False
    for item in patterns:
        if item.startswith(HASH_MAGIC):
            matched = matched or _hashed_name_matches(name, item)
            continue
        negated = item.startswith("!")
        pattern = item[1:] if negated else item
        if _pattern_regex(pattern.lower()).fullmatch(name):
            if negated:
                return False
            matched = True
    return matched


@dataclass(frozen=True)
class KnownHostsEntry:
    """One usable line of a known_hosts file."""

    path: str
    lineno: int
    marker: str | None  # None, "@cert-authority" or "@revoked"
    patterns: tuple[str, ...]
    key: paramiko.PKey

    @property
    def where(self) -> str:
        return f"{self.path} line {self.lineno}"

    def matches(self, name: str) -> bool:
        return host_matches(name, self.patterns)

    def same_key(self, key: paramiko.PKey) -> bool:
        return self.key.asbytes() == key.asbytes()


def _skip(path: str, lineno: int, why: str) -> None:
    log.warning("%s line %d: skipping this known_hosts line: %s", path, lineno, why)


def parse_line(line: str, path: str, lineno: int) -> KnownHostsEntry | None:
    """One known_hosts line as an entry; None for blank lines, comments and lines OpenSSH would skip
    (those are logged as a warning naming the file and line)."""
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    marker = None
    if fields[0].startswith("@"):
        marker = fields.pop(0)
        if marker not in (CERT_AUTHORITY, REVOKED):
            _skip(path, lineno, f"unknown marker {marker!r}")
            return None
    if len(fields) < 3:
        _skip(path, lineno, "too few fields (expected: [marker] names key-type base64-key [comment])")
        return None
    names, key_type, data = fields[:3]
    patterns = tuple(p for p in names.split(",") if p)
    for pattern in patterns:
        if pattern.startswith(HASH_MAGIC) and len(pattern.split("|")) != 4:
            _skip(path, lineno, "malformed hashed host name")
            return None
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        _skip(path, lineno, f"the {key_type} key is not valid base64 (truncated?)")
        return None
    try:
        key = paramiko.PKey.from_type_string(key_type, blob)
    except paramiko.UnknownKeyType:
        _skip(path, lineno, f"unknown key type {key_type!r}")
        return None
    except Exception as exc:  # paramiko's key classes raise many kinds for a mangled blob
        _skip(path, lineno, f"the {key_type} key does not parse ({type(exc).__name__}: {exc})")
        return None
    if key.asbytes() != blob:  # paramiko pads a short blob with zeros and ignores trailing bytes
        _skip(path, lineno, f"the {key_type} key is truncated or has trailing data")
        return None
    return KnownHostsEntry(path, lineno, marker, patterns, key)


@functools.lru_cache(maxsize=64)
def _parse_file(path: str, _stamp: tuple) -> tuple[KnownHostsEntry, ...]:
    """The entries of one file; cached per file version (``_stamp``) so each warning is logged once."""
    entries = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for lineno, line in enumerate(handle, 1):
            entry = parse_line(line, path, lineno)
            if entry is not None:
                entries.append(entry)
    return tuple(entries)


class KnownHosts:
    """The entries of some known_hosts files, in file and line order."""

    def __init__(self, entries: Sequence[KnownHostsEntry] = ()):
        self.entries = list(entries)

    @classmethod
    def load(cls, paths: Iterable[str | os.PathLike]) -> KnownHosts:
        """Read every file that exists; raises ConnectError naming a file that exists but cannot be read."""
        entries: list[KnownHostsEntry] = []
        for path in map(str, paths):
            try:
                info = os.stat(path)
                if not os.path.isfile(path):
                    continue
                entries.extend(_parse_file(path, (info.st_ino, info.st_size, info.st_mtime_ns)))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ConnectError(f"{path}: cannot read known_hosts: {exc.strerror or exc}") from exc
        return cls(entries)

    def revoked(self, key: paramiko.PKey) -> KnownHostsEntry | None:
        """The first ``@revoked`` line of ``key`` (whatever hosts it names), or None."""
        return next((e for e in self.entries if e.marker == REVOKED and e.same_key(key)), None)

    def host_keys(self, name: str) -> list[KnownHostsEntry]:
        """The plain (unmarked) entries for ``name`` whose key is not revoked."""
        return [e for e in self.entries
                if e.marker is None and e.matches(name) and self.revoked(e.key) is None]

    def cert_authorities(self, name: str) -> list[KnownHostsEntry]:
        return [e for e in self.entries if e.marker == CERT_AUTHORITY and e.matches(name)]

    def keys_by_type(self, name: str) -> dict[str, paramiko.PKey]:
        """The recorded keys of ``name`` by key type (the first line of a type wins)."""
        keys: dict[str, paramiko.PKey] = {}
        for entry in self.host_keys(name):
            keys.setdefault(entry.key.get_name(), entry.key)
        return keys

    def verify(self, name: str, key: paramiko.PKey) -> None:
        """Accept ``key`` for ``name`` or raise: RevokedHostKey, paramiko.BadHostKeyException (changed, or
        only keys of other types recorded), HostCertificateOnly, UnknownHostKey."""
        revoked = self.revoked(key)
        if revoked is not None:
            raise RevokedHostKey(name, key, revoked)
        recorded = self.host_keys(name)
        if any(entry.same_key(key) for entry in recorded):
            return
        same_type = [e for e in recorded if e.key.get_name() == key.get_name()]
        if same_type or recorded:
            raise paramiko.BadHostKeyException(name, key, (same_type or recorded)[0].key)
        authorities = self.cert_authorities(name)
        if authorities:
            raise HostCertificateOnly(name, key, authorities[0])
        raise UnknownHostKey(name, key)


class UnknownHostKey(paramiko.SSHException):
    """Raised by the host key policy: no known_hosts entry trusts the server's key.

    The subclasses (revoked key, host known only through a certificate authority) are "not trusted" too."""

    def __init__(self, hostname: str, key: paramiko.PKey):
        super().__init__(f"host key for {hostname} is unknown")
        self.hostname = hostname
        self.key = key


class RevokedHostKey(UnknownHostKey):
    """The server's key is on an ``@revoked`` line."""

    def __init__(self, hostname: str, key: paramiko.PKey, entry: KnownHostsEntry):
        super().__init__(hostname, key)
        self.entry = entry


class HostCertificateOnly(UnknownHostKey):
    """The host matches only ``@cert-authority`` lines, and paramiko cannot verify host certificates."""

    def __init__(self, hostname: str, key: paramiko.PKey, entry: KnownHostsEntry):
        super().__init__(hostname, key)
        self.entry = entry


class KnownHostsPolicy(paramiko.MissingHostKeyPolicy):
    """The whole host key check: the client is given no host keys of its own, so paramiko asks this policy
    about every server key, and it answers from edgeq's parsed known_hosts (``KnownHosts.verify``)."""

    def __init__(self, known: KnownHosts, name: str):
        self.known = known
        self.name = name

    def missing_host_key(self, client, hostname, key) -> None:
        self.known.verify(self.name, key)
