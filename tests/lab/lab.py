"""The device lab: start/stop the test devices and write ``.lab/inventory.yaml``.

    python tests/lab/lab.py up       # x86-1, x86-2 (sshd on loopback) + rpi-emu (arm64 under qemu), group `lab`
    python tests/lab/lab.py down     # stop every device, unmount the emulated root
    python tests/lab/lab.py status   # what runs

``make lab-up`` / ``make lab-down`` call this. Everything lives under ``.lab/`` (gitignored): the shared
client key, each device's state, ``known_hosts`` with every device's host key, and ``inventory.yaml``.
The devices outlive ``up`` (own session); ``down`` finds them by their pidfiles. ``--no-rpi`` skips the
emulated device (which needs root, binfmt_misc and qemu-user-static).

The library API, for tests: ``start_lab(state_dir, with_rpi=True) -> dict`` and ``stop_lab(state_dir)``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.lab import rpi_emu  # noqa: E402
from tests.lab.sshd import start_sshd  # noqa: E402

X86_DEVICES = ("x86-1", "x86-2")
RPI_NAME = "rpi-emu"
RPI_WORKDIR = "/root/.edgeq"
X86_PROFILE = "x86-avx2"
RPI_PROFILE = "rpi4"
GROUP = "lab"


def default_state_dir() -> Path:
    return REPO / ".lab"


def project_python() -> str:
    """The project venv's interpreter (so the x86 devices import the runtimes), else this interpreter."""
    venv_python = REPO / ".venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


def _say(message: str) -> None:
    print(f"lab: {message}", flush=True)


def start_lab(state_dir: Path, *, with_rpi: bool = True, progress=_say) -> dict:
    """Start every lab device, write ``inventory.yaml`` and ``known_hosts`` into ``state_dir``; return a summary.

    Stops whatever a previous (possibly crashed) run left first, so calling it twice is safe.
    """
    state_dir = Path(state_dir).resolve()
    stop_lab(state_dir, progress=lambda _m: None)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    client_key = rpi_emu.client_keypair(state_dir / "id_ed25519")
    # Reuse last time's ports when free, so host key entries (`[127.0.0.1]:PORT`) stay valid across restarts.
    ports_file = state_dir / "ports.json"
    ports = json.loads(ports_file.read_text()) if ports_file.exists() else {}
    known_hosts: list[str] = []
    targets: dict[str, dict] = {}
    summary: dict = {"state_dir": str(state_dir), "devices": {}}

    try:
        for name in X86_DEVICES:
            started = time.monotonic()
            port = ports.get(name)
            device = start_sshd(state_dir / name, client_key=client_key,
                                port=port if port and rpi_emu.port_is_free(port) else None)
            # start_sshd's child belongs to our session; detach happens at the CLI level (see main()).
            known_hosts.append(device.known_hosts_line())
            targets[name] = {
                "host": device.host, "port": device.port, "user": device.user, "key": str(client_key),
                "profile": X86_PROFILE, "workdir": str(state_dir / "workdirs" / name), "python": project_python(),
            }
            summary["devices"][name] = {"port": device.port, "pid": device.process.pid,
                                        "start_seconds": round(time.monotonic() - started, 2)}
            progress(f"{name}: sshd on 127.0.0.1:{device.port} (pid {device.process.pid})")

        if with_rpi:
            emu = rpi_emu.RpiEmu(state_dir / RPI_NAME, client_key=client_key)
            info = emu.start(progress=progress, port=ports.get(RPI_NAME))
            known_hosts.append(info.known_hosts_line)
            targets[RPI_NAME] = {
                "host": info.host, "port": info.port, "user": info.user, "key": str(client_key),
                "profile": RPI_PROFILE, "workdir": RPI_WORKDIR, "python": "python3",
            }
            summary["devices"][RPI_NAME] = {
                "port": info.port, "pid": info.pid, "start_seconds": round(info.start_seconds, 1),
                "root_built_now": info.root_info.built_now, "root": str(info.root_info.path),
            }
            built = (f"built the arm64 root in {info.root_info.seconds:.0f}s" if info.root_info.built_now
                     else "cached arm64 root")
            progress(f"{RPI_NAME}: arm64 sshd on 127.0.0.1:{info.port} (pid {info.pid}; {built}; "
                     f"up in {info.start_seconds:.1f}s)")
    except BaseException:
        stop_lab(state_dir, progress=lambda _m: None)
        raise

    (state_dir / "known_hosts").write_text("\n".join(known_hosts) + "\n")
    ports_file.write_text(json.dumps({name: info["port"] for name, info in summary["devices"].items()}) + "\n")
    # The lab's host keys are trusted through its own known_hosts file (relative to the inventory), so
    # neither the user's ~/.ssh/known_hosts nor a trust step is needed, and nothing is auto-accepted.
    inventory = {"known_hosts": "known_hosts", "targets": targets, "groups": {GROUP: list(targets)}}
    _write_inventory(state_dir / "inventory.yaml", inventory, state_dir)
    (state_dir / "lab.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["inventory"] = str(state_dir / "inventory.yaml")
    summary["known_hosts"] = str(state_dir / "known_hosts")
    return summary


def _write_inventory(path: Path, inventory: dict, state_dir: Path) -> None:
    import yaml

    header = (
        "# Written by tests/lab/lab.py up; removed by `make lab-down`. The devices' host keys are in\n"
        f"# {state_dir / 'known_hosts'}, which edgeq reads through the 'known_hosts' field below.\n"
    )
    path.write_text(header + yaml.safe_dump(inventory, sort_keys=False))


def stop_lab(state_dir: Path, *, progress=_say) -> list[str]:
    """Stop every lab device found under ``state_dir`` (by pidfile) and unmount the emulated root."""
    state_dir = Path(state_dir).resolve()
    done: list[str] = []
    for name in X86_DEVICES:
        pidfile = state_dir / name / "sshd.pid"
        pid = _read_pid(pidfile)
        if pid and _is_our_sshd(pid, state_dir / name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            _wait_gone(pid)
            done.append(f"{name}: stopped sshd (pid {pid})")
        pidfile.unlink(missing_ok=True)
    if (state_dir / RPI_NAME).exists():
        for line in rpi_emu.RpiEmu(state_dir / RPI_NAME).stop():
            done.append(f"{RPI_NAME}: {line}")
    for stale in ("inventory.yaml", "known_hosts", "lab.json"):
        (state_dir / stale).unlink(missing_ok=True)
    for line in done:
        progress(line)
    return done


def lab_status(state_dir: Path) -> dict:
    """Per device: running or not, pid, port."""
    state_dir = Path(state_dir).resolve()
    summary = json.loads((state_dir / "lab.json").read_text()) if (state_dir / "lab.json").exists() else {}
    devices = summary.get("devices", {})
    status = {}
    for name in X86_DEVICES:
        pid = _read_pid(state_dir / name / "sshd.pid")
        running = bool(pid) and _is_our_sshd(pid, state_dir / name)
        status[name] = {"running": running, "pid": pid if running else None,
                        "port": devices.get(name, {}).get("port")}
    if (state_dir / RPI_NAME).exists():
        status[RPI_NAME] = rpi_emu.RpiEmu(state_dir / RPI_NAME).status()
    else:
        status[RPI_NAME] = {"running": False}
    return status


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_our_sshd(pid: int, device_dir: Path) -> bool:
    """True when ``pid`` is an sshd started with this device's config (guards against recycled pids)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # A substring test: sshd rewrites its process title ("sshd: /usr/sbin/sshd -D -e -f CONFIG [listener]").
    return str(device_dir.resolve() / "sshd_config").encode() in cmdline


def _wait_gone(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not rpi_emu.pid_alive(pid):  # gone, or a zombie waiting for its (re)parent to reap it
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _run_detached(function) -> int:
    """Run ``function`` in a forked child that starts its own session, so the devices it spawns survive
    the terminal (no SIGHUP, no Ctrl-C from the shell's later foreground jobs) after ``up`` returns."""
    child = os.fork()
    if child == 0:  # pragma: no cover - child side
        code = 1
        try:
            os.setsid()
            code = function()
        except KeyboardInterrupt:
            code = 130
        except BaseException as exc:  # report like the parent would, then leave without unwinding twice
            print(f"lab: error: {exc}", file=sys.stderr, flush=True)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    try:
        _pid, status = os.waitpid(child, 0)
    except KeyboardInterrupt:
        os.kill(child, signal.SIGINT)
        _pid, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lab.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", type=Path, default=default_state_dir(), help="default: REPO/.lab")
    parser.add_argument("--no-rpi", action="store_true", help="skip the emulated arm64 device")
    args = parser.parse_args(argv)

    if args.command == "up":
        def up() -> int:
            try:
                summary = start_lab(args.state_dir, with_rpi=not args.no_rpi)
            except rpi_emu.LabError as exc:
                print(f"lab: error: {exc}", file=sys.stderr)
                return 1
            _say(f"inventory: {summary['inventory']}  (group '{GROUP}': {', '.join(summary['devices'])})")
            _say(f"host keys: {summary['known_hosts']}")
            return 0
        return _run_detached(up)
    if args.command == "down":
        if not stop_lab(args.state_dir):
            _say("nothing was running")
        return 0
    for name, info in lab_status(args.state_dir).items():
        state = "running" if info.get("running") else "stopped"
        extra = "".join(f"  {key}={info[key]}" for key in ("pid", "port", "mode", "mounts") if info.get(key))
        print(f"{name:8} {state}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
