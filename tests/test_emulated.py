"""The device lab with an emulated arm64 Raspberry Pi (tests/lab): convert -> setup -> deploy -> bench -> report
against a device whose architecture is not the controller's.

Needs root, binfmt_misc and qemu-user-static; elsewhere every test here is skipped with the reason. The
arm64 root is built once (about 4-5 minutes) and cached outside the repository; later runs start the
device in seconds. Latency under emulation is meaningless: these tests check correctness only, and keep
the timed runs tiny.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.lab import rpi_emu

REPO = Path(__file__).resolve().parent.parent
LAB_CLI = [sys.executable, str(REPO / "tests" / "lab" / "lab.py")]
TINY_BENCH = ["--runs", "5", "--min-seconds", "0", "--warmup", "1", "--no-power"]

pytestmark = [pytest.mark.emulated, pytest.mark.timeout(1800)]


@dataclass
class Lab:
    state_dir: Path
    inventory: Path
    home: Path
    device: rpi_emu.RpiEmu
    up_seconds: float


def _cli(*args: str):
    from edgeq.cli import cli

    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def emu_lab(tmp_path_factory) -> Lab:
    """`lab.py up` in a temporary state dir (the real CLI, detached like `make lab-up`), `lab.py down` after.

    HOME points at a temporary directory with an empty ~/.ssh, so the real ~/.ssh is never read or written:
    the lab's host keys are trusted only through the inventory's own ``known_hosts`` file.
    """
    reason = rpi_emu.unavailable_reason()
    if reason:
        print(f"\nSKIP emulated arm64 device: {reason}")
        pytest.skip(f"emulated arm64 device unavailable: {reason}")
    state_dir = tmp_path_factory.mktemp("lab")
    home = tmp_path_factory.mktemp("home")
    started = time.monotonic()
    up = subprocess.run([*LAB_CLI, "up", "--state-dir", str(state_dir)], capture_output=True, text=True,
                        timeout=1200)
    up_seconds = time.monotonic() - started
    print(f"\nlab.py up ({up_seconds:.1f}s):\n{up.stdout}{up.stderr}")
    device = rpi_emu.RpiEmu(state_dir / "rpi-emu")
    try:
        assert up.returncode == 0, up.stderr
        (home / ".ssh").mkdir(mode=0o700)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("HOME", str(home))
            patch.delenv("SSH_AUTH_SOCK", raising=False)
            patch.delenv("EDGEQ_INVENTORY", raising=False)
            yield Lab(state_dir, state_dir / "inventory.yaml", home, device, up_seconds)
    finally:
        down = subprocess.run([*LAB_CLI, "down", "--state-dir", str(state_dir)], capture_output=True, text=True,
                              timeout=120)
        print(f"lab.py down:\n{down.stdout}{down.stderr}")
        left_mounts = rpi_emu.mounts_under(state_dir)
        left_processes = rpi_emu.processes_rooted_at(device.root)
        if left_mounts or left_processes:  # never leave anything behind, even when the assertion fails
            device.stop()
        assert down.returncode == 0, down.stderr
        assert not left_mounts, f"lab.py down left mounts: {left_mounts}"
        assert not left_processes, f"lab.py down left processes in the device: {left_processes}"
        device.destroy()  # the overlay's upper layer holds the device's venv (~200 MB): don't keep it


@pytest.fixture(scope="module")
def device_venv(emu_lab) -> dict:
    """`edgeq targets setup rpi-emu`: a venv with ai-edge-litert + numpy from PyPI, through the device's pip."""
    started = time.monotonic()
    # --only tflite: the other runtimes the rpi4 profile allows would take minutes more under qemu.
    result = _cli("targets", "setup", "rpi-emu", "-i", str(emu_lab.inventory), "--only", "tflite")
    seconds = time.monotonic() - started
    print(f"\nedgeq targets setup rpi-emu: {seconds:.1f}s\n{result.output}")
    assert result.exit_code == 0, result.output
    return {"seconds": seconds, "python": "/root/.edgeq/venv/bin/python"}


def test_lab_up_writes_inventory_and_status(emu_lab):
    from edgeq.targets import load_inventory, resolve_targets

    inventory = load_inventory(emu_lab.inventory)
    assert [t.name for t in resolve_targets(inventory, "lab")] == ["x86-1", "x86-2", "rpi-emu"]
    rpi = inventory.targets["rpi-emu"]
    assert (rpi.profile, rpi.user, rpi.host) == ("rpi4", "root", "127.0.0.1")
    status = subprocess.run([*LAB_CLI, "status", "--state-dir", str(emu_lab.state_dir)], capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0
    lines = {line.split()[0]: line for line in status.stdout.splitlines() if line.strip()}
    assert set(lines) == {"x86-1", "x86-2", "rpi-emu"}
    assert all(" running" in line for line in lines.values()), status.stdout
    # The device's sshd survived `lab.py up` exiting, in a session of its own.
    pid = int((emu_lab.state_dir / "rpi-emu" / "sshd.pid").read_text())
    assert os.getsid(pid) != os.getsid(0)


def test_rpi_emu_is_an_arm64_device_over_ssh(emu_lab):
    from edgeq.remote import open_transport
    from edgeq.targets import load_inventory

    target = load_inventory(emu_lab.inventory).targets["rpi-emu"]
    with open_transport(target) as transport:
        machine = transport.run(["uname", "-m"], timeout=60).stdout.strip()
        python = transport.run(["python3", "-c", "import platform; print(platform.machine())"], timeout=120)
    assert machine == "aarch64"
    assert python.stdout.strip() == "aarch64"


def test_unknown_host_key_of_emulated_device_is_refused(emu_lab, tmp_path, monkeypatch):
    """Without the lab's known_hosts the device is not trusted: nothing is auto-accepted."""
    from edgeq.errors import ConnectError
    from edgeq.remote import open_transport
    from edgeq.targets import load_inventory

    empty_home = tmp_path / "home"
    (empty_home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(empty_home))
    target = load_inventory(emu_lab.inventory).targets["rpi-emu"]
    target.known_hosts = None  # without the lab's own known_hosts file
    with pytest.raises(ConnectError, match="not trusted"), open_transport(target) as transport:
        transport.run(["true"], timeout=60)


def test_bench_int8_tflite_on_emulated_rpi_matches_host(emu_lab, device_venv, make_artifact, digits, tmp_path):
    """The issue's path: TFLite INT8 for rpi4 -> setup -> deploy+bench on rpi-emu with eval data -> report."""
    artifact = make_artifact("tflite", "int8", profile="rpi4")
    results = tmp_path / "results"
    started = time.monotonic()
    on_device = _cli("bench", str(artifact), "--target", "rpi-emu", "-i", str(emu_lab.inventory),
                     "--eval", str(digits["eval"]), "--output", str(results), *TINY_BENCH)
    device_seconds = time.monotonic() - started
    print(f"\nedgeq bench --target rpi-emu: {device_seconds:.1f}s\n{on_device.output}")
    assert on_device.exit_code == 0, on_device.output
    on_host = _cli("bench", str(artifact), "--target", "local", "--eval", str(digits["eval"]),
                   "--output", str(tmp_path / "host"), *TINY_BENCH)
    assert on_host.exit_code == 0, on_host.output

    device = json.loads(next(results.glob("rpi-emu__*.json")).read_text())
    host = json.loads(next((tmp_path / "host").glob("local__*.json")).read_text())
    assert device["status"] == "ok", device["error"]
    assert device["env"]["arch"] == "aarch64"
    assert device["env"]["emulated"] is True, device["env"].get("emulation_reason")
    assert host["env"]["arch"] == "x86_64" and not host["env"]["emulated"]
    assert device["artifact"]["id"] == host["artifact"]["id"]
    assert device["artifact"]["profile"] == "rpi4"
    assert device["runtime"]["name"] == host["runtime"]["name"]
    assert device["accuracy"]["samples"] == host["accuracy"]["samples"] == len(np.load(digits["eval"])["labels"])
    # The same INT8 model on the same inputs: the same top-1 accuracy and top-1 agreement with the FP32
    # source. The raw outputs may differ by one quantization step on a few samples (arm64 vs x86 kernels
    # round differently; test_raw_int8_outputs_on_device_and_host measures it), so cosine only nearly equal.
    assert device["accuracy"]["top1"] == host["accuracy"]["top1"]
    device_agreement, host_agreement = device["accuracy"]["agreement"], host["accuracy"]["agreement"]
    assert device_agreement["top1_agreement"] == host_agreement["top1_agreement"]
    assert device_agreement["cosine_similarity"] == pytest.approx(host_agreement["cosine_similarity"], abs=1e-5)
    print(f"top-1 device {device['accuracy']['top1']:.4f} host {host['accuracy']['top1']:.4f}; "
          f"p50 under emulation {device['latency_ms']['p50']:.3f} ms (meaningless) vs host "
          f"{host['latency_ms']['p50']:.3f} ms")

    report = _cli("report", str(results), str(tmp_path / "host"), "--csv", str(tmp_path / "report.csv"),
                  "--markdown", str(tmp_path / "report.md"))
    assert report.exit_code == 0, report.output
    rows = {row["target"]: row for row in csv.DictReader((tmp_path / "report.csv").open())}
    assert rows["rpi-emu"]["arch"] == "aarch64"
    assert rows["rpi-emu"]["emulated"].lower() in ("true", "1", "yes")
    markdown = (tmp_path / "report.md").read_text()
    assert "rpi-emu" in markdown and "emulat" in markdown


# Runs one TFLite model over every eval sample with one op resolver; identical on the device and the host.
_RAW_OUTPUTS_SCRIPT = """
import sys, numpy as np
from ai_edge_litert import interpreter as litert
model, inputs, output = sys.argv[1:4]
x = np.load(inputs)
results = {}
for mode in ("AUTO", "BUILTIN_REF"):  # AUTO: XNNPACK + optimized kernels; BUILTIN_REF: reference kernels
    it = litert.Interpreter(model_path=model, num_threads=1,
                            experimental_op_resolver_type=getattr(litert.OpResolverType, mode))
    it.allocate_tensors()
    source, sink = it.get_input_details()[0], it.get_output_details()[0]
    scale, zero_point = source["quantization"]
    rows = []
    for i in range(len(x)):
        q = np.clip(np.round(x[i:i + 1] / scale) + zero_point, -128, 127).astype(source["dtype"])
        it.set_tensor(source["index"], q.reshape(source["shape"]))
        it.invoke()
        rows.append(it.get_tensor(sink["index"]).copy())
    results[mode] = np.concatenate(rows)
np.savez(output, **results)
"""


def test_raw_int8_outputs_on_device_and_host(emu_lab, device_venv, make_artifact, digits, tmp_path):
    """The raw INT8 outputs of the same model on every eval sample, on the device (arm64 kernels, emulated
    Cortex-A72) and on the host (x86 kernels).

    Measured here: TFLite's reference kernels give bit-identical outputs on both (so the emulation computes
    exactly), and the optimized kernels (XNNPACK) differ by at most one quantization step on a few samples
    (1 of 450 for the digits model): arm64 NEON and x86 kernels requantize with different rounding. The
    class every sample gets is the same.
    """
    artifact = make_artifact("tflite", "int8", profile="rpi4")
    manifest = json.loads((artifact / "manifest.json").read_text())
    inputs = np.load(digits["eval"])["x"].astype(np.float32)

    stage = emu_lab.device.root / "tmp" / "rawcheck"  # inside the device's file system
    stage.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(artifact / manifest["model_file"], stage / "model.tflite")
    np.save(stage / "inputs.npy", inputs)
    (stage / "raw.py").write_text(_RAW_OUTPUTS_SCRIPT)
    ran = emu_lab.device.run([device_venv["python"], "/tmp/rawcheck/raw.py", "/tmp/rawcheck/model.tflite",
                              "/tmp/rawcheck/inputs.npy", "/tmp/rawcheck/outputs.npz"], timeout=900)
    assert ran.returncode == 0, ran.stderr[-2000:]
    (tmp_path / "raw.py").write_text(_RAW_OUTPUTS_SCRIPT)
    np.save(tmp_path / "inputs.npy", inputs)
    host_run = subprocess.run([sys.executable, str(tmp_path / "raw.py"), str(artifact / manifest["model_file"]),
                               str(tmp_path / "inputs.npy"), str(tmp_path / "outputs.npz")],
                              capture_output=True, text=True, timeout=300)
    assert host_run.returncode == 0, host_run.stderr[-2000:]

    device, host = np.load(stage / "outputs.npz"), np.load(tmp_path / "outputs.npz")
    assert np.array_equal(device["BUILTIN_REF"], host["BUILTIN_REF"]), "reference kernels differ: emulation bug?"
    steps = np.abs(device["AUTO"].astype(np.int32) - host["AUTO"].astype(np.int32))
    differing = int(np.any(steps > 0, axis=1).sum())
    print(f"\noptimized kernels: {differing} of {len(inputs)} samples differ, at most {steps.max()} "
          "quantization step(s); reference kernels: bit-identical")
    assert steps.max() <= 1
    assert differing <= len(inputs) // 50
    assert np.array_equal(device["AUTO"].argmax(axis=1), host["AUTO"].argmax(axis=1))


def test_restart_after_crash_cleans_stale_state(emu_lab, tmp_path):
    """A device whose controller died (sshd still running, mounts still there) is cleaned up by the next
    start, and stop leaves no mount and no process behind."""
    device = rpi_emu.RpiEmu(tmp_path / "crashy")
    first = device.start()
    try:
        mounts_running = rpi_emu.mounts_under(device.state_dir)
        assert mounts_running, "the device should have mounts while running"
        # "Crash": forget the object, start again on the same state dir.
        second = rpi_emu.RpiEmu(tmp_path / "crashy").start(port=first.port)
        assert second.pid != first.pid
        assert not rpi_emu.pid_alive(first.pid)
        assert second.port == first.port
        assert sorted(rpi_emu.mounts_under(device.state_dir)) == sorted(mounts_running)  # nothing stacked twice
    finally:
        device.stop()
    assert rpi_emu.mounts_under(device.state_dir) == []
    assert rpi_emu.processes_rooted_at(device.root) == []


def test_mender_installs_commits_and_rolls_back_on_the_emulated_arm64_device(emu_lab, tmp_path):
    """The Mender hand-off on an arm64 device reached over sshd: the artifacts and the edgeq-release module go
    over SFTP, and the device's own client (Debian's arm64 mender-client 3.4, standalone mode) installs,
    commits and rolls back, running the module under the device's python3."""
    from edgeq.cli import cli
    from edgeq.remote import open_transport
    from edgeq.targets import load_inventory
    from tests.sshd_fixtures import make_synthetic_artifact

    target = load_inventory(emu_lab.inventory).targets["rpi-emu"]
    workdir = "/var/lib/edgeq-mender"
    ids = []
    for name in ("first", "second"):
        artifact = make_synthetic_artifact(tmp_path / name, {"model.tflite": os.urandom(4096)})
        ids.append(json.loads((artifact / "manifest.json").read_text())["id"])
        packaged = CliRunner().invoke(cli, ["package", str(artifact), "--mender", "--device-type", "raspberrypi4",
                                            "--workdir", workdir, "-o", str(tmp_path / f"{name}.mender")])
        assert packaged.exit_code == 0, packaged.output
    (tmp_path / "mender.conf").write_text(json.dumps({"DeviceTypeFile": "/var/lib/mender/device_type"}))
    (tmp_path / "device_type").write_text("device_type=raspberrypi4\n")
    (tmp_path / "artifact_info").write_text("artifact_name=factory-image\n")
    (tmp_path / "fallback.conf").write_text("{}")
    mender = ["mender", "-c", "/etc/mender/mender.conf", "-b", "/var/lib/mender/fallback.conf",
              "-d", "/var/lib/mender", "--no-syslog"]
    with open_transport(target) as transport:
        if transport.run(["test", "-x", "/usr/bin/mender"], check=False, timeout=60).exit_code != 0:
            pytest.skip("the emulated root has no mender-client (a root cached before it was added)")
        # As on a Mender image, the package's /var/lib/mender links to the data partition's /data/mender.
        transport.run(["mkdir", "-p", "/etc/mender", "/data/mender", "/usr/share/mender/modules/v3"], timeout=60)
        for local, remote in (("mender.conf", "/etc/mender/mender.conf"), ("artifact_info", "/etc/mender/artifact_info"),
                              ("device_type", "/var/lib/mender/device_type"),
                              ("fallback.conf", "/var/lib/mender/fallback.conf"),
                              ("edgeq-release", "/usr/share/mender/modules/v3/edgeq-release"),
                              ("first.mender", "/tmp/first.mender"), ("second.mender", "/tmp/second.mender")):
            transport.put(tmp_path / local, remote)
        transport.run(["chmod", "755", "/usr/share/mender/modules/v3/edgeq-release"], timeout=60)

        def current() -> str:
            return transport.run(["readlink", f"{workdir}/current"], timeout=60).stdout.strip().split("/")[-1]

        def run(*args: str, expect: int = 0):
            result = transport.run([*mender, *args], check=False, timeout=600)
            assert result.exit_code == expect, (args, result.stdout, result.stderr)
            return result

        run("install", "/tmp/first.mender")
        assert current() == ids[0]
        run("commit")
        assert run("show-artifact").stdout.strip() == f"edgeq-tflite-int8-{ids[0]}"
        run("install", "/tmp/second.mender")
        assert current() == ids[1]
        run("rollback")
        assert current() == ids[0]
        assert run("show-artifact").stdout.strip() == f"edgeq-tflite-int8-{ids[0]}"
        arch = transport.run(["uname", "-m"], timeout=60).stdout.strip()
    assert arch == "aarch64"
