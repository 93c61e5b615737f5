"""Upload speed of edgeq's SFTP transport vs OpenSSH ``scp``, same sshd, same key, same file.

Starts a real sshd on loopback (tests/lab/sshd.py), writes a file of random bytes (default 100 MB),
and times, alternating to share the machine's noise fairly:
  - edgeq: ``SSHTransport.put`` (paramiko SFTP, pipelined, a 100 MB file over 4 SFTP sessions; a fresh
    connection each run, connect included), and the same with one session (EDGEQ_UPLOAD_STREAMS=1)
  - scp:   ``scp`` with its default cipher and with aes128-gcm (a fresh connection each run, connect included)
  - scp -O: the legacy scp protocol (OpenSSH 9 scp speaks SFTP by default)
Prints medians of --runs runs in MB/s and edgeq's ratio to scp. Numbers are what this machine measured.

--rtt-ms puts a round-trip time on the link: every method connects through tests/lab/delay_relay.py, which
holds each direction's bytes for half of it (``tc netem`` where the kernel has it is the real thing; this
kernel has no sch_netem). What bounds a transfer then is each side's window, which is what is compared.

    .venv/bin/python benchmarks/bench_transfer.py [--size-mb 100] [--runs 5] [--rtt-ms 50]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edgeq.remote import open_transport  # noqa: E402
from edgeq.remote.ssh import SSHTransport  # noqa: E402
from edgeq.targets import Target  # noqa: E402
from tests.lab.sshd import start_sshd, trust_device  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time added by a delay relay")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="edgeq-bench-transfer-") as tmp:
        tmp = Path(tmp)
        os.environ["HOME"] = str(tmp / "home")  # a private known_hosts; never touch the real ~/.ssh
        (tmp / "home" / ".ssh").mkdir(parents=True)
        source = tmp / "payload.bin"
        with open(source, "wb") as handle:
            for _ in range(args.size_mb):
                handle.write(os.urandom(1 << 20))
        size = source.stat().st_size
        with start_sshd(tmp / "sshd") as device, contextlib.ExitStack() as stack:
            known_hosts = trust_device(device)
            port = device.port
            if args.rtt_ms:
                port = stack.enter_context(_relay_process(device.host, device.port, args.rtt_ms / 2))
                with open(known_hosts, "a") as handle:
                    handle.write(f"[{device.host}]:{port} {device.host_key_line}\n")
            target = Target(name="bench", host=device.host, port=port, user=device.user,
                            key=str(device.client_key), profile="x86-avx2")
            scp_base = ["scp", "-q", "-o", f"UserKnownHostsFile={known_hosts}", "-o", "BatchMode=yes",
                        "-i", str(device.client_key), "-P", str(port)]
            dest = tmp / "received.bin"
            methods = {
                "edgeq put (paramiko SFTP)": lambda: _edgeq_put(target, source, dest),
                "edgeq put, 1 SFTP stream": lambda: _edgeq_put(target, source, dest, streams=1),
                "scp (default cipher)": lambda: _run(scp_base + [str(source), f"{device.user}@{device.host}:{dest}"]),
                "scp -c aes128-gcm": lambda: _run(scp_base + ["-c", "aes128-gcm@openssh.com", str(source),
                                                              f"{device.user}@{device.host}:{dest}"]),
                "scp -O (legacy protocol)": lambda: _run(scp_base + ["-O", str(source),
                                                                     f"{device.user}@{device.host}:{dest}"]),
            }
            times: dict[str, list[float]] = {name: [] for name in methods}
            for _ in range(args.runs):
                for name, method in methods.items():
                    started = time.perf_counter()
                    method()
                    times[name].append(time.perf_counter() - started)
                    if dest.stat().st_size != size:
                        raise SystemExit(f"{name}: received {dest.stat().st_size} bytes, expected {size}")
                    dest.unlink()
            cipher = _cipher(target)

    mb = size / 1e6
    scp_best = max(mb / statistics.median(times[n]) for n in times if n.startswith("scp"))
    link = f"at {args.rtt_ms:g} ms RTT (delay relay)" if args.rtt_ms else "over loopback"
    print(f"upload of {mb:.0f} MB {link} to sshd, median of {args.runs} runs (connect included); "
          f"edgeq cipher: {cipher}")
    print(f"{'method':<28}{'median s':>10}{'MB/s':>10}{'min s':>10}{'max s':>10}{'vs best scp':>13}")
    for name, values in times.items():
        speed = mb / statistics.median(values)
        print(f"{name:<28}{statistics.median(values):>10.2f}{speed:>10.1f}{min(values):>10.2f}"
              f"{max(values):>10.2f}{speed / scp_best:>12.0%}")


@contextlib.contextmanager
def _relay_process(host: str, port: int, one_way_ms: float):
    """A delay relay in a process of its own (not sharing this interpreter's lock with paramiko); its port."""
    relay = subprocess.Popen([sys.executable, "-m", "tests.lab.delay_relay", host, str(port), str(one_way_ms)],
                             cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        yield int(relay.stdout.readline())
    finally:
        relay.kill()
        relay.wait()


def _edgeq_put(target: Target, source: Path, dest: Path, streams: int | None = None) -> None:
    """edgeq's upload; ``streams`` overrides how many SFTP sessions carry a big file (default: its own)."""
    saved = os.environ.get("EDGEQ_UPLOAD_STREAMS")
    if streams is not None:
        os.environ["EDGEQ_UPLOAD_STREAMS"] = str(streams)
    try:
        with open_transport(target) as transport:
            transport.put(source, str(dest))
    finally:
        if streams is not None:
            os.environ.pop("EDGEQ_UPLOAD_STREAMS") if saved is None else os.environ.update(EDGEQ_UPLOAD_STREAMS=saved)


def _cipher(target: Target) -> str:
    with open_transport(target) as transport:
        assert isinstance(transport, SSHTransport)
        return transport.client.get_transport().local_cipher


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True)


if __name__ == "__main__":
    main()
