"""The on-device runner on all three runtimes, in-process (main([...])) and as a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeq.device import env
from edgeq.device.bench import run as device_run
from edgeq.device.bench import runner as device_runner
from edgeq.device.bench import timing
from edgeq.device.runtimes import open_session
from edgeq.metrics import top_k_accuracy
from tests.test_bench_support import (  # noqa: F401 - fixture
    FORMATS,
    device_pyz,
    hand_artifacts,
    release_dir,
    run_argv,
)

QUICK = {"warmup": 2, "runs": 20, "min_seconds": 0}


def write_request(directory: Path, release: Path, **fields) -> Path:
    request = {"request_version": 1, "release_dir": str(release), **QUICK, "threads": 1, **fields}
    path = directory / "request.json"
    path.write_text(json.dumps(request))
    return path


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_latency_stats_known_answers():
    samples_ns = [int(ms * 1e6) for ms in range(1, 101)]  # 1..100 ms
    stats = timing.latency_stats(samples_ns)
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p95"] == pytest.approx(95.05)
    assert stats["p99"] == pytest.approx(99.01)
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["std"] == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert stats["cv"] == pytest.approx(stats["std"] / 50.5)
    assert (stats["min"], stats["max"], stats["count"]) == (1.0, 100.0, 100)
    assert stats["samples"][:3] == [1.0, 2.0, 3.0] and stats["samples_every"] == 1


def test_latency_samples_sent_back_are_thinned_but_the_statistics_use_all():
    """8 s of a 10 us model is 800k samples, a 17 MB result.json the controller refuses to download: the
    samples sent are every k-th in time order, the statistics are over every sample."""
    count = 3 * timing.MAX_SAMPLES_SENT + 7
    samples_ns = (np.arange(count) % 1000 + 1) * 1000  # 1..1000 us, repeating
    stats = timing.latency_stats(samples_ns)
    assert stats["count"] == count and stats["samples_every"] == 4
    assert len(stats["samples"]) == len(range(0, count, 4)) <= timing.MAX_SAMPLES_SENT
    assert stats["samples"][:2] == [0.001, 0.005]  # samples 0 and 4
    assert stats["mean"] == pytest.approx(np.mean(samples_ns) / 1e6)
    assert len(json.dumps(stats)) < 400_000


def test_timed_loop_needs_both_runs_and_min_seconds():
    calls = []
    samples, wall_ns = timing.timed_loop(lambda: calls.append(1), runs=5, min_seconds=0.05)
    assert len(samples) == len(calls) and len(samples) > 5
    assert wall_ns >= 0.05e9
    samples, _ = timing.timed_loop(lambda: time.sleep(0.002), runs=7, min_seconds=0)
    assert len(samples) == 7 and min(samples) >= 2_000_000


@pytest.mark.parametrize("fmt", FORMATS)
def test_runner_in_process(fmt, hand_artifacts, tmp_path, digits):  # noqa: F811
    release = release_dir(hand_artifacts[fmt], tmp_path)
    eval_x = np.load(digits["eval"])["x"][:60]
    labels = np.load(digits["eval"])["labels"][:60]
    np.savez(tmp_path / "eval_inputs.npz", x=eval_x)
    request = write_request(tmp_path, release, eval_inputs="eval_inputs.npz", outputs="outputs.npz",
                            power={"sensor": "none"})
    rc = device_runner.main(["--request", str(request), "--result", str(tmp_path / "result.json")])
    result = read(tmp_path / "result.json")
    assert rc == 0, result.get("traceback")
    assert result["status"] == "ok" and result["error"] is None
    latency = result["latency_ms"]
    assert latency["count"] == len(latency["samples"]) >= 20
    assert latency["min"] <= latency["p50"] <= latency["p99"] <= latency["max"]
    assert result["throughput_ips"] > 0 and result["load_ms"] > 0 and result["first_inference_ms"] > 0
    assert result["runtime"]["name"] == {"tflite": "tflite", "onnx": "onnxruntime", "openvino": "openvino"}[fmt]
    assert result["runtime"]["version"]
    assert result["env"]["arch"] and result["env"]["python"] and result["env"]["emulated"] is False
    memory = result["memory_mb"]
    assert memory["peak_rss"] >= memory["after_load_rss"] > 0
    assert result["power"] == {"available": False, "sensor": "none",
                               "reason": "the device profile has no power sensor (power.sensor: none)"}
    assert result["energy_j_per_inference"] is None
    # The outputs that came back are the model's real predictions: the trained CNN classifies digits.
    assert result["eval"]["samples"] == 60
    with np.load(tmp_path / "outputs.npz") as npz:
        scores = npz["output_0"]
    assert scores.shape == (60, 10) and scores.dtype == np.float32
    assert top_k_accuracy(scores, labels) > 0.7


@pytest.mark.parametrize("fmt", FORMATS)
def test_runner_as_subprocess(fmt, hand_artifacts, tmp_path):  # noqa: F811
    release = release_dir(hand_artifacts[fmt], tmp_path)
    request = write_request(tmp_path, release, threads=2)
    proc = subprocess.run(run_argv(device_pyz(tmp_path), request, tmp_path / "r.json"), capture_output=True,
                          text=True, timeout=120)
    result = read(tmp_path / "r.json")
    assert proc.returncode == 0, result.get("traceback")
    assert result["status"] == "ok" and result["latency_ms"]["count"] >= 20
    assert result["settings"]["threads"] == 2 and result["settings"]["power"] is False
    assert result["power"]["available"] is False and "turned off" in result["power"]["reason"]
    assert result["eval"] is None


def test_quantized_inputs_use_the_artifacts_scale(hand_artifacts, digits):  # noqa: F811
    session = open_session(hand_artifacts["tflite"] / "model.tflite", "tflite")
    spec = session.inputs[0]
    assert spec["dtype"] == "int8" and spec["quant"]
    x = np.load(digits["eval"])["x"][:1]
    prepared = session.prepare({spec["name"]: x})[spec["name"]]
    scale, zero_point = spec["quant"]
    assert prepared.dtype == np.int8
    assert np.array_equal(prepared, np.clip(np.round(x / scale) + zero_point, -128, 127).astype(np.int8))


def test_runtime_missing_is_reported(hand_artifacts, tmp_path):  # noqa: F811
    # A directory shadowing onnxruntime with a package that fails to import: the device lacks the runtime.
    shadow = tmp_path / "shadow" / "onnxruntime"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named onnxruntime')\n")
    release = release_dir(hand_artifacts["onnx"], tmp_path)
    request = write_request(tmp_path, release)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "shadow"))
    # Not isolated, so PYTHONPATH counts (a device step is always -I; this stands in for a broken device).
    proc = subprocess.run(run_argv(device_pyz(tmp_path), request, tmp_path / "r.json", isolated=False), env=env,
                          capture_output=True, timeout=60)
    result = read(tmp_path / "r.json")
    assert proc.returncode == 1
    assert result["status"] == "failed" and result["error_kind"] == "runtime_missing"
    assert result["error"].startswith("onnxruntime is not installed on this device")
    assert "\n" not in result["error"] and result["traceback"]


def test_bad_request_still_writes_a_result(tmp_path):
    rc = device_runner.main(["--request", str(tmp_path / "missing.json"), "--result", str(tmp_path / "r.json")])
    result = read(tmp_path / "r.json")
    assert rc == 1 and result["status"] == "failed" and "cannot read request" in result["error"]
    request = write_request(tmp_path, tmp_path / "no-release")
    assert device_runner.main(["--request", str(request), "--result", str(tmp_path / "r2.json")]) == 1
    assert "cannot read the artifact manifest" in read(tmp_path / "r2.json")["error"]


def test_eval_inputs_that_do_not_fit_fail_clearly(hand_artifacts, tmp_path):  # noqa: F811
    release = release_dir(hand_artifacts["onnx"], tmp_path)
    np.savez(tmp_path / "bad.npz", a=np.zeros((3, 8, 8, 1), np.float32), b=np.zeros((3, 4), np.float32))
    request = write_request(tmp_path, release, eval_inputs="bad.npz")
    assert device_runner.main(["--request", str(request), "--result", str(tmp_path / "r.json")]) == 1
    assert "have no array for model input" in read(tmp_path / "r.json")["error"]


def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_still_writes_a_result(hand_artifacts, tmp_path):  # noqa: F811
    release = release_dir(hand_artifacts["onnx"], tmp_path)
    request = write_request(tmp_path, release, min_seconds=60)
    proc = subprocess.Popen(run_argv(device_pyz(tmp_path), request, tmp_path / "r.json"))
    time.sleep(3)
    # A burst, as a stop really arrives: the watchdog's group signal, then timeout passing it on twice.
    # A signal that lands while the runner is writing its result must not lose the result.
    for _ in range(40):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        sent = time.perf_counter()
        while time.perf_counter() - sent < 0.0002:  # closer together than time.sleep can wait
            pass
    # 1, or killed by one of the burst's last signals once the result was written and the handler restored
    assert proc.wait(timeout=30) in (1, -signal.SIGTERM)
    result = read(tmp_path / "r.json")
    assert result["error_kind"] == "terminated" and "signal 15" in result["error"]


def _bench_launcher(pyz: Path, request: Path, result: Path, pid_file: Path, *, exit_code: bool) -> str:
    """Python source for a process that starts the device's ``bench`` step in a session of its own (as sshd
    and the local transport do), records its pid, and waits for it."""
    params = json.dumps({"request": str(request), "result": str(result), "limit_s": 300})
    return ("import subprocess,sys; p = subprocess.Popen([sys.executable, '-I', "
            f"{str(pyz)!r}, 'bench'], stdin=subprocess.PIPE, start_new_session=True); "
            f"p.stdin.write({params!r}.encode()); p.stdin.close(); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); "
            + ("sys.exit(p.wait())" if exit_code else "p.wait()"))


def test_orphaned_run_stops_itself(hand_artifacts, tmp_path):  # noqa: F811
    """When the process that started the device's bench step dies (a dropped SSH session), the step stops
    its run's whole session instead of running on, and the run still writes its result."""
    release = release_dir(hand_artifacts["onnx"], tmp_path)
    request = write_request(tmp_path, release, min_seconds=120, stop_when_orphaned=True)
    pid_file = tmp_path / "pid"
    launcher = _bench_launcher(device_pyz(tmp_path), request, tmp_path / "r.json", pid_file, exit_code=False)
    parent = subprocess.Popen([sys.executable, "-c", launcher])
    assert _wait_for(pid_file.exists)
    step_pid = int(pid_file.read_text())
    time.sleep(3)  # the run is loading or timing by now
    assert _alive(step_pid)
    parent.kill()
    parent.wait()
    assert _wait_for(lambda: not _alive(step_pid), timeout=15), "bench step outlived its parent"
    assert _wait_for((tmp_path / "r.json").exists, timeout=15)
    assert read(tmp_path / "r.json")["error_kind"] == "terminated"


def test_far_ancestor_exiting_does_not_stop_the_run(hand_artifacts, tmp_path):  # noqa: F811
    """A shell that started the controller in the background and then exited (``nohup ... &``, logout)
    re-parents the controller; the controller is alive, so the run goes on to its end."""
    release = release_dir(hand_artifacts["onnx"], tmp_path)
    request = write_request(tmp_path, release, min_seconds=4, stop_when_orphaned=True)
    pid_file, go_file = tmp_path / "pid", tmp_path / "go"
    # The controller: starts the bench step the way the local transport does, and waits for it.
    controller = _bench_launcher(device_pyz(tmp_path), request, tmp_path / "r.json", pid_file, exit_code=True)
    # The shell that started it: leaves it running and exits once told to (after the run started).
    shell = (f"import os,subprocess,sys,time; subprocess.Popen([sys.executable, '-c', {controller!r}]); "
             f"[time.sleep(0.05) for _ in iter(lambda: os.path.exists({str(go_file)!r}), True)]")
    far_ancestor = subprocess.Popen([sys.executable, "-c", shell])
    assert _wait_for(pid_file.exists)
    step_pid = int(pid_file.read_text())

    def run_loaded() -> bool:  # the runtime loads after both watchdogs have recorded their parents
        children = Path(f"/proc/{step_pid}/task/{step_pid}/children").read_text().split()
        return bool(children) and "onnxruntime" in Path(f"/proc/{children[0]}/maps").read_text()

    assert _wait_for(run_loaded)
    go_file.touch()
    assert far_ancestor.wait(timeout=10) == 0
    assert _alive(step_pid)
    assert _wait_for((tmp_path / "r.json").exists, timeout=60)
    result = read(tmp_path / "r.json")
    assert result["status"] == "ok", result["error"]
    assert result["timed_wall_s"] >= 4


def test_bench_step_stops_a_run_at_its_time_limit(hand_artifacts, tmp_path):  # noqa: F811
    release = release_dir(hand_artifacts["onnx"], tmp_path)
    request = write_request(tmp_path, release, min_seconds=120)
    params = {"request": str(request), "result": str(tmp_path / "r.json"), "limit_s": 4, "kill_after_s": 5}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-I", str(device_pyz(tmp_path)), "bench"], input=json.dumps(params),
                          capture_output=True, text=True, timeout=60)
    answer = json.loads(proc.stdout)
    assert proc.returncode == 0 and answer["timed_out"] is True and answer["stopped"] == "time limit"
    assert time.monotonic() - started < 30
    assert read(tmp_path / "r.json")["error_kind"] == "terminated"


def test_emulation_detection(tmp_path):
    x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: fpu sse sse2\n"
    arm = "processor\t: 0\nBogoMIPS\t: 108.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\n"
    emulated, reason = env.detect_emulation("aarch64", x86, binfmt_dir=str(tmp_path))
    assert emulated and "x86 CPU" in reason
    assert env.detect_emulation("aarch64", arm, binfmt_dir=str(tmp_path)) == (False, None)
    assert env.detect_emulation("x86_64", x86, binfmt_dir=str(tmp_path)) == (False, None)
    (tmp_path / "qemu-aarch64").write_text("enabled\ninterpreter /usr/bin/qemu-aarch64-static\n")
    emulated, reason = env.detect_emulation("aarch64", arm, binfmt_dir=str(tmp_path))
    assert emulated and "binfmt_misc" in reason
    assert env._cpu_model(arm) == "Cortex-A76"


def test_profile_threads_are_capped_to_usable_cpus_but_explicit_threads_are_not():
    cpus = device_run.usable_cpus()
    from_profile = {"threads": cpus + 3}
    device_run._cap_profile_threads(from_profile, {"threads_from_profile": True})
    assert from_profile["threads"] == cpus and from_profile["threads_requested"] == cpus + 3
    assert "capped" in from_profile["threads_note"]
    explicit = {"threads": cpus + 3}
    device_run._cap_profile_threads(explicit, {"threads_from_profile": False})
    assert explicit == {"threads": cpus + 3}
