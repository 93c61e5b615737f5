"""A device's clock jump in the middle of a bench (issue 14 part 2: ``date -s '+2 days'`` on a Pi without an
RTC, when NTP is reached at last), made for real: this machine's wall clock is set forward with clock_settime
and put back from the monotonic clock. Only where EDGEQ_TEST_SET_CLOCK=1 (.ci/run sets it as root)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time

import pytest

from edgeq.deploy import deploy
from edgeq.targets import load_inventory, resolve_targets
from tests.lab.sshd import start_sshd, trust_device, write_inventory

pytestmark = pytest.mark.sshd


# Puts the wall clock back if the test process dies with it jumped (SIGKILL, a CI timeout): argv wall0 mono0
# parent limit_s. CLOCK_MONOTONIC is the machine's, the same in every process, and a jump does not move it.
_CLOCK_GUARD = """
import os, sys, time
wall0, mono0, parent, limit = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
while time.monotonic() - mono0 < limit and os.getppid() == parent:
    time.sleep(0.2)
expected = wall0 + (time.monotonic() - mono0)
if abs(time.time() - expected) > 3600:
    time.clock_settime(time.CLOCK_REALTIME, expected)
"""


@contextlib.contextmanager
def _clock_jumped_after(seconds: float, jump_s: float):
    """After ``seconds``, set this machine's wall clock ``jump_s`` forward (clock_settime, as date -s does);
    put it back on leaving, counted from the monotonic clock, which a jump does not move. A guard process
    puts it back too if this one dies first."""
    wall0, mono0 = time.time(), time.monotonic()
    guard = subprocess.Popen([sys.executable, "-c", _CLOCK_GUARD, repr(wall0), repr(mono0), str(os.getpid()), "300"],
                             start_new_session=True)
    timer = threading.Timer(seconds, lambda: time.clock_settime(time.CLOCK_REALTIME, time.time() + jump_s))
    timer.start()
    try:
        yield lambda: time.time() - (wall0 + (time.monotonic() - mono0))  # how far ahead the wall clock is
    finally:
        timer.cancel()
        timer.join()  # a jump already under way is done before the clock is put back
        time.clock_settime(time.CLOCK_REALTIME, wall0 + (time.monotonic() - mono0))
        guard.kill()
        guard.wait()


@pytest.mark.slow
def test_a_device_clock_jump_mid_bench_changes_no_number(ssh_home, tmp_path, make_artifact):
    """``date -s '+2 days'`` in the middle of a bench, as a Pi without an RTC does when NTP is reached at last.
    The device here is this machine, so its wall clock jumps for real (and the controller's with it); the
    monotonic clocks do not. The bench finishes with its own durations, its run is cleaned, a stale run left
    before the jump goes, and a deploy and a bench after it work.

    It sets the machine's clock for a few seconds, so it runs only where that is wanted: as root with
    EDGEQ_TEST_SET_CLOCK=1 (.ci/run sets it on CI's throwaway machines); never on a developer's machine by
    default."""
    from edgeq.bench import bench

    if os.geteuid() != 0 or os.environ.get("EDGEQ_TEST_SET_CLOCK") != "1":
        pytest.skip("sets the machine's wall clock: needs root and EDGEQ_TEST_SET_CLOCK=1 (set by .ci/run)")
    try:
        time.clock_settime(time.CLOCK_REALTIME, time.time())
    except OSError as exc:
        pytest.skip(f"cannot set the wall clock here: {exc}")
    server = start_sshd(tmp_path / "sshd")
    try:
        trust_device(server, ssh_home / ".ssh" / "known_hosts")
        inventory = write_inventory(tmp_path / "inventory.yaml", {"pi": server}, python=sys.executable,
                                    workdir_root=tmp_path / "devices")
        target = resolve_targets(load_inventory(inventory), "pi")[0]
        artifact = make_artifact("tflite", "fp32")
        runs = tmp_path / "devices" / "pi" / "runs"
        stale = runs / "20260101T000000-0dead000"
        stale.mkdir(parents=True)
        (stale / ".live").touch()  # a run whose controller and process are long gone: no flock
        with _clock_jumped_after(4.0, 2 * 24 * 3600) as wall_ahead_s:
            started = time.monotonic()
            run = bench(artifact, target, output_dir=tmp_path / "r1", warmup=0, runs=1, min_seconds=8,
                        idle_seconds=0, power=False)
            took = time.monotonic() - started
            assert wall_ahead_s() > 47 * 3600, "the clock did not jump"
            assert deploy(artifact, target).status == "deployed"
            again = bench(artifact, target, output_dir=tmp_path / "r2", warmup=0, runs=3, min_seconds=0,
                          idle_seconds=0, power=False)
        assert took > 8, "the bench did not run across the jump"
        assert run.ok, run.result.error
        assert 8 <= run.result.duration_s <= took + 1, (run.result.duration_s, took)
        assert 0 < run.result.latency_ms.p50 < 1000 and run.result.latency_ms.count >= 1
        assert again.ok and again.result.latency_ms.p50 < 1000, again.result.error
        assert sorted(p.name for p in runs.iterdir()) == [], "a run directory was left (or the stale one kept)"
    finally:
        server.stop()
