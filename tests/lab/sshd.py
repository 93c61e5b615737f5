"""Start real OpenSSH ``sshd`` processes on loopback for tests, benchmarks and the emulated lab.

Plain Python (no pytest), so benchmarks and ``tests/lab/lab.py`` reuse it. API:

    from tests.lab.sshd import SshdDevice, start_sshd, write_inventory, trust_device

    dev = start_sshd(root_dir)          # generates keys + config in root_dir, starts sshd, waits for the port
    dev.host, dev.port, dev.user        # "127.0.0.1", free port, the user running the tests
    dev.client_key                      # Path of the ed25519 private key authorised on this sshd
    dev.host_key_line                   # "ssh-ed25519 AAAA..." (the server's public host key)
    dev.known_hosts_line()              # "[127.0.0.1]:PORT ssh-ed25519 AAAA..." for a known_hosts file
    dev.session_pids()                  # pids of per-connection sshd processes (to kill a connection)
    dev.stop()                          # kill it (also a context manager: ``with start_sshd(d) as dev``)

    write_inventory(path, {"x86-1": dev1, "x86-2": dev2}, profile="x86-avx2", python=sys.executable,
                    workdir_root=Path(...))   # an edgeq targets YAML for those devices
    trust_device(dev, known_hosts=Path.home() / ".ssh/known_hosts")   # append its key line

Works as root (``PermitRootLogin prohibit-password``) and as a normal user. Several devices may share
one client key: ``start_sshd(dir, client_key=existing_private_key_path)``.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def generate_key(path: Path, comment: str = "edgeq-test", key_type: str = "ed25519") -> Path:
    """An unencrypted key pair (ed25519 unless ``key_type`` says e.g. "ecdsa") at ``path`` / ``path.pub``."""
    if not path.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", comment, "-f", str(path)],
                       check=True, capture_output=True)
    path.chmod(0o600)
    return path


@dataclass
class SshdDevice:
    """One running sshd on loopback."""

    root: Path
    host: str
    port: int
    user: str
    client_key: Path
    host_key: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def host_key_line(self) -> str:
        """The host's public key as ``type base64`` (no comment)."""
        parts = self.host_key.with_suffix(".pub").read_text().split()
        return f"{parts[0]} {parts[1]}"

    def known_hosts_line(self) -> str:
        """A known_hosts line for this device (OpenSSH's ``[host]:port`` form; the bare host on port 22)."""
        name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        return f"{name} {self.host_key_line}"

    def session_pids(self) -> list[int]:
        """Pids of the sshd processes serving connections (descendants of the listener named sshd)."""
        if self.process is None:
            return []
        found: list[int] = []
        frontier = [self.process.pid]
        while frontier:
            parent = frontier.pop()
            try:
                children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                try:
                    comm = Path(f"/proc/{child}/comm").read_text().strip()
                except OSError:
                    continue
                if comm == "sshd":
                    found.append(child)
                    frontier.append(child)
        return found

    def kill_sessions(self) -> int:
        """SIGKILL every per-connection sshd process (drops live connections); returns how many."""
        pids = self.session_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def stop(self) -> None:
        """Stop the listener and its sessions."""
        if self.process is None:
            return
        self.kill_sessions()
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> SshdDevice:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_sshd(root: Path, *, client_key: Path | None = None, port: int | None = None,
               timeout: float = 10.0, extra_config: str = "", listen: str = "127.0.0.1",
               netns: str | None = None, sftp: bool = True, max_sessions: int = 64) -> SshdDevice:
    """Start ``sshd -D -e`` on ``listen`` (127.0.0.1) with keys and config under ``root``; wait until it
    answers. ``netns``: run it in that network namespace (its mounts are the host's; give ``listen`` and ``port``).
    ``sftp=False``: a server without the sftp subsystem; ``max_sessions``: sshd's MaxSessions."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    host_key = generate_key(root / "ssh_host_ed25519_key", "edgeq-test-host")
    client_key = generate_key(Path(client_key) if client_key else root / "client_ed25519")
    authorized = root / "authorized_keys"
    pubs = {client_key.with_suffix(".pub").read_text().strip()}
    if authorized.exists():
        pubs |= set(authorized.read_text().splitlines())
    authorized.write_text("\n".join(sorted(p for p in pubs if p)) + "\n")
    authorized.chmod(0o600)
    user = getpass.getuser()
    if os.geteuid() == 0:
        # sshd running as root insists on its privilege separation directory (a fresh container lacks it).
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
    last_error = ""
    for _attempt in range(5):  # the free port may be taken between probe and bind: retry with another
        chosen = port or free_port()
        config = root / "sshd_config"
        config.write_text(
            f"Port {chosen}\n"
            f"ListenAddress {listen}\n"
            f"HostKey {host_key}\n"
            f"PidFile {root / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {authorized}\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PermitRootLogin prohibit-password\n"
            f"AllowUsers {user}\n"
            + ("Subsystem sftp internal-sftp\n" if sftp else "")
            + f"MaxSessions {max_sessions}\n"
            "MaxStartups 64:30:128\n"
            "LogLevel ERROR\n"
            + extra_config
        )
        log = open(root / "sshd.log", "ab")  # noqa: SIM115 - handed to the child process
        # nsenter joins the network namespace only and execs sshd (the pid is sshd's). ``ip netns exec`` would
        # also give it a mount namespace of its own, where a tmpfs mounted later for a test is not seen.
        prefix = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
        process = subprocess.Popen([*prefix, SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log,
                                   stdin=subprocess.DEVNULL)
        log.close()
        device = SshdDevice(root=root, host=listen, port=chosen, user=user, client_key=client_key,
                            host_key=host_key, process=process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if _banner_ready(listen, chosen):
                return device
            time.sleep(0.05)
        if process.poll() is None:
            process.kill()
            process.wait()
        last_error = (root / "sshd.log").read_text(errors="replace")[-2000:]
        if port:
            break
    raise RuntimeError(f"sshd did not start in {root}: {last_error}")


def _banner_ready(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.settimeout(1.0)
            return sock.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def trust_device(device: SshdDevice, known_hosts: Path | None = None) -> Path:
    """Append the device's host key to ``known_hosts`` (default ``~/.ssh/known_hosts``)."""
    known_hosts = known_hosts or Path.home() / ".ssh" / "known_hosts"
    known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(known_hosts, "a", encoding="utf-8") as handle:
        handle.write(device.known_hosts_line() + "\n")
    return known_hosts


def write_inventory(path: Path, devices: dict[str, SshdDevice], *, profile: str = "x86-avx2",
                    python: str = "python3", workdir_root: Path | None = None,
                    groups: dict[str, list[str]] | None = None) -> Path:
    """Write an edgeq targets YAML for ``devices`` (name -> SshdDevice); each gets its own workdir."""
    import yaml

    targets = {}
    for name, dev in devices.items():
        entry = {"host": dev.host, "port": dev.port, "user": dev.user, "key": str(dev.client_key),
                 "profile": profile, "python": python}
        if workdir_root is not None:
            entry["workdir"] = str(Path(workdir_root) / name)
        targets[name] = entry
    data: dict = {"targets": targets}
    if groups:
        data["groups"] = groups
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
    return Path(path)
