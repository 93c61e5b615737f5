"""An emulated arm64 Raspberry Pi for the device lab: a Debian bookworm arm64 userland run under qemu-user.

How it works:
- ``ensure_binfmt()`` mounts binfmt_misc and registers ``qemu-aarch64`` with the F (fix-binary) flag, so the
  kernel opens the static qemu binary once at registration and arm64 programs run in any chroot without a
  qemu binary inside it.
- ``ensure_root()`` builds a minbase arm64 root with debootstrap (python3, python3-venv, openssh-server,
  ca-certificates, mender-client) once and caches it OUTSIDE the repository (``$EDGEQ_LAB_CACHE`` or
  ``/var/cache/edgeq-lab``), keyed by ``ROOT_VERSION`` so a change to the recipe rebuilds it.
- ``RpiEmu(state_dir)`` is one running device: an overlay of the cached root (writes go to
  ``state_dir/upper``, so the cache stays pristine; a plain copy where overlayfs is not available), with
  ``/proc``, ``/sys`` and a private ``/dev`` mounted into it, and the arm64 ``sshd`` from the root running
  inside it on a free loopback port. Host and client keys are generated on the host and written into the
  root; the host key is recorded in ``state_dir/known_hosts`` (never in ``~/.ssh``).

Why a private ``/dev`` (tmpfs + a few device nodes + its own devpts instance) instead of a bind mount of the
host's ``/dev``: a stale bind mount of ``/dev`` under a directory that someone later removes with ``rm -rf``
(pytest's tmp cleanup, ``rm -rf .lab``) deletes the host's device nodes. Nothing of the host is writable
through the mounts made here: ``/sys`` is read-only, ``/proc`` and devpts refuse unlinks, the rest is ours.

Everything needs root. ``unavailable_reason()`` says, in one line, why the emulated device cannot run here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SUITE = "bookworm"
ARCH = "arm64"
# mender-client: the real Mender client on an arm64 device, for `edgeq package --mender` (tests/test_emulated.py).
PACKAGES = ("python3", "python3-venv", "openssh-server", "ca-certificates", "mender-client")
# Bump when the build recipe below changes; the cache key also hashes suite, arch and packages.
RECIPE_REVISION = "1"
ROOT_VERSION = "{}-{}-{}".format(
    SUITE,
    ARCH,
    hashlib.sha256(f"{RECIPE_REVISION}|{SUITE}|{ARCH}|{','.join(PACKAGES)}".encode()).hexdigest()[:10],
)
DEFAULT_CACHE = Path("/var/cache/edgeq-lab")
QEMU = Path("/usr/bin/qemu-aarch64-static")
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_NAME = "qemu-aarch64"
# Same magic/mask as Debian's /usr/share/binfmts/qemu-aarch64: ELF64, little endian, e_machine 0xb7 (AArch64).
BINFMT_MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
BINFMT_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
SSHD_CONFIG_IN_ROOT = "/etc/ssh/sshd_config_edgeq"
HOST_KEY_IN_ROOT = "/etc/ssh/edgeq_host_ed25519_key"
SSHD_START_TIMEOUT = 60.0  # sshd under qemu-user takes a few seconds to come up; allow for a busy 2-core box
# The CPU qemu emulates: a Raspberry Pi 4's Cortex-A72 (ARMv8.0-A, NEON, no dot product), like the rpi4 profile.
# qemu's default ("max") advertises dotprod/i8mm/SVE; with it, LiteRT's optimized kernels gave different INT8
# outputs under qemu 7.2 (measured: the digits model's outputs differ from the host's and from cortex-a72's).
# qemu-user reads QEMU_CPU from the environment of every program it starts, so sshd passes it to sessions.
QEMU_CPU = "cortex-a72"
DEVICE_NODES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}


class LabError(Exception):
    """The emulated device cannot be built, started or stopped; the message says why in one line."""


# ---------------------------------------------------------------------------------------------------------
# Preconditions and binfmt_misc
# ---------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where built roots are cached: ``$EDGEQ_LAB_CACHE`` or ``/var/cache/edgeq-lab``."""
    return Path(os.environ.get("EDGEQ_LAB_CACHE") or DEFAULT_CACHE)


def unavailable_reason() -> str | None:
    """None when an emulated arm64 device can run here, else one line saying what is missing."""
    if os.uname().machine == "aarch64":
        return "this machine is aarch64 already; the emulated device is for x86 controllers"
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, mounts and binfmt_misc registration)"
    if not QEMU.exists():
        return f"{QEMU} is missing (apt-get install qemu-user-static)"
    if shutil.which("debootstrap") is None and not _cached_root_ready():
        return "debootstrap is missing (apt-get install debootstrap) and no cached root exists"
    for tool in ("chroot", "mount", "umount", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not on PATH"
    try:
        ensure_binfmt()
    except LabError as exc:
        return str(exc)
    return None


def _binfmt_mounted() -> bool:
    return (BINFMT_DIR / "register").exists()


def ensure_binfmt() -> None:
    """Mount binfmt_misc if needed and make sure qemu-aarch64 is registered, enabled and has the F flag."""
    if not _binfmt_mounted():
        proc = subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], capture_output=True, text=True
        )
        if proc.returncode != 0 or not _binfmt_mounted():
            raise LabError(
                f"binfmt_misc cannot be mounted at {BINFMT_DIR}: {proc.stderr.strip() or 'no register file'}"
                " (the kernel needs CONFIG_BINFMT_MISC and the container needs CAP_SYS_ADMIN)"
            )
    entry = BINFMT_DIR / BINFMT_NAME
    if entry.exists():
        text = entry.read_text()
        flags = re.search(r"^flags: *(\S*)", text, re.M)
        if text.startswith("enabled") and flags and "F" in flags.group(1):
            return
        # Registered without F (or disabled): qemu would be looked up inside the chroot. Re-register.
        try:
            entry.write_text("-1")
        except OSError as exc:
            raise LabError(f"cannot remove the existing {entry} registration (it lacks the F flag): {exc}") from exc
    registration = f":{BINFMT_NAME}:M::{BINFMT_MAGIC}:{BINFMT_MASK}:{QEMU}:FP"
    try:
        (BINFMT_DIR / "register").write_text(registration)
    except OSError as exc:
        raise LabError(f"cannot register {BINFMT_NAME} in {BINFMT_DIR}/register: {exc}") from exc
    if not entry.exists():
        raise LabError(f"registering {BINFMT_NAME} left no {entry}")


# ---------------------------------------------------------------------------------------------------------
# Mount bookkeeping (shared by the root build and the running device)
# ---------------------------------------------------------------------------------------------------------


def _decode_mountinfo_path(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mountinfo), deepest first."""
    base = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = _decode_mountinfo_path(line.split()[4])
            if point == base or point.startswith(base.rstrip("/") + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def unmount_all_under(path: Path) -> None:
    """Unmount everything at or below ``path``; a busy mount is detached lazily rather than left behind."""
    for _attempt in range(3):
        points = mounts_under(path)
        if not points:
            return
        for point in points:
            proc = subprocess.run(["umount", point], capture_output=True, text=True)
            if proc.returncode != 0:
                log.warning("umount %s failed (%s); detaching lazily", point, proc.stderr.strip())
                subprocess.run(["umount", "-l", point], capture_output=True, text=True)
    left = mounts_under(path)
    if left:
        raise LabError(f"could not unmount {', '.join(left)}")


def _mount(argv: list[str]) -> None:
    proc = subprocess.run(["mount", *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"mount {' '.join(argv)} failed: {proc.stderr.strip()}")


def _safe_rmtree(path: Path) -> None:
    """Remove a directory tree only after everything mounted inside it is gone."""
    if path.exists():
        unmount_all_under(path)
        shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------------------
# The cached root file system
# ---------------------------------------------------------------------------------------------------------


def _cache_entry() -> Path:
    return cache_dir() / f"rpi-emu-{ROOT_VERSION}"


def _cached_root_ready() -> bool:
    return (_cache_entry() / "READY").exists()


def debian_mirror() -> str:
    """The Debian mirror apt already uses here (``$EDGEQ_LAB_MIRROR`` overrides), else deb.debian.org."""
    override = os.environ.get("EDGEQ_LAB_MIRROR")
    if override:
        return override
    candidates: list[str] = []
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        if not source.is_file() or "disabled" in source.name:
            continue
        text = source.read_text(errors="replace")
        candidates += re.findall(r"^URIs:\s*(\S+)", text, re.M)
        candidates += re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", text, re.M)
    for uri in candidates:
        if uri.rstrip("/").endswith("/debian") and uri.startswith(("http://", "https://")):
            return uri
    return "http://deb.debian.org/debian"


@dataclass
class RootInfo:
    path: Path  # the pristine root directory (never written to after the build)
    built_now: bool
    seconds: float  # build time when built now, else the time it took to find the cached one
    stamp: dict


def ensure_root(progress=None) -> RootInfo:
    """Return the cached pristine arm64 root, building it first when missing (about 3-5 minutes).

    Concurrent callers serialise on a lock file, so two lab starts never build twice.
    """
    started = time.monotonic()
    entry = _cache_entry()
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f"rpi-emu-{ROOT_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (entry / "READY").exists():
            stamp = json.loads((entry / "READY").read_text())
            return RootInfo(entry / "root", False, time.monotonic() - started, stamp)
        if shutil.which("debootstrap") is None:
            raise LabError("debootstrap is missing (apt-get install debootstrap)")
        ensure_binfmt()
        partial = entry.parent / f"rpi-emu-{ROOT_VERSION}.partial"
        _safe_rmtree(partial)
        _safe_rmtree(entry)
        root = partial / "root"
        root.mkdir(parents=True)
        mirror = debian_mirror()
        argv = [
            "debootstrap", f"--arch={ARCH}", "--variant=minbase", f"--include={','.join(PACKAGES)}",
            SUITE, str(root), mirror,
        ]
        if progress:
            progress(f"building the arm64 root ({' '.join(argv)}); cached in {entry} afterwards")
        build_log = partial / "debootstrap.log"
        with open(build_log, "w") as out:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # debootstrap mounts /proc and /sys inside the target and can leave them behind on failure.
        unmount_all_under(partial)
        if proc.returncode != 0:
            tail = build_log.read_text(errors="replace").strip().splitlines()[-5:]
            raise LabError(f"debootstrap failed (exit {proc.returncode}); see {build_log}: {' | '.join(tail)}")
        _finish_root(root)
        seconds = time.monotonic() - started
        stamp = {
            "version": ROOT_VERSION, "suite": SUITE, "arch": ARCH, "packages": list(PACKAGES),
            "mirror": mirror, "build_seconds": round(seconds, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (partial / "READY").write_text(json.dumps(stamp, indent=2) + "\n")
        partial.rename(entry)
        return RootInfo(entry / "root", True, seconds, stamp)


def _finish_root(root: Path) -> None:
    """Make the freshly bootstrapped root generic: no baked-in host keys, no package cache."""
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    (root / "run/sshd").mkdir(parents=True, exist_ok=True)
    (root / "root/.ssh").mkdir(mode=0o700, parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------------------
# One running emulated device
# ---------------------------------------------------------------------------------------------------------


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_for_ssh_banner(port: int, timeout: float, alive) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        if not alive():
            raise LabError("sshd inside the emulated device exited during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.settimeout(10)
                if sock.recv(64).startswith(b"SSH-2.0-"):
                    return
                last_error = "no SSH banner"
        except OSError as exc:
            last_error = str(exc)
        time.sleep(0.5)
    raise LabError(f"sshd inside the emulated device did not answer on 127.0.0.1:{port} within {timeout:.0f}s "
                   f"({last_error})")


def processes_rooted_at(root: Path) -> list[int]:
    """PIDs whose root directory is ``root`` (everything we started inside the chroot)."""
    target = os.path.realpath(root)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "root") == target:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


@dataclass
class DeviceInfo:
    """How to reach a started device: what an inventory entry needs."""

    host: str
    port: int
    user: str
    key: Path
    known_hosts: Path
    known_hosts_line: str
    root: Path
    pid: int
    start_seconds: float
    root_info: RootInfo


class RpiEmu:
    """One emulated arm64 device whose state (keys, overlay, pidfile, logs) lives in ``state_dir``."""

    user = "root"
    host = "127.0.0.1"

    def __init__(self, state_dir: Path, client_key: Path | None = None):
        self.state_dir = Path(state_dir).resolve()
        self.root = self.state_dir / "root"
        self.upper = self.state_dir / "upper"
        self.overlay_work = self.state_dir / "work"
        self.client_key = Path(client_key) if client_key else self.state_dir / "id_ed25519"
        self.host_key = self.state_dir / "host_ed25519_key"
        self.known_hosts = self.state_dir / "known_hosts"
        self.pidfile = self.state_dir / "sshd.pid"
        self.sshd_log = self.state_dir / "sshd.log"
        self.info_file = self.state_dir / "device.json"

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self, progress=None, port: int | None = None) -> DeviceInfo:
        """Build or reuse the cached root, mount the device's root, start its sshd; idempotent after a crash.

        ``port``: the loopback port to listen on when it is free (keeps known_hosts entries stable across
        restarts); otherwise a free one.
        """
        reason = unavailable_reason()
        if reason:
            raise LabError(f"the emulated arm64 device cannot run here: {reason}")
        self.stop()  # clean whatever a crashed run left behind (processes first, then mounts)
        started = time.monotonic()
        root_info = ensure_root(progress)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        mode = self._mount_root(root_info)
        try:
            self._mount_kernel_filesystems()
            self._write_network_config()
            port = port if port and port_is_free(port) else free_loopback_port()
            self._write_keys_and_config(port)
            pid = self._start_sshd()
            _wait_for_ssh_banner(port, SSHD_START_TIMEOUT, lambda: pid_alive(pid))
        except BaseException:
            self.stop()
            raise
        host_line = f"[{self.host}]:{port} {self._host_public_key()}"
        self.known_hosts.write_text(host_line + "\n")
        seconds = time.monotonic() - started
        self.info_file.write_text(json.dumps({
            "root_version": ROOT_VERSION, "mode": mode, "port": port, "pid": pid,
            "start_seconds": round(seconds, 1), "root_built_now": root_info.built_now,
        }, indent=2) + "\n")
        return DeviceInfo(self.host, port, self.user, self.client_key, self.known_hosts, host_line, self.root,
                          pid, seconds, root_info)

    def stop(self) -> list[str]:
        """Stop every process inside the device, then unmount everything; returns what it did."""
        done = []
        if self.pidfile.exists():
            with contextlib.suppress(ValueError, OSError):
                pid = int(self.pidfile.read_text().strip())
                if pid in processes_rooted_at(self.root):
                    os.kill(pid, signal.SIGTERM)
                    done.append(f"stopped sshd (pid {pid})")
            self.pidfile.unlink(missing_ok=True)
        if self.root.exists():
            pids = processes_rooted_at(self.root)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(pid_alive(p) for p in processes_rooted_at(self.root)):
                time.sleep(0.2)
            for pid in processes_rooted_at(self.root):
                if pid_alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if pids:
                done.append(f"ended {len(pids)} process(es) inside the device")
            # Reap our own children (when started from this process) so they don't linger as zombies.
            for pid in pids:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)
        points = mounts_under(self.state_dir)
        if points:
            unmount_all_under(self.state_dir)
            done.append(f"unmounted {len(points)} mount(s)")
        return done

    def status(self) -> dict:
        """What runs: sshd pid and port, mounts, the root version; never starts anything."""
        info = json.loads(self.info_file.read_text()) if self.info_file.exists() else {}
        pid = None
        if self.pidfile.exists():
            with contextlib.suppress(ValueError):
                pid = int(self.pidfile.read_text().strip())
        running = bool(pid) and pid in processes_rooted_at(self.root) and pid_alive(pid)
        return {
            "running": running, "pid": pid if running else None, "port": info.get("port"),
            "mode": info.get("mode"), "root_version": info.get("root_version"),
            "mounts": len(mounts_under(self.state_dir)), "state_dir": str(self.state_dir),
        }

    def destroy(self) -> None:
        """Stop the device and delete its state (keys, overlay upper layer) but not the cached root."""
        self.stop()
        _safe_rmtree(self.state_dir)

    def run(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        """Run an argv inside the device directly (chroot, no SSH); for diagnostics and tests."""
        return subprocess.run(["chroot", str(self.root), *argv], capture_output=True, text=True, timeout=timeout,
                              env=_device_env())

    # -- steps ---------------------------------------------------------------------------------------------

    def _mount_root(self, root_info: RootInfo) -> str:
        """Overlay of the pristine root (writes land in ``upper``); a copy where overlayfs cannot be used.

        The upper layer survives ``stop``/``start`` (like a real device's disk: a venv made by
        ``targets setup`` stays), unless the cached root changed underneath it.
        """
        info = json.loads(self.info_file.read_text()) if self.info_file.exists() else {}
        if info.get("root_version") != ROOT_VERSION:
            for stale in (self.upper, self.overlay_work, self.root):
                _safe_rmtree(stale)
        if info.get("mode") != "copy":
            for directory in (self.upper, self.overlay_work, self.root):
                directory.mkdir(parents=True, exist_ok=True)
            options = f"lowerdir={root_info.path},upperdir={self.upper},workdir={self.overlay_work}"
            proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(self.root)],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                return "overlay"
            log.warning("overlayfs unavailable (%s); copying the root instead", proc.stderr.strip())
            for stale in (self.upper, self.overlay_work, self.root):
                _safe_rmtree(stale)
        if not (self.root / "usr").exists():
            self.root.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", "--reflink=auto", f"{root_info.path}/.", str(self.root)], check=True)
        # Record the mode now so a later start after a crash reuses the copy.
        self.info_file.write_text(json.dumps({"root_version": ROOT_VERSION, "mode": "copy"}) + "\n")
        return "copy"

    def _mount_kernel_filesystems(self) -> None:
        root = self.root
        _mount(["-t", "proc", "-o", "nosuid,nodev,noexec", "proc", str(root / "proc")])
        # qemu 7.2 passes the host's x86 /proc/cpuinfo through to arm64 programs. LiteRT's cpuinfo library
        # segfaults in Interpreter() when it sees that next to /sys, and it would describe the wrong CPU
        # anyway: show the CPU that is emulated (QEMU_CPU), one entry per CPU in /sys, as a Pi 4 shows it.
        cpuinfo = self.state_dir / "cpuinfo"
        cpuinfo.write_text(emulated_cpuinfo(os.cpu_count() or 1))
        _mount(["--bind", str(cpuinfo), str(root / "proc/cpuinfo")])
        _mount(["-o", "remount,bind,ro", str(root / "proc/cpuinfo")])
        # The host's binfmt_misc, read-only: a program inside can see that it runs under qemu-user (the
        # runner's emulation check reads /proc/sys/fs/binfmt_misc/qemu-aarch64).
        binfmt = root / "proc/sys/fs/binfmt_misc"
        if binfmt.is_dir() and _binfmt_mounted():
            _mount(["--bind", str(BINFMT_DIR), str(binfmt)])
            _mount(["-o", "remount,bind,ro", str(binfmt)])
        _mount(["-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs", str(root / "sys")])
        dev = root / "dev"
        _mount(["-t", "tmpfs", "-o", "mode=755,nosuid,size=8m", "edgeq-lab-dev", str(dev)])
        for name, (major, minor) in DEVICE_NODES.items():
            node = dev / name
            try:
                os.mknod(node, 0o666 | 0o020000, os.makedev(major, minor))
                os.chmod(node, 0o666)
            except PermissionError:
                # No mknod (e.g. a container's device cgroup): bind the host's node onto a placeholder file.
                node.touch()
                _mount(["--bind", f"/dev/{name}", str(node)])
        for name, target in {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
                             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}.items():
            os.symlink(target, dev / name)
        (dev / "pts").mkdir()
        _mount(["-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=620,gid=5", "devpts", str(dev / "pts")])
        (dev / "shm").mkdir()
        _mount(["-t", "tmpfs", "-o", "mode=1777,nosuid,nodev,size=256m", "edgeq-lab-shm", str(dev / "shm")])
        (root / "tmp").chmod(0o1777)

    def _write_network_config(self) -> None:
        """The chroot shares the host's network; give it the host's resolver so pip reaches PyPI."""
        resolv = self.root / "etc/resolv.conf"
        if resolv.is_symlink() or resolv.exists():
            resolv.unlink()
        host_resolv = Path("/etc/resolv.conf")
        resolv.write_text(host_resolv.read_text() if host_resolv.exists() else "nameserver 127.0.0.53\n")
        (self.root / "etc/hostname").write_text("rpi-emu\n")
        hosts = self.root / "etc/hosts"
        text = hosts.read_text() if hosts.exists() else "127.0.0.1\tlocalhost\n"
        if "rpi-emu" not in text:
            hosts.write_text(text.rstrip("\n") + "\n127.0.1.1\trpi-emu\n")
        # Trust what the host trusts: where outbound HTTPS goes through a TLS-inspecting proxy, its CA is in
        # the host's bundle, and a device on the same network needs it too (as a real Pi would). pip
        # otherwise uses its own certifi bundle, so point it at the system store like the host's pip.
        host_bundle = Path("/etc/ssl/certs/ca-certificates.crt")
        if host_bundle.is_file():
            device_bundle = self.root / "etc/ssl/certs/ca-certificates.crt"
            device_bundle.parent.mkdir(parents=True, exist_ok=True)
            if device_bundle.is_symlink():
                device_bundle.unlink()
            shutil.copyfile(host_bundle, device_bundle)
            (self.root / "etc/pip.conf").write_text(
                "# Written by tests/lab/rpi_emu.py: use the system CA store (a copy of the host's).\n"
                "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"
            )

    def _write_keys_and_config(self, port: int) -> None:
        client_keypair(self.client_key)
        if not self.host_key.exists():
            _keygen(self.host_key, "rpi-emu-host")
        etc_ssh = self.root / "etc/ssh"
        shutil.copyfile(self.host_key, self.root / HOST_KEY_IN_ROOT.lstrip("/"))
        os.chmod(self.root / HOST_KEY_IN_ROOT.lstrip("/"), 0o600)
        shutil.copyfile(self.host_key.with_suffix(".pub"), self.root / (HOST_KEY_IN_ROOT.lstrip("/") + ".pub"))
        ssh_dir = self.root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        os.chmod(ssh_dir / "authorized_keys", 0o600)
        (self.root / "run/sshd").mkdir(parents=True, exist_ok=True)
        (etc_ssh / Path(SSHD_CONFIG_IN_ROOT).name).write_text(
            "# Written by tests/lab/rpi_emu.py for the edgeq device lab.\n"
            f"Port {port}\n"
            f"ListenAddress {self.host}\n"
            f"HostKey {HOST_KEY_IN_ROOT}\n"
            "PidFile none\n"
            "AuthorizedKeysFile /root/.ssh/authorized_keys\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "PermitRootLogin prohibit-password\n"
            "StrictModes no\n"
            "UseDNS no\n"
            # internal-sftp: no extra arm64 process to start per SFTP session under emulation.
            "Subsystem sftp internal-sftp\n"
            "MaxStartups 50:30:100\n"
            "MaxSessions 50\n"
            "LoginGraceTime 120\n"
            "ClientAliveInterval 30\n"
            "AcceptEnv LANG LC_*\n"
            + _setenv_line()
        )

    def _start_sshd(self) -> int:
        with open(self.sshd_log, "ab") as out:
            proc = subprocess.Popen(
                ["chroot", str(self.root), "/usr/sbin/sshd", "-D", "-e", "-f", SSHD_CONFIG_IN_ROOT],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives `lab.py up`; `down` finds it through the pidfile
                env=_device_env(),
            )
        self.pidfile.write_text(f"{proc.pid}\n")
        return proc.pid

    def _host_public_key(self) -> str:
        key_type, key_body = self.host_key.with_suffix(".pub").read_text().split()[:2]
        return f"{key_type} {key_body}"


def _setenv_line() -> str:
    """sshd's ``SetEnv`` for sessions: the emulated CPU, and the host's proxy variables so the device's pip
    goes out the way the host's does."""
    names = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
    pairs = [f"QEMU_CPU={QEMU_CPU}"]
    pairs += [f"{name}={os.environ[name]}" for name in names
              if os.environ.get(name) and not any(c.isspace() or c == '"' for c in os.environ[name])]
    return f"SetEnv {' '.join(pairs)}\n"


def emulated_cpuinfo(count: int) -> str:
    """/proc/cpuinfo of ``count`` Cortex-A72 cores as a Raspberry Pi 4's kernel shows it (no Hardware line)."""
    block = ("processor\t: {index}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
             "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
             "CPU revision\t: 3\n\n")
    return "".join(block.format(index=index) for index in range(count))


def _device_env() -> dict:
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
            "LANG": "C.UTF-8", "QEMU_CPU": QEMU_CPU}


def client_keypair(path: Path) -> Path:
    """An unencrypted ed25519 client key at ``path`` (+ ``.pub``), generated when missing."""
    if not path.exists():
        _keygen(path, "edgeq-lab-client")
    return path


def _keygen(path: Path, comment: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    os.chmod(path, 0o600)
