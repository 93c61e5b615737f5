"""``edgeq bench`` end to end: on ``local`` and over real sshd devices, with failing targets and a dropped
connection; accuracy metrics against constructed outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from edgeq.bench import RESULT_SCHEMA_VERSION, bench, bench_fleet, compute_accuracy
from edgeq.cli import cli
from edgeq.errors import DataError
from edgeq.targets import load_inventory, local_target, resolve_targets
from tests.test_bench_support import hand_artifacts  # noqa: F401 - fixture

QUICK = ["--warmup", "2", "--runs", "20", "--min-seconds", "0", "--idle-seconds", "0"]
QUICK_KW = {"warmup": 2, "runs": 20, "min_seconds": 0, "idle_seconds": 0}
TOP_KEYS = {"schema_version", "target", "status", "error", "started_at", "duration_s", "artifact", "env", "runtime",
            "settings", "load_ms", "first_inference_ms", "latency_ms", "throughput_ips", "accuracy", "memory_mb",
            "power", "energy_j_per_inference"}


def test_accuracy_known_answers():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], np.float32)
    labels = np.array([1, 1, 2, 2])
    reference = np.array([[0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.1, 0.2, 0.7]], np.float32)
    out = compute_accuracy(scores, labels, reference, "fp32")
    assert out["samples"] == 4
    assert out["top1"] == 0.5  # samples 0 and 2
    assert out["top5"] is None  # 3 classes: every label is in the top 5, which measures nothing
    ten_classes = np.eye(10, dtype=np.float32)[[3, 1, 2, 0, 4, 5]] + np.linspace(0, 0.5, 10, dtype=np.float32)
    # Scores favour the labelled class (ranked 1st), then the highest-numbered classes: top-5 = {c, 9, 8, 7, 6}.
    assert compute_accuracy(ten_classes, np.array([3, 1, 2, 0, 4, 5]), None)["top5"] == 1.0
    assert compute_accuracy(ten_classes, np.array([9, 8, 7, 6, 0, 1]), None)["top5"] == pytest.approx(4 / 6)
    assert out["top1_reference"] == 1.0 and out["top1_drop"] == 0.5
    assert out["agreement"]["top1_agreement"] == 0.5
    assert out["agreement"]["max_abs_error"] == pytest.approx(0.6)
    no_labels = compute_accuracy(scores, None, None, None)
    assert no_labels["top1"] is None and no_labels["agreement"] is None and no_labels["samples"] == 4


@pytest.fixture
def local_workdir(tmp_path, monkeypatch) -> Path:
    workdir = tmp_path / "local-device"
    monkeypatch.setenv("EDGEQ_LOCAL_WORKDIR", str(workdir))
    return workdir


@pytest.mark.parametrize("fmt", ["tflite", "onnx", "openvino"])
def test_bench_local_with_eval(fmt, hand_artifacts, digits, tmp_path, local_workdir):  # noqa: F811
    artifact = hand_artifacts[fmt]
    run = bench(artifact, local_target(), eval_path=digits["eval"], output_dir=tmp_path / "results", **QUICK_KW)
    assert run.ok, run.result.error
    manifest_id = json.loads((artifact / "manifest.json").read_text())["id"]
    path = tmp_path / "results" / f"local__{manifest_id}.json"
    assert run.path == path and run.result.failure is None
    written = json.loads(path.read_text())
    assert written == run.result.to_json_dict()
    assert set(written) >= TOP_KEYS and written["schema_version"] == RESULT_SCHEMA_VERSION == 2
    assert written["artifact"]["name"] == Path(digits["model"]).stem
    assert written["artifact"]["source_path"] == str(digits["model"])
    assert written["artifact"]["format"] == fmt and written["artifact"]["id"] == manifest_id
    accuracy = written["accuracy"]
    assert accuracy["samples"] == 450 and accuracy["top1"] > 0.7
    # The FP32 keras source ran here on the same inputs: int8 agrees closely, fp32 exactly.
    assert accuracy["top1_reference"] == pytest.approx(digits["accuracy"], abs=1e-6)
    assert accuracy["top1_drop"] == pytest.approx(accuracy["top1_reference"] - accuracy["top1"])
    assert accuracy["agreement"]["top1_agreement"] > (0.95 if fmt == "tflite" else 0.999)
    assert written["latency_ms"]["count"] >= 20 and written["env"]["emulated"] is False
    # Deployed on demand but not activated (bench never changes the device's active release); the run's
    # scratch directory (which held the eval inputs) is gone.
    assert (local_workdir / "releases" / manifest_id / "manifest.json").is_file()
    assert not (local_workdir / "current").exists() and not (local_workdir / "current").is_symlink()
    assert list((local_workdir / "runs").iterdir()) == []


def test_labels_never_reach_the_device(hand_artifacts, digits, tmp_path, local_workdir, monkeypatch):  # noqa: F811
    from edgeq.remote.local import LocalTransport

    uploaded = []
    original = LocalTransport.put

    def spy(self, local_path, remote_path, progress=None):
        if str(remote_path).endswith(".npz"):
            with np.load(local_path) as npz:
                uploaded.append(sorted(npz.files))
        return original(self, local_path, remote_path, progress)

    monkeypatch.setattr(LocalTransport, "put", spy)
    run = bench(hand_artifacts["onnx"], local_target(), eval_path=digits["eval"], output_dir=tmp_path, **QUICK_KW)
    assert run.ok
    assert uploaded == [["x"]]


def test_eval_data_that_does_not_fit_fails_before_anything_runs(hand_artifacts, tmp_path, local_workdir):  # noqa: F811
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((5, 28, 28, 1), np.float32), labels=np.zeros(5, np.int64))
    with pytest.raises(DataError, match=r"bad.npz: array for input '.*' has shape \[5, 28, 28, 1\]"):
        bench(hand_artifacts["onnx"], local_target(), eval_path=bad, output_dir=tmp_path / "r", **QUICK_KW)
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=np.zeros((5, 8, 8, 1), np.float32), labels=np.array([0, 1, 2, 3, 12]))
    result = CliRunner().invoke(cli, ["bench", str(hand_artifacts["onnx"]), "--target", "local", "--eval",
                                      str(labels), "-o", str(tmp_path / "r"), *QUICK])
    assert result.exit_code == 1
    assert "error: " in result.output and "label 12 is out of range: the model has 10 classes" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r").exists() and not local_workdir.exists()


def _fleet_inventory(trusted_inventory, tmp_path: Path, overrides: dict[str, dict]) -> Path:
    data = yaml.safe_load(trusted_inventory.path.read_text())
    for name, fields in overrides.items():
        data["targets"][name].update(fields)
    path = tmp_path / "bench-inventory.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.sshd
def test_bench_fleet_over_ssh_keeps_results_when_one_target_fails(hand_artifacts, trusted_inventory, tmp_path):  # noqa: F811
    inventory = _fleet_inventory(trusted_inventory, tmp_path, {"dev-2": {"python": "/nonexistent/python3"}})
    out = tmp_path / "results"
    stale = _aged(trusted_inventory.workdirs["dev-0"] / "runs" / f"20250101T000000-{os.getpid():08x}-L60", 500)
    result = CliRunner().invoke(cli, ["bench", str(hand_artifacts["tflite"]), "--target", "fleet", "-i",
                                      str(inventory), "-o", str(out), *QUICK])
    assert result.exit_code == 1, result.output
    manifest_id = json.loads((hand_artifacts["tflite"] / "manifest.json").read_text())["id"]
    results = {name: json.loads((out / f"{name}__{manifest_id}.json").read_text()) for name in trusted_inventory.devices}
    for name in ("dev-0", "dev-1"):
        assert results[name]["status"] == "ok", results[name]["error"]
        assert results[name]["latency_ms"]["count"] >= 20 and results[name]["runtime"]["name"] == "tflite"
        assert (trusted_inventory.workdirs[name] / "releases" / manifest_id).is_dir()
    assert not stale.exists(), "a stale run directory survived a run over SSH"
    failed = results["dev-2"]
    assert failed["status"] == "failed" and failed["latency_ms"] is None
    assert failed["error"].startswith("dev-2 (") and "no '/nonexistent/python3' interpreter" in failed["error"]
    assert failed["failure"]["kind"] == "remote" and failed["failure"]["host"] == "dev-2"
    assert "\n" not in failed["error"]
    assert "error: dev-2 (" in result.output


def _venv_python(root: Path, *site_dirs: Path) -> Path:
    """A real venv's python whose site-packages reach ``site_dirs`` (in order) through .pth files, which
    Python reads even in isolated mode (-I), unlike PYTHONPATH."""
    import venv

    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    for index, directory in enumerate(site_dirs):
        (Path(purelib) / f"{index:02d}-edgeq-test.pth").write_text(f"{directory}\n")
    return python


@pytest.mark.sshd
def test_runtime_missing_on_the_device(hand_artifacts, trusted_inventory, tmp_path):  # noqa: F811
    import sysconfig

    shadow = tmp_path / "shadow" / "onnxruntime"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named onnxruntime')\n")
    # dev-1: a device with numpy but without onnxruntime; dev-2: a bare python (not even numpy).
    without_ort = _venv_python(tmp_path / "venv-no-ort", tmp_path / "shadow", Path(sysconfig.get_paths()["purelib"]))
    bare = _venv_python(tmp_path / "venv-bare")
    inventory = _fleet_inventory(trusted_inventory, tmp_path, {"dev-1": {"python": str(without_ort)},
                                                               "dev-2": {"python": str(bare)}})
    targets = resolve_targets(load_inventory(inventory), "fleet")
    results = [run.result.to_json_dict()
               for run in bench_fleet(hand_artifacts["onnx"], targets, output_dir=tmp_path / "r", **QUICK_KW)]
    assert results[0]["status"] == "ok"
    assert results[1]["failure"]["kind"] == results[2]["failure"]["kind"] == "runner"
    assert results[1]["status"] == results[2]["status"] == "failed"
    assert results[1]["error"].startswith("dev-1 (") and "runtime missing on the device: onnxruntime is not " \
        "installed on this device" in results[1]["error"]
    assert results[2]["error"].startswith("dev-2 (") and "runtime missing on the device: numpy is not " \
        "installed on this device" in results[2]["error"]
    assert results[1]["hint"] == "run 'edgeq targets setup dev-1' (installs the profile's runtime)"
    result = CliRunner().invoke(cli, ["bench", str(hand_artifacts["onnx"]), "--target", "dev-2", "-i",
                                      str(inventory), "-o", str(tmp_path / "r2"), *QUICK])
    assert result.exit_code == 1 and "hint: run 'edgeq targets setup dev-2'" in result.output


def _runner_pids(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if ".pyz run --request" in cmdline and marker in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.mark.sshd
def test_dropped_connection_leaves_no_orphan(hand_artifacts, trusted_inventory, tmp_path):  # noqa: F811
    device = trusted_inventory.devices["dev-0"]
    workdir = str(trusted_inventory.workdirs["dev-0"])
    target = resolve_targets(load_inventory(trusted_inventory.path), "dev-0")[0]
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(bench(
        hand_artifacts["onnx"], target, output_dir=tmp_path / "r", warmup=2, runs=20, min_seconds=120,
        idle_seconds=0).result.to_json_dict()))
    worker.start()
    deadline = time.monotonic() + 60
    while not _runner_pids(workdir) and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = _runner_pids(workdir)
    assert pids, "the runner never started"
    time.sleep(1.0)
    assert device.kill_sessions() >= 1
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert outcome["status"] == "failed" and outcome["error"].startswith("dev-0 (")
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") and _runner_pids(workdir) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _runner_pids(workdir) == [], "the runner kept running after its connection dropped"


def test_unusable_results_dir_fails_before_the_device_run(hand_artifacts, tmp_path, local_workdir):  # noqa: F811
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file\n")
    result = CliRunner().invoke(cli, ["bench", str(hand_artifacts["onnx"]), "--target", "local",
                                      "-o", str(blocker / "results"), *QUICK])
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {blocker / 'results'}: cannot create the results directory (")
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not local_workdir.exists(), "the device run went ahead though its result could not be written"


def test_reordered_outputs_are_matched_by_source_name(digits, tmp_path, local_workdir):
    """The artifact's outputs come out as [aux, scores] while the source's are [scores, aux]: accuracy and
    agreement use the artifact output whose source_name is the source's first output."""
    from tests.test_bench_support import build_two_head_artifact

    artifact = build_two_head_artifact(digits, tmp_path / "two-head")
    result = bench(artifact, local_target(), eval_path=digits["eval"], output_dir=tmp_path / "r",
                   **QUICK_KW).result.to_json_dict()
    assert result["status"] == "ok", result["error"]
    accuracy = result["accuracy"]
    assert accuracy["samples"] == 450 and accuracy["top1"] is not None
    # Same FP32 model on both sides: the compared outputs are the same tensor.
    assert accuracy["agreement"]["top1_agreement"] == 1.0 and accuracy["agreement"]["max_abs_error"] < 1e-4
    assert accuracy["top1_drop"] == pytest.approx(0.0, abs=1e-9)

    # Without the source names there is no telling which output is the scores: a one-line error, not a crash.
    unmapped = build_two_head_artifact(digits, tmp_path / "unmapped", with_source_names=False)
    no_labels = tmp_path / "inputs-only.npz"
    np.savez(no_labels, x=np.load(digits["eval"])["x"][:40])
    result = bench(unmapped, local_target(), eval_path=no_labels, output_dir=tmp_path / "r",
                   **QUICK_KW).result.to_json_dict()
    assert result["status"] == "failed" and result["failure"]["kind"] == "runner"
    assert result["error"].startswith("local") and "has shape [40, 3] but the source's first output has [40, 10]" \
        in result["error"]


def _aged(path: Path, seconds: float) -> Path:
    path.mkdir(parents=True)
    (path / "eval_inputs.npz").write_bytes(b"left behind by a dropped run")
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))
    return path


_HOLD_FLOCK = "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print(1, flush=True); " \
              "time.sleep(300)"


def test_a_run_removes_what_dropped_runs_left_but_never_a_live_one(hand_artifacts, tmp_path, local_workdir):  # noqa: F811
    """A run is live while a process holds its directory's .live flock; no clock is read. The live run here
    has a directory dated three days back, as a device whose clock jumped two days forward (NTP reachable at
    last, no RTC) sees it: the old rule, older than twice the run's limit, deleted it under the run."""
    runs = local_workdir / "runs"
    _aged(runs / "20250101T000000-0badc0de-L60", 121)  # an old-style name, long over
    just_left = _aged(runs / "20261206T000000-00c0ffee", 0)  # a controller died right after making it
    (just_left / ".live").touch()  # and its run had started: the flock went with it
    live = _aged(runs / "20261206T000000-feedf00d", 3 * 24 * 3600)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_FLOCK, str(live / ".live")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"1"
        run = bench(hand_artifacts["onnx"], local_target(), output_dir=tmp_path / "r", **QUICK_KW)
        assert run.ok, run.result.error
        assert sorted(p.name for p in runs.iterdir()) == [live.name]
        assert (live / "eval_inputs.npz").exists()
    finally:
        holder.kill()
        holder.wait()


def test_failed_result_for_a_built_and_an_unbuilt_artifact(hand_artifacts, tmp_path):  # noqa: F811
    from edgeq.bench import BenchSettings, failed_result
    from edgeq.errors import Failure
    from edgeq.manifest import read_manifest
    from edgeq.report import load_results

    manifest = read_manifest(hand_artifacts["onnx"])
    built = failed_result("dev-1", manifest, hand_artifacts["onnx"], BenchSettings(warmup=3, runs=7),
                          Failure(kind="connect", message="dev-1: deploy failed", host="dev-1"),
                          duration_s=1.5).to_json_dict()
    assert set(built) >= TOP_KEYS and built["failure"]["kind"] == "connect" and built["status"] == "failed" and built["error"] == "dev-1: deploy failed"
    assert built["artifact"]["id"] == manifest.id and built["artifact"]["format"] == "onnx"
    assert built["settings"]["warmup"] == 3 and built["settings"]["runs"] == 7 and built["duration_s"] == 1.5
    assert built["latency_ms"] is None and built["accuracy"] is None and built["power"] is None
    unbuilt = failed_result("dev-2", None, None, None, Failure(kind="artifact", message="conversion failed"),
                            artifact={"name": "digits", "format": "tflite", "precision": "int8"}).to_json_dict()
    assert unbuilt["artifact"]["id"] is None and unbuilt["artifact"]["format"] == "tflite"
    assert unbuilt["settings"]["runs"] == BenchSettings().runs and unbuilt["started_at"].endswith("Z")
    for name, result in (("built", built), ("unbuilt", unbuilt)):
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    loaded = load_results([tmp_path])
    assert not loaded.broken and sorted(r.result.target for r in loaded.records) == ["dev-1", "dev-2"]


@pytest.mark.sshd
def test_a_release_pruned_before_the_bench_locks_it_is_uploaded_again(
        hand_artifacts, trusted_inventory, tmp_path, monkeypatch):  # noqa: F811
    """The release is uploaded under the deploy lock, and the bench's shared lock comes after: a deploy's prune in
    between would leave the bench without its model. The bench looks again under its locks and uploads once more;
    if the release is gone a second time it stops with a one-line error."""
    import shutil

    from edgeq.bench import on_device
    from edgeq.manifest import read_manifest

    (device,) = resolve_targets(load_inventory(trusted_inventory.path), "dev-0")
    release = trusted_inventory.workdirs["dev-0"] / "releases" / read_manifest(hand_artifacts["onnx"]).id
    real, uploads = on_device._ensure_release, []

    def pruned_after_upload(*args, times):
        uploaded = real(*args)
        uploads.append(release.is_dir())
        if len(uploads) <= times:
            shutil.rmtree(release)  # what a concurrent deploy's prune does in the window
        return uploaded

    monkeypatch.setattr(on_device, "_ensure_release", lambda *a: pruned_after_upload(*a, times=1))
    run = bench(hand_artifacts["onnx"], device, output_dir=tmp_path / "r1", **QUICK_KW)
    assert run.ok, run.result.error
    assert uploads == [True, True] and release.is_dir()  # uploaded, pruned, looked for, uploaded again
    uploads.clear()
    monkeypatch.setattr(on_device, "_ensure_release", lambda *a: pruned_after_upload(*a, times=2))
    run = bench(hand_artifacts["onnx"], device, output_dir=tmp_path / "r2", **QUICK_KW)
    assert not run.ok and len(uploads) == 2
    assert "was removed by a deploy twice before the bench could lock it" in run.result.error
