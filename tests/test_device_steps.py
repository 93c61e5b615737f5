"""Device steps never outlive the controller or the lock (issue 14 a), against real sshd devices on loopback.

The device's storage stalls during ``activate`` (a slow SD card, an NFS hiccup): a wrapper device python
sleeps before it runs the real step, in the step's own process, while a flag file exists. Without the fix
the step went on after the controller gave up, or died, and swapped ``current`` behind its back.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgeq.cli import cli
from edgeq.deploy import deploy
from edgeq.targets import load_inventory, resolve_targets
from tests.sshd_fixtures import make_synthetic_artifact

pytestmark = pytest.mark.sshd

STALL_S = 8
# Writes its pid where the test looks, then stalls as the device's disk would, then runs the real step.
_STALLING = r"""#!/bin/sh
case " $* " in
  *".pyz activate "*) if [ -e "{flag}" ]; then echo $$ > "{pids}/$$"; sleep {stall}; fi;;
esac
exec "{python}" "$@"
"""


@pytest.fixture
def stalling(trusted_inventory, tmp_path):
    """(target whose activate stalls while the flag exists, the flag, the directory of stalled pids)."""
    flag, pids = tmp_path / "stall", tmp_path / "stalled"
    pids.mkdir()
    wrapper = tmp_path / "stalling-python"
    wrapper.write_text(_STALLING.format(flag=flag, pids=pids, stall=STALL_S, python=sys.executable))
    wrapper.chmod(0o755)
    data = yaml.safe_load(trusted_inventory.path.read_text())
    data["targets"]["dev-0"]["python"] = str(wrapper)
    inventory = tmp_path / "stalling.yaml"
    inventory.write_text(yaml.safe_dump(data))
    return resolve_targets(load_inventory(inventory), "dev-0")[0], inventory, flag, pids


def _artifacts(tmp_path: Path) -> tuple[Path, Path]:
    return (make_synthetic_artifact(tmp_path / "a1", {"model.tflite": os.urandom(4096)}),
            make_synthetic_artifact(tmp_path / "a2", {"model.tflite": os.urandom(4096)}))


def _current(workdir: Path) -> str | None:
    link = workdir / "current"
    return os.readlink(link).split("/")[-1] if link.is_symlink() else None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _stalled_pid(pids: Path, deadline_s: float = 30) -> int:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for entry in pids.iterdir():
            return int(entry.name)
        time.sleep(0.05)
    pytest.fail("the activate step never started")


def _nothing_left(pid: int, workdir: Path, first: str, deadline_s: float) -> None:
    """The stalled step is gone within ``deadline_s``, and ``current`` still names ``first`` after the stall
    would have ended (the step would have swapped it by then)."""
    deadline = time.monotonic() + deadline_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the device step outlived the controller's part in it"
    time.sleep(STALL_S + 1)
    assert _current(workdir) == first, "the stopped step swapped current"


def test_a_step_past_its_limit_is_stopped_on_the_device(stalling, trusted_inventory, tmp_path, monkeypatch):
    """The controller's step limit is the device's: past it the holder kills the step's process group before
    the lock is let go, so nothing swaps ``current`` after the deploy was reported failed."""
    import edgeq.remote.device as device_mod

    target, _, flag, pids = stalling
    workdir = trusted_inventory.workdirs["dev-0"]
    first, second = _artifacts(tmp_path)
    assert deploy(first, target).status == "deployed"
    was = _current(workdir)
    flag.touch()
    monkeypatch.setattr(device_mod, "STEP_TIMEOUT", 2.0)
    started = time.monotonic()
    failed = deploy(second, target)
    assert failed.status == "failed", failed.status
    assert "device step 'activate' timed out after 2s; the device stopped it" in failed.error, failed.error
    assert time.monotonic() - started < STALL_S
    pid = _stalled_pid(pids)
    assert not _alive(pid), "the step ran on after the deploy failed"
    _nothing_left(pid, workdir, was, deadline_s=0)
    flag.unlink()
    monkeypatch.setattr(device_mod, "STEP_TIMEOUT", 300.0)
    assert deploy(second, target).status == "deployed" and _current(workdir) != was


def test_a_controller_killed_during_activate_leaves_nothing_running(stalling, trusted_inventory, tmp_path):
    """SIGKILL of the controller mid-activate: sshd closes the lock's channel, the holder stops the step,
    then lets the lock go; the next deploy goes through at once."""
    target, inventory, flag, pids = stalling
    workdir = trusted_inventory.workdirs["dev-0"]
    first, second = _artifacts(tmp_path)
    assert deploy(first, target).status == "deployed"
    was = _current(workdir)
    flag.touch()
    controller = subprocess.Popen([sys.executable, "-m", "edgeq", "deploy", str(second), "--target", "dev-0",
                                   "-i", str(inventory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**os.environ, "HOME": str(trusted_inventory.home)})
    try:
        pid = _stalled_pid(pids)
    finally:
        controller.kill()
        controller.wait()
    _nothing_left(pid, workdir, was, deadline_s=10)
    flag.unlink()
    result = CliRunner().invoke(cli, ["deploy", str(second), "--target", "dev-0", "-i", str(inventory)])
    assert result.exit_code == 0, result.output
    assert _current(workdir) != was


def test_targets_unlock_stops_the_step_of_a_cut_off_controller(stalling, trusted_inventory, tmp_path):
    """A partitioned controller's session lives on (until TCP gives up, hours): `targets unlock` stops its
    lock holder, which stops the step it runs first. The cut-off deploy fails; current is unchanged."""
    target, inventory, flag, pids = stalling
    workdir = trusted_inventory.workdirs["dev-0"]
    first, second = _artifacts(tmp_path)
    assert deploy(first, target).status == "deployed"
    was = _current(workdir)
    flag.touch()
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("deploy", deploy(second, target)))
    worker.start()
    pid = _stalled_pid(pids)
    unlocked = CliRunner().invoke(cli, ["targets", "unlock", "dev-0", "-i", str(inventory)])
    assert unlocked.exit_code == 0, unlocked.output
    assert "broke the deploy lock held by edgeq deploy on" in unlocked.output, unlocked.output
    worker.join(30)
    cut_off = outcome["deploy"]
    assert cut_off.status == "failed" and "the device's lock process ended during device step 'activate'" \
        in cut_off.error, cut_off.error
    _nothing_left(pid, workdir, was, deadline_s=0)
