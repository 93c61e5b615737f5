"""Fleet faults against real parts (issue 14 part 2): each device is an sshd in a network namespace of its own,
behind a veth pair, and the faults are the real ones (iptables drops, SIGSTOP, a partition, tc netem, a
read-only remount, a server without sftp). Each case states its outcome: a bounded error within a deadline,
nothing half-activated, the lock recoverable, the next deploy succeeding.

Liveness is set to report a silent device after 1 s + 3 x 1 s (EDGEQ_ALIVE_INTERVAL/COUNT) and the connect
timeout to 2 s, so the deadlines here are seconds; the defaults give 60 s and 10 s x 3 attempts.

The clock jump of a device mid-bench (``date -s '+2 days'``) sets this machine's wall clock (the device's and
the controller's) with clock_settime, only where EDGEQ_TEST_SET_CLOCK=1 (CI's throwaway machine), in
tests/test_clock_jump.py. tests/test_bench.py's ``test_a_run_removes_what_dropped_runs_left_but_never_a_live_one``
covers cleanup with a live run whose directory looks days old.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeq.deploy import break_lock, deploy
from edgeq.targets import Target, load_inventory, resolve_targets
from tests.lab.delay_relay import DelayRelay
from tests.lab.netns import NetnsHost, netem_problem, netns_problem, start_netns_host
from tests.lab.sshd import start_sshd, trust_device, write_inventory
from tests.sshd_fixtures import make_synthetic_artifact

pytestmark = pytest.mark.sshd
_INDEX = itertools.count(1)


@dataclass
class FaultDevice:
    host: NetnsHost
    target: Target
    inventory: Path
    workdir: Path

    def current(self) -> str | None:
        link = self.workdir / "current"
        return os.readlink(link).split("/")[-1] if link.is_symlink() else None

    def leftovers(self) -> list[str]:
        releases = self.workdir / "releases"
        return sorted(p.name for p in releases.iterdir() if p.name.startswith(".tmp")) if releases.is_dir() else []


@pytest.fixture
def fast_failures(monkeypatch):
    import edgeq.remote.ssh as ssh

    monkeypatch.setenv("EDGEQ_ALIVE_INTERVAL", "1")
    monkeypatch.setenv("EDGEQ_ALIVE_COUNT", "3")
    monkeypatch.setattr(ssh, "CONNECT_TIMEOUT", 2.0)


@pytest.fixture
def device(ssh_home, tmp_path, fast_failures):
    problem = netns_problem()
    if problem:
        pytest.skip(problem)
    host = start_netns_host(tmp_path / "sshd", next(_INDEX))
    try:
        trust_device(host.sshd, ssh_home / ".ssh" / "known_hosts")
        inventory = write_inventory(tmp_path / "inventory.yaml", {"dev": host.sshd}, python=sys.executable,
                                    workdir_root=tmp_path / "devices")
        target = resolve_targets(load_inventory(inventory), "dev")[0]
        yield FaultDevice(host, target, inventory, tmp_path / "devices" / "dev")
    finally:
        host.stop()


def _artifact(path: Path, size: int = 4096) -> Path:
    return make_synthetic_artifact(path, {"model.tflite": os.urandom(size)})


def _timed(func, *args, **kwargs):
    started = time.monotonic()
    result = func(*args, **kwargs)
    return result, time.monotonic() - started


def _deploy_when_free(artifact: Path, target: Target, within_s: float):
    """Deploy, retrying while the device still holds the lock of a deploy that lost its controller (its
    session ends once the device hears the connection is gone)."""
    deadline = time.monotonic() + within_s
    while True:
        outcome = deploy(artifact, target)
        if outcome.status != "failed" or "in progress" not in (outcome.error or "") or time.monotonic() > deadline:
            return outcome
        time.sleep(0.5)


def test_delay_and_loss_slow_a_deploy_but_it_succeeds(device, tmp_path, ssh_home):
    """50 ms +- 10 ms each way and 2 % loss each way: the deploy goes through (TCP retransmits). With
    ``tc netem`` where the kernel has it; else the delay comes from a relay (tests/lab/delay_relay.py) and the
    loss from iptables' statistic match, on the same veth link."""
    first, second = _artifact(tmp_path / "a1", 1 << 20), _artifact(tmp_path / "a2", 1 << 20)
    assert deploy(first, device.target).status == "deployed"
    with contextlib.ExitStack() as stack:
        if netem_problem() is None:
            device.host.netem("delay 50ms 10ms loss 2%")
            target, how = device.target, "tc netem"
        else:
            device.host.lose(2.0)
            relay = stack.enter_context(DelayRelay((device.host.address, device.host.sshd.port), 50, 10))
            with open(ssh_home / ".ssh" / "known_hosts", "a") as known_hosts:
                known_hosts.write(f"[127.0.0.1]:{relay.port} {device.host.sshd.host_key_line}\n")
            target, how = device.target.model_copy(update={"host": "127.0.0.1", "port": relay.port}), \
                "delay relay + iptables statistic"
        outcome, seconds = _timed(deploy, second, target)
    assert outcome.status == "deployed", outcome.error
    assert device.current() == outcome.release_id and device.leftovers() == []
    assert seconds < 120
    print(f"deploy of 1 MB at 100 ms RTT, 2% loss ({how}): {seconds:.1f} s")


def test_dropped_syns_fail_fast_as_unreachable_and_a_short_drop_is_retried(device, tmp_path):
    artifact = _artifact(tmp_path / "a1")
    device.host.drop_syns()
    outcome, seconds = _timed(deploy, artifact, device.target)
    # 3 attempts of 2 s with 1 s and 2 s pauses: about 9 s.
    assert outcome.status == "failed" and outcome.failure.kind == "connect", outcome.error
    assert "dev (" in outcome.error and seconds < 20, (outcome.error, seconds)
    assert not device.workdir.exists(), "something reached the device"
    # A drop shorter than the retries (a switch rebooting): the second or third attempt connects.
    threading.Timer(2.5, device.host.allow_syns).start()
    retried, seconds = _timed(deploy, artifact, device.target)
    assert retried.status == "deployed", retried.error
    assert seconds > 2.5


def test_a_device_frozen_during_upload_is_reported_and_recovers(device, tmp_path):
    first, second = _artifact(tmp_path / "a1"), _artifact(tmp_path / "a2", 8 << 20)
    assert deploy(first, device.target).status == "deployed"
    was = device.current()
    frozen = threading.Event()

    def freeze_midway(done: int, total: int) -> None:
        if done > 0 and not frozen.is_set():
            frozen.set()
            device.host.freeze()

    started = time.monotonic()
    from edgeq.deploy import deploy as deploy_with_progress

    outcome = deploy_with_progress(second, device.target, progress=freeze_midway)
    seconds = time.monotonic() - started
    assert frozen.is_set() and outcome.status == "failed", outcome.error
    assert outcome.failure.kind == "connect" and seconds < 20, (outcome.error, seconds)
    device.host.thaw()
    assert device.current() == was
    after = _deploy_when_free(second, device.target, within_s=20)
    assert after.status == "deployed", after.error
    assert device.current() == after.release_id and device.leftovers() == []


def test_a_device_frozen_before_activate_never_activates_on_waking(device, tmp_path, monkeypatch):
    """The activate request is sent to a frozen device; the controller reports it frozen. On waking the
    device finds the request past its start-by time (and the connection closed) and does not run it."""
    import edgeq.deploy as deploy_mod

    first, second = _artifact(tmp_path / "a1"), _artifact(tmp_path / "a2")
    assert deploy(first, device.target).status == "deployed"
    was = device.current()
    outcome, seconds = _timed(deploy_mod.deploy, second, device.target,
                              _after_upload=lambda transport, tmp: device.host.freeze())
    assert outcome.status == "failed" and outcome.failure.kind == "connect", outcome.error
    assert "no reply from the device" in outcome.error and seconds < 15, (outcome.error, seconds)
    device.host.thaw()
    time.sleep(3)  # time for a step that would still run to finish
    assert device.current() == was, "the device activated a release after the deploy was reported failed"
    after = _deploy_when_free(second, device.target, within_s=20)
    assert after.status == "deployed" and device.current() == after.release_id, after.error


def _lock_holders(workdir: Path) -> list[int]:
    """Pids of the device processes holding ``workdir``'s lock (the device package's ``lock`` op)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"lock" in argv and any(str(workdir).encode() in arg for arg in argv):
                found.append(int(entry.name))
    return found


def test_a_stopped_lock_holder_is_given_up_while_sshd_still_answers(device, tmp_path, monkeypatch):
    """Only the device's lock process is stopped (starved, or SIGSTOP): sshd answers keepalives, so liveness
    sees a live device. Its heartbeats stop, and the deploy is given up within the bound (4.5 s here; 70 s by
    default) instead of waiting out the step's 300 s limit. Woken, the holder finds the request past its
    start-by time, runs nothing and ends with the connection."""
    import edgeq.deploy as deploy_mod

    monkeypatch.setenv("EDGEQ_STEP_HEARTBEAT_S", "0.5")
    first, second = _artifact(tmp_path / "a1"), _artifact(tmp_path / "a2")
    assert deploy(first, device.target).status == "deployed"
    was, stopped = device.current(), []

    def stop_holder(transport, tmp):
        stopped.extend(_lock_holders(device.workdir))
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)

    try:
        outcome, seconds = _timed(deploy_mod.deploy, second, device.target, _after_upload=stop_holder)
        assert stopped, "no lock holder found"
        assert outcome.status == "failed" and "lock process sent nothing for 4.5s" in outcome.error, outcome.error
        assert seconds < 15, seconds
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    time.sleep(2)
    assert device.current() == was, "the stopped holder activated the release after waking"
    after = _deploy_when_free(second, device.target, within_s=20)
    assert after.status == "deployed" and device.current() == after.release_id, after.error


def test_a_step_longer_than_the_heartbeat_bound_is_not_cut(device, monkeypatch):
    from edgeq.remote import open_transport
    from edgeq.remote.device import device_lock

    monkeypatch.setenv("EDGEQ_STEP_HEARTBEAT_S", "0.5")
    device.workdir.mkdir(parents=True)
    with open_transport(device.target) as transport, device_lock(transport, device.target,
                                                                 str(device.workdir)) as locked:
        started = time.monotonic()
        result = locked.run(["sleep", "6"], timeout=30)
        assert result.exit_code == 0 and time.monotonic() - started >= 6


@pytest.mark.slow
def test_a_device_frozen_during_bench_is_reported_and_its_run_stops(device, tmp_path, make_artifact):
    from edgeq.bench import bench

    artifact = make_artifact("tflite", "fp32")
    outcome, runs = {}, device.workdir / "runs"

    def long_bench():
        outcome["bench"] = bench(artifact, device.target, output_dir=tmp_path / "r1", warmup=0, runs=1,
                                 min_seconds=30, idle_seconds=0, power=False)

    worker = threading.Thread(target=long_bench)
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(runs.glob("*/.live")):
        time.sleep(0.1)
    live = list(runs.glob("*/.live"))
    assert live, "the bench never started its run"
    time.sleep(1)
    device.host.freeze()
    frozen_at = time.monotonic()
    worker.join(40)
    assert not worker.is_alive()
    result = outcome["bench"].result
    assert not outcome["bench"].ok and result.failure.kind == "connect", result.error
    assert time.monotonic() - frozen_at < 15
    device.host.thaw()
    # Woken, the device hears the connection is gone: the holder stops the bench step, the run follows.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(live[0], "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                time.sleep(0.2)
    else:
        pytest.fail("the frozen bench's run was still running 30 s after the device woke")
    again = bench(artifact, device.target, output_dir=tmp_path / "r2", warmup=0, runs=1, min_seconds=0,
                  idle_seconds=0, power=False)
    assert again.ok, again.result.error
    assert sorted(p.name for p in runs.iterdir()) == []


def test_a_partition_then_a_controller_crash_and_restart(device, tmp_path, ssh_home):
    """The controller is cut off mid-upload and killed; its session lives on the device (no packet of the
    crash got through). The restarted controller is told who holds the lock and how to break it; after
    `targets unlock` (or once the device noticed by itself) the deploy goes through, leaving nothing behind."""
    first, second = _artifact(tmp_path / "a1"), _artifact(tmp_path / "a2", 32 << 20)
    assert deploy(first, device.target).status == "deployed"
    controller = subprocess.Popen([sys.executable, "-m", "edgeq", "deploy", str(second), "--target", "dev",
                                   "-i", str(device.inventory)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, env={**os.environ, "HOME": str(ssh_home)})
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not device.leftovers():
            time.sleep(0.02)
        assert device.leftovers(), "the upload never started"
        device.host.partition()
        time.sleep(0.5)
    finally:
        controller.kill()
        controller.wait()
    device.host.heal()
    restarted, seconds = _timed(deploy, second, device.target)
    if restarted.status == "failed":
        assert "another deploy is in progress" in restarted.error and "edgeq deploy on" in restarted.error
        assert f"edgeq targets unlock {device.target.name}" in restarted.hint and seconds < 10
        assert "broke the deploy lock" in break_lock(device.target)
        restarted = deploy(second, device.target)
    assert restarted.status == "deployed", restarted.error
    assert device.current() == restarted.release_id and device.leftovers() == []


def test_a_read_only_remount_mid_deploy_keeps_the_old_release(device, tmp_path):
    """The device's filesystem goes read-only between upload and activation (as ext4 does on an I/O error,
    errors=remount-ro). ``mount -o remount,ro`` refuses while the lock file is open for writing (a kernel
    forcing it does not ask), so a read-only bind of the same tmpfs goes over the workdir: every new open,
    rename and link there fails with EROFS, as on a forced remount."""
    from tests.test_deploy import tmpfs_at

    first, second = _artifact(tmp_path / "a1"), _artifact(tmp_path / "a2")
    with tmpfs_at(device.workdir, "16m"):
        assert deploy(first, device.target).status == "deployed"
        was = device.current()
        assert was is not None

        def remount_read_only(transport, tmp):
            subprocess.run(["mount", "--bind", "-o", "ro", str(device.workdir), str(device.workdir)], check=True)

        import edgeq.deploy as deploy_mod

        failed = deploy_mod.deploy(second, device.target, _after_upload=remount_read_only)
        print(f"read-only mid-deploy: {failed.error}")
        try:
            assert failed.status == "failed" and "Read-only file system" in failed.error, failed.error
            assert device.current() == was
        finally:
            subprocess.run(["umount", str(device.workdir)], check=True)  # the read-only layer only
        after = deploy(second, device.target)
        assert after.status == "deployed" and device.current() == after.release_id, after.error
        assert device.leftovers() == []


def test_a_server_without_sftp_is_a_clear_error(ssh_home, tmp_path, fast_failures):
    server = start_sshd(tmp_path / "nosftp", sftp=False)
    try:
        trust_device(server, ssh_home / ".ssh" / "known_hosts")
        inventory = write_inventory(tmp_path / "inventory.yaml", {"bare": server}, python=sys.executable,
                                    workdir_root=tmp_path / "devices")
        target = resolve_targets(load_inventory(inventory), "bare")[0]
        outcome, seconds = _timed(deploy, _artifact(tmp_path / "a1"), target)
        assert outcome.status == "failed" and seconds < 15
        assert "no SFTP subsystem" in outcome.error, outcome.error
        assert "Subsystem sftp" in (outcome.hint or "")
    finally:
        server.stop()
