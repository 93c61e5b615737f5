"""Test devices in network namespaces: one sshd per namespace behind a veth pair, with faults to inject.

Plain Python (no pytest), for the fault tests and the scale benchmarks. Needs root (ip netns, tc, iptables).

    host = start_netns_host(root_dir, index, client_key=key)   # namespace, veth, addresses, sshd on :22
    host.address, host.sshd                                    # "10.X.index.2", the SshdDevice
    host.netem("delay 50ms 10ms loss 2%")                      # on both ends of the link
    host.clear_netem()
    host.lose(2.0)                                             # iptables statistic: 2 % dropped each way
    host.drop_syns() / host.allow_syns()                       # iptables DROP of new connections to sshd
    host.freeze() / host.thaw()                                # SIGSTOP / SIGCONT of sshd and all it runs
    host.partition() / host.heal()                             # silent: iptables DROP both ways, links up
    host.stop()                                                # sshd gone, namespace and veth deleted

Addresses are 10.(200 + pid % 50).index.{1,2}/30, so two runs at once do not collide.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.lab.sshd import SshdDevice, start_sshd

SSH_PORT = 22


def netns_problem() -> str | None:
    """Why namespace hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 iptables)"
    name = f"eqprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def netem_problem() -> str | None:
    """Why ``tc netem`` cannot run here (a kernel without sch_netem), or None."""
    name = f"eqnetem{os.getpid()}"
    try:
        _run("ip", "netns", "add", name)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        _run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms")
    except RuntimeError as exc:
        return f"tc netem does not run here ({exc}); the kernel may lack sch_netem"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _run(*argv: str) -> None:
    result = subprocess.run(list(argv), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found.append(child)
            frontier.append(child)
    return found


@dataclass
class NetnsHost:
    namespace: str
    host_if: str
    device_if: str
    address: str
    sshd: SshdDevice
    frozen: list[int] | None = None

    def netem(self, spec: str) -> None:
        """``tc netem`` on both ends (each end's egress: the delay counts once each way)."""
        _run("tc", "qdisc", "replace", "dev", self.host_if, "root", "netem", *spec.split())
        _run("ip", "netns", "exec", self.namespace, "tc", "qdisc", "replace", "dev", self.device_if, "root",
             "netem", *spec.split())

    def clear_netem(self) -> None:
        subprocess.run(["tc", "qdisc", "del", "dev", self.host_if, "root"], capture_output=True)
        subprocess.run(["ip", "netns", "exec", self.namespace, "tc", "qdisc", "del", "dev", self.device_if, "root"],
                       capture_output=True)

    def lose(self, percent: float) -> None:
        """Drop ``percent`` % of packets each way at random (iptables' statistic match; no netem needed)."""
        for chain in ("INPUT", "OUTPUT"):
            _run("ip", "netns", "exec", self.namespace, "iptables", "-I", chain, "-m", "statistic", "--mode",
                 "random", "--probability", f"{percent / 100:.4f}", "-j", "DROP")

    def partition(self) -> None:
        """Every packet dropped both ways in the device's namespace, silently (no RST, no ICMP, links up)."""
        for chain in ("INPUT", "OUTPUT"):
            _run("ip", "netns", "exec", self.namespace, "iptables", "-I", chain, "-j", "DROP")

    def heal(self) -> None:
        for chain in ("INPUT", "OUTPUT"):
            _run("ip", "netns", "exec", self.namespace, "iptables", "-D", chain, "-j", "DROP")

    def _syn_rule(self, action: str) -> None:
        _run("ip", "netns", "exec", self.namespace, "iptables", action, "INPUT", "-p", "tcp", "--syn",
             "--dport", str(self.sshd.port), "-j", "DROP")

    def drop_syns(self) -> None:
        self._syn_rule("-I")

    def allow_syns(self) -> None:
        self._syn_rule("-D")

    def freeze(self) -> None:
        """SIGSTOP the sshd listener and everything under it (sessions, device steps, lock holders)."""
        pids = [self.sshd.process.pid, *_descendants(self.sshd.process.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        self.frozen = pids

    def thaw(self) -> None:
        for pid in reversed(self.frozen or []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.frozen = None

    def stop(self) -> None:
        try:
            if self.frozen:
                self.thaw()
            self.sshd.stop()
        finally:
            subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
            subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)


def start_netns_host(root: Path, index: int, *, client_key: Path | None = None, sftp: bool = True) -> NetnsHost:
    """A namespace with a veth link to this one and sshd listening in it (index 0..255)."""
    tag = os.getpid() % 100000
    namespace, host_if, device_if = f"eq{tag}n{index}", f"eq{tag}h{index}", f"eq{tag}d{index}"
    net = f"10.{200 + os.getpid() % 50}.{index}"
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True)  # a leftover of a killed run
    subprocess.run(["ip", "link", "del", host_if], capture_output=True)
    try:
        _run("ip", "netns", "add", namespace)
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", device_if)
        _run("ip", "link", "set", device_if, "netns", namespace)
        _run("ip", "addr", "add", f"{net}.1/30", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        _run("ip", "-n", namespace, "addr", "add", f"{net}.2/30", "dev", device_if)
        _run("ip", "-n", namespace, "link", "set", device_if, "up")
        _run("ip", "-n", namespace, "link", "set", "lo", "up")
        sshd = start_sshd(root, client_key=client_key, port=SSH_PORT, listen=f"{net}.2", netns=namespace, sftp=sftp)
    except BaseException:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        raise
    return NetnsHost(namespace, host_if, device_if, f"{net}.2", sshd)
