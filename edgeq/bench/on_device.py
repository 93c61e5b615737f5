"""One bench run on one device, over one connection: the release made sure of, stale runs cleaned, the
request and eval inputs uploaded, the device package's ``bench`` op run under its time limit, the result and
outputs downloaded (size-capped) and parsed strictly."""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.bench.evaldata import EvalData
from edgeq.errors import BenchError, EdgeqError
from edgeq.manifest import Manifest
from edgeq.remote.device import (
    LockedDevice,
    device_lock,
    device_op,
    device_python,
    device_workdir,
    release_dir,
)
from edgeq.targets import Target

log = logging.getLogger(__name__)

@dataclass
class BenchSettings:
    """How to measure: the runner's loop and the power sampling (None = the target profile's value)."""

    warmup: int = 10
    runs: int = 100
    min_seconds: float = 1.0
    threads: int | None = None
    power: bool = True
    idle_seconds: float | None = None
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise BenchError(f"warmup must be 0 or more, got {self.warmup}")
        if self.runs < 1:
            raise BenchError(f"runs must be at least 1, got {self.runs}")
        if self.min_seconds < 0:
            raise BenchError(f"min-seconds must be 0 or more, got {self.min_seconds}")
        if self.threads is not None and self.threads < 1:
            raise BenchError(f"threads must be at least 1, got {self.threads}")
        if self.idle_seconds is not None and self.idle_seconds < 0:
            raise BenchError(f"idle-seconds must be 0 or more, got {self.idle_seconds}")

    def time_limit(self, eval_samples: int) -> float:
        """Seconds the runner may take on the device before it is stopped."""
        if self.timeout_s:
            return float(self.timeout_s)
        return 300.0 + 3 * self.min_seconds + (self.idle_seconds or 0) * 2 + eval_samples * 0.5


# The runner is killed this long after its time limit if SIGTERM did not stop it.
KILL_AFTER_S = 10


# What a device may send back: the runner's result is a few hundred KiB at most (latency samples); the eval
# outputs are samples x output elements x 4 bytes (float32), allowed 4x that for wider types and framing.
MAX_RESULT_BYTES = 16 << 20


def _request(release: str, run_dir: str, settings: BenchSettings, profile, eval_on_device: bool) -> dict:
    power = profile.power.model_dump(mode="json") if profile is not None else {"sensor": "none"}
    if settings.idle_seconds is not None:
        power["idle_seconds"] = settings.idle_seconds
    power["enabled"] = settings.power
    return {
        "request_version": 1, "release_dir": release, "warmup": settings.warmup, "runs": settings.runs,
        "min_seconds": settings.min_seconds,
        "threads": settings.threads or (profile.threads if profile is not None else None),
        "threads_from_profile": settings.threads is None,
        "providers": profile.execution_providers if profile is not None else None,
        "openvino_device": profile.openvino_device if profile is not None else "CPU",
        "power": power, "eval_inputs": f"{run_dir}/eval_inputs.npz" if eval_on_device else None,
        "outputs": f"{run_dir}/outputs.npz", "stop_when_orphaned": True,
    }


def _ensure_release(transport, target: Target, artifact_dir: Path, manifest: Manifest) -> str:
    """The release directory on the device, uploading the artifact first (not activated) when it is not there
    intact, over the same connection."""
    from edgeq import deploy as deploy_mod

    workdir = device_workdir(transport, target)
    _, plan = deploy_mod.check_artifact(artifact_dir, allow_failed=True)
    state = device_op(transport, target, "inspect", {"workdir": workdir, "release_id": manifest.id,
                                                     "expected": {f.rel: f.sha256 for f in plan}})
    if not state.get("release_exists") or state.get("problems"):
        log.info("%s: release %s not on the device; deploying it", target.name, manifest.id)
        # Uploaded and verified, not activated: benching an artifact (perhaps one that failed its accuracy
        # gate) must not make it the device's active release.
        try:
            deploy_mod.deploy_over(transport, target, manifest, plan, activate=False)
        except EdgeqError as exc:
            # Still a connect or remote failure (say): the kind is what the lab decides on.
            raise BenchError(f"{target.label}: deploy before bench failed: {exc.message}", hint=exc.hint,
                             kind=exc.kind, host=exc.host, argv=exc.argv, exit_code=exc.exit_code) from exc
    return release_dir(transport, target, manifest.id)


def _locked_release(transport, target: Target, workdir: str, artifact_dir: Path, manifest: Manifest,
                    locks: contextlib.ExitStack):
    """(the bench lock's holder, the release directory), with the release on the device under both locks.

    One bench at a time on a device, and no deploy (swap, prune) while it runs; the bench lock's holder runs the
    bench step, so `edgeq targets unlock` stops it with the lock. The release is uploaded under the deploy lock,
    before the shared one can be taken: a deploy in between may prune it, so it is looked for again under the
    locks, and uploaded once more if it went."""
    for attempt in (1, 2):
        release = _ensure_release(transport, target, artifact_dir, manifest)
        device = locks.enter_context(device_lock(transport, target, workdir, "bench", lock="bench"))
        locks.enter_context(device_lock(transport, target, workdir, "bench", shared=True))
        if manifest.id in device_op(transport, target, "inspect", {"workdir": workdir}).get("releases", []):
            return device, release
        locks.close()  # both locks go; the upload needs the deploy lock exclusive
        log.info("%s: release %s was removed before the bench locked it (attempt %d)", target.name, manifest.id,
                 attempt)
    raise BenchError(f"{target.label}: release {manifest.id} was removed by a deploy twice before the bench could "
                     "lock it", hint="a deploy with a small --keep is pruning this device; bench after it", kind="remote")


def _remove_stale_runs(device: LockedDevice, runs_dir: str) -> None:
    """Remove run directories that dropped runs left on the device (never one that is still running: a live
    run holds its directory's flock; no clock is read). Under the bench lock."""
    target = device.target
    try:
        answer = device.op("clean_runs", {"runs_dir": runs_dir}, timeout=60)
    except EdgeqError as exc:
        log.info("%s: could not clean %s: %s", target.name, runs_dir, exc.message)
        return
    if answer.get("removed"):
        log.info("%s: removed %s stale run directories from %s", target.name, answer["removed"], runs_dir)


def run_on_device(target: Target, artifact_dir: Path, manifest: Manifest, settings: BenchSettings,
                   data: EvalData | None, scratch: Path) -> tuple[dict, Path | None]:
    """Upload, run the runner under a time limit in its own session, download; (runner result, outputs)."""
    from edgeq.profiles import load_profile
    from edgeq.remote import open_transport
    from edgeq.remote.base import SizeLimitError

    profile = load_profile(target.profile)
    with open_transport(target) as transport, contextlib.ExitStack() as locks:
        python = device_python(transport, target)
        workdir = device_workdir(transport, target)
        device, release = _locked_release(transport, target, workdir, artifact_dir, manifest, locks)
        limit = settings.time_limit(data.dataset.samples if data else 0)
        runs_dir = f"{workdir}/runs"
        _remove_stale_runs(device, runs_dir)
        run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
        run_dir = f"{runs_dir}/{run_id}"
        transport.run(["mkdir", "-p", run_dir], timeout=30)
        try:
            request = _request(release, run_dir, settings, profile, data is not None)
            (scratch / "request.json").write_text(json.dumps(request, indent=1))
            transport.put(scratch / "request.json", f"{run_dir}/request.json")
            if data is not None:
                transport.put(data.device_file, f"{run_dir}/eval_inputs.npz")
            # The device package's bench op runs the measurement in a session of its own under the limit,
            # with the interpreter ``targets setup`` made (isolated: -I).
            done = device.op("bench", {"request": f"{run_dir}/request.json", "result": f"{run_dir}/result.json",
                                       "limit_s": limit, "kill_after_s": KILL_AFTER_S},
                             python=python, timeout=limit + KILL_AFTER_S + 30)
            local_result = scratch / "result.json"
            try:
                transport.get(f"{run_dir}/result.json", local_result, max_bytes=MAX_RESULT_BYTES)
                runner = parse_runner_result(local_result.read_bytes(), target)
            except BenchError:
                raise
            except SizeLimitError as exc:  # a result this large is no runner's: say so, not "no result"
                raise BenchError(str(exc), hint="the device's runner or its disk may be broken", kind="remote") from exc
            except (EdgeqError, OSError, ValueError) as exc:
                why = ("timed out" if done.get("timed_out") else
                       f"stopped: {done['stopped']}" if done.get("stopped") else f"exit code {done.get('exit_code')}")
                raise BenchError(f"{target.label}: the runner left no result ({why})") from exc
            if runner.get("status") == "ok" and data is not None:
                transport.get(f"{run_dir}/outputs.npz", scratch / "outputs.npz",
                              max_bytes=_outputs_cap(manifest, data.dataset.samples))
                return runner, scratch / "outputs.npz"
            return runner, None
        finally:
            try:
                transport.run(["rm", "-rf", run_dir], timeout=30, check=False)
            except EdgeqError:
                log.info("%s: could not remove %s (connection lost?)", target.name, run_dir)


def _outputs_cap(manifest: Manifest, samples: int) -> int:
    elements = sum(int(np.prod([d or 1 for d in t.shape[1:]])) for t in manifest.outputs) or 1
    return 2 * samples * elements * 8 + (1 << 20)


def _reject_constant(name: str):
    raise ValueError(f"non-finite number {name}")


def parse_runner_result(raw: bytes, target: Target) -> dict:
    """The runner's result JSON as a dict, strictly: the runner writes finite numbers only (NaN and inf
    become null), so a NaN, Infinity or a non-object here is a broken or hostile device, and fails this
    target's result alone."""
    try:
        runner = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BenchError(f"{target.label}: the runner's result is not valid JSON ({' '.join(str(exc).split())[:120]})",
                         hint="the device's runner or its disk may be broken; see 'edgeq targets check'") from exc
    if not isinstance(runner, dict) or not isinstance(runner.get("status"), str):
        raise BenchError(f"{target.label}: the runner's result is not a result object")
    for key in ("env", "runtime", "latency_ms", "memory_mb", "power", "settings", "eval"):
        if runner.get(key) is not None and not isinstance(runner[key], dict):
            raise BenchError(f"{target.label}: the runner's result has a malformed '{key}' (not an object)")
    for key in ("load_ms", "first_inference_ms", "throughput_ips", "energy_j_per_inference", "timed_wall_s"):
        value = runner.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise BenchError(f"{target.label}: the runner's result has a non-numeric '{key}'")
    return runner
