"""Benchmark orchestration on the controller (see ``edgeq.bench``).

Everything that can be checked here is checked before anything runs on a device (artifact, eval data
against the model's inputs, labels against its classes). On the device the self-contained runner does the
timing (the device package's ``bench`` op); accuracy is computed here, so labels never leave the controller.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from edgeq.data import Dataset, InputSpec, check_labels_range, load_dataset, read_npz
from edgeq.errors import BenchError, DataError, EdgeqError
from edgeq.manifest import Manifest, TensorSpec, sha256_tree, verify_artifact
from edgeq.metrics import agreement, top_k_accuracy
from edgeq.remote.device import device_op, device_python, device_workdir, release_dir
from edgeq.targets import Target

log = logging.getLogger(__name__)

RESULT_SCHEMA_VERSION = 1
# The runner is killed this long after its time limit if SIGTERM did not stop it.
KILL_AFTER_S = 10
# Run directories a dropped run left behind (its cleanup needs the connection) are removed by a later run
# once they are older than twice their own time limit, which the name carries ("...-L<seconds>"); older
# runs' names without one are kept this long.
STALE_RUN_DEFAULT_S = 24 * 3600


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


@dataclass
class EvalData:
    """Eval inputs as they go to the device (keyed by artifact input name), and labels that stay here."""

    dataset: Dataset
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    reference: np.ndarray | None = None
    reference_note: str | None = None
    scores_output: str | None = None  # the artifact output compared (the scores)
    device_file: Path | None = field(default=None, repr=False)


def result_path(output_dir: str | Path, target_name: str, artifact_id: str) -> Path:
    """``RESULTS_DIR/<target>__<artifact-id>.json``."""
    return Path(output_dir) / f"{target_name}__{artifact_id}.json"


def _make_results_dir(output_dir: str | Path) -> Path:
    """Create RESULTS_DIR before anything runs, so a bad ``--output`` does not cost a device run."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"{output_dir}: cannot create the results directory ({exc.strerror})") from exc
    return path


def _write_result(path: Path, result: dict) -> None:
    tmp_path = path.with_suffix(".json.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
        tmp_path.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)
        raise BenchError(f"{path}: cannot write the result ({exc.strerror})") from exc


def _num_classes(spec: TensorSpec | None) -> int | None:
    if spec is None:
        return None
    dims = spec.shape[1:]
    if not dims or any(d is None for d in dims):
        return None
    return int(np.prod(dims))


def _read_eval(eval_path: str | Path, manifest: Manifest) -> Dataset:
    # Quantized artifacts take float data too: the runner quantizes with the artifact's own parameters.
    specs = [InputSpec(name=t.name, shape=list(t.shape), dtype="float32") for t in manifest.inputs]
    return load_dataset(eval_path, specs, role="eval")


def _checked_eval(dataset: Dataset, manifest: Manifest, scores_output: str | None) -> EvalData:
    scores = next((t for t in manifest.outputs if t.name == scores_output), None) if scores_output else None
    scores = scores or (manifest.outputs[0] if manifest.outputs else None)
    classes = _num_classes(scores)
    if classes:
        check_labels_range(dataset, classes)
    return EvalData(dataset=dataset, inputs=dict(dataset.inputs), labels=dataset.labels,
                    scores_output=scores.name if scores is not None else None)


def load_eval(eval_path: str | Path, manifest: Manifest, scores_output: str | None = None) -> EvalData:
    """Read eval data and check it against the artifact's inputs and the classes of ``scores_output`` (the
    artifact output that holds the scores; default its first output); DataError naming the file."""
    return _checked_eval(_read_eval(eval_path, manifest), manifest, scores_output)


def _load_source(manifest: Manifest):
    """(the manifest's source model loaded with the converter's source runner, None) or (None, why not).

    Only the very model the artifact was converted from is loaded: its sha256 is checked against the
    manifest's before anything reads it as a model, so a retrained source cannot silently change the
    reference, and a manifest naming some other model cannot make this machine load it.
    """
    source_path = Path(manifest.source.path)
    if not source_path.exists():
        return None, f"source model {source_path} is not on this machine"
    try:
        actual = sha256_tree(source_path)
    except OSError as exc:
        return None, f"source model {source_path} cannot be read: {exc.strerror or exc}"
    if actual != manifest.source.sha256:
        return None, (f"source model {source_path} is not the one this artifact was converted from (sha256 "
                      f"{actual[:12]}... != the manifest's {manifest.source.sha256[:12]}...): no fp32 reference")
    try:
        from edgeq.convert.source import load_source

        source = load_source(source_path)
        if source.sha256 != manifest.source.sha256:  # changed between the check and the load
            return None, f"source model {source_path} changed while it was loaded: no fp32 reference"
        return source, None
    except EdgeqError as exc:
        return None, f"source model {source_path} cannot be run here: {exc.message}"
    except Exception as exc:  # a third-party failure in a reference run must not lose the bench result
        log.warning("loading %s for the reference failed", source_path, exc_info=True)
        return None, f"source model {source_path} failed to load: {type(exc).__name__}: {exc}"


def _compared_output(manifest: Manifest, source) -> str | None:
    """The artifact output compared with the source's first output: the one whose ``source_name`` is that
    output's name (a converter may reorder outputs), as host validation picks it
    (``edgeq.convert.validate.primary_output_index``); the artifact's first output without a source."""
    if not manifest.outputs:
        return None
    if source is None:
        return manifest.outputs[0].name
    from edgeq.convert.validate import primary_output_index

    artifact = SimpleNamespace(outputs=[{"name": t.name} for t in manifest.outputs])
    source_names = {t.name: t.source_name for t in manifest.outputs if t.source_name}
    return manifest.outputs[primary_output_index(artifact, source, source_names)].name


def _reference_outputs(manifest: Manifest, source, data: EvalData) -> tuple[np.ndarray | None, str]:
    """FP32 first output of the manifest's source model on the eval inputs; (None, why) when it fails."""
    source_path = Path(manifest.source.path)
    try:
        feed = {}
        for spec in manifest.inputs:
            name = spec.source_name or spec.name
            if name not in [s.name for s in source.inputs] and len(source.inputs) == 1:
                name = source.inputs[0].name
            feed[name] = data.inputs[spec.name]
        outputs = source.run(feed)
    except EdgeqError as exc:
        return None, f"source model {source_path} cannot be run here: {exc.message}"
    except Exception as exc:  # a third-party failure in a reference run must not lose the bench result
        log.warning("reference run of %s failed", source_path, exc_info=True)
        return None, f"source model {source_path} failed to run: {type(exc).__name__}: {exc}"
    return outputs[0], f"{manifest.source.kind} source (fp32) {source_path.name}"


def compute_accuracy(scores: np.ndarray, labels: np.ndarray | None, reference: np.ndarray | None,
                     reference_note: str | None = None) -> dict:
    """Top-1/top-5 against labels, the FP32 reference's top-1 and the drop, and agreement with the reference."""
    scores = np.asarray(scores)
    out: dict = {"samples": int(len(scores)), "top1": None, "top5": None, "top1_reference": None,
                 "top1_drop": None, "agreement": None, "reference": reference_note}
    if labels is not None:
        out["top1"] = top_k_accuracy(scores, labels, 1)
        # With 5 classes or fewer every label is in the top 5: the figure would be 1.0 and mean nothing.
        out["top5"] = top_k_accuracy(scores, labels, 5) if scores.reshape(len(scores), -1).shape[1] > 5 else None
    if reference is not None:
        out["agreement"] = agreement(reference, scores)
        if labels is not None:
            out["top1_reference"] = top_k_accuracy(reference, labels, 1)
            out["top1_drop"] = out["top1_reference"] - out["top1"]
    return out


def _device_scores(target: Target, data: EvalData, outputs: Path, output_names: list[str]) -> np.ndarray:
    """The runner's outputs of ``data.scores_output``, checked against the FP32 reference's shape."""
    name = data.scores_output
    if not isinstance(output_names, list):
        raise BenchError(f"{target.label}: the runner's result has malformed eval output names")
    key = f"output_{output_names.index(name)}" if name in output_names else "output_0"
    try:  # the checked reader: a device's .npz may claim any header (size, dtype, shape)
        scores = read_npz(outputs).get(key)
    except DataError as exc:
        raise BenchError(f"{target.label}: the eval outputs from the device cannot be read ({exc})") from exc
    if scores is None or not np.issubdtype(scores.dtype, np.number) or scores.ndim < 1 \
            or len(scores) != data.dataset.samples:
        raise BenchError(f"{target.label}: the eval outputs from the device lack '{key}' for "
                         f"{data.dataset.samples} samples")
    if not np.all(np.isfinite(scores)):
        raise BenchError(f"{target.label}: the artifact's output '{name}' holds NaN or infinite values on "
                         f"{int(np.sum(~np.isfinite(scores).reshape(len(scores), -1).all(axis=1)))} of "
                         f"{len(scores)} eval samples", hint="the model or its runtime on the device is broken")
    if data.reference is not None and data.reference.shape != scores.shape:
        raise BenchError(f"{target.label}: artifact output '{name}' has shape {list(scores.shape)} but the "
                         f"source's first output has {list(data.reference.shape)}: they cannot be compared",
                         hint="the manifest's outputs need the source tensor names (source_name); reconvert")
    return scores


def _artifact_block(manifest: Manifest | None, artifact_dir: str | Path | None) -> dict:
    block = {"id": None, "model": None, "format": None, "precision": None, "profile": None, "size_bytes": None,
             "source_sha256": None, "validation_status": None,
             "path": str(artifact_dir) if artifact_dir is not None else None}
    if manifest is not None:
        block.update(id=manifest.id, model=manifest.source.path, format=manifest.format,
                     precision=manifest.precision, profile=manifest.profile.get("name"),
                     size_bytes=sum(f.size for f in manifest.files), source_sha256=manifest.source.sha256,
                     validation_status=manifest.validation.status)
    return block


def failed_result(target_name: str, manifest: Manifest | None, artifact_dir: str | Path | None,
                  settings: BenchSettings | None, error: str | None, *, artifact: dict | None = None,
                  started_at: str | None = None, duration_s: float | None = None) -> dict:
    """A schema-1 result with ``status: failed`` and nothing measured, for a (target, artifact) that produced
    no measurement, so reports still show it.

    ``manifest`` None (an artifact that was never built) leaves the artifact fields None unless ``artifact``
    gives them (its keys override the manifest's: format, precision, model...); ``settings`` None records
    the default ``BenchSettings``; ``started_at`` defaults to now (UTC).
    """
    settings = settings if settings is not None else BenchSettings()
    block = _artifact_block(manifest, artifact_dir)
    block.update(artifact or {})
    return {
        "schema_version": RESULT_SCHEMA_VERSION, "target": target_name, "status": "failed", "error": error,
        "started_at": started_at or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration_s": duration_s, "artifact": block, "env": None, "runtime": None,
        "settings": {"warmup": settings.warmup, "runs": settings.runs, "min_seconds": settings.min_seconds,
                     "threads": settings.threads, "power": settings.power},
        "load_ms": None, "first_inference_ms": None, "latency_ms": None, "throughput_ips": None,
        "accuracy": None, "memory_mb": None, "power": None, "energy_j_per_inference": None,
    }


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
            raise BenchError(f"{target.label}: deploy before bench failed: {exc.message}", hint=exc.hint) from exc
    return release_dir(transport, target, manifest.id)


def _runner_error(target: Target, runner: dict) -> str:
    message = runner.get("error") or "the runner failed without saying why"
    if runner.get("error_kind") == "runtime_missing":
        return f"{target.label}: runtime missing on the device: {message}"
    return f"{target.label}: runner failed: {message}"


def _remove_stale_runs(transport, target: Target, runs_dir: str) -> None:
    """Remove run directories that dropped runs left on the device (never one that may still be running)."""
    try:
        answer = device_op(transport, target, "clean_runs", {"runs_dir": runs_dir,
                                                              "default_age_s": STALE_RUN_DEFAULT_S}, timeout=60)
    except EdgeqError as exc:
        log.info("%s: could not clean %s: %s", target.name, runs_dir, exc.message)
        return
    if answer.get("removed"):
        log.info("%s: removed %s stale run directories from %s", target.name, answer["removed"], runs_dir)


def _run_on_device(target: Target, artifact_dir: Path, manifest: Manifest, settings: BenchSettings,
                   data: EvalData | None, scratch: Path) -> tuple[dict, Path | None]:
    """Upload, run the runner under a time limit in its own session, download; (runner result, outputs)."""
    from edgeq.profiles import load_profile
    from edgeq.remote import open_transport
    from edgeq.remote.base import SizeLimitError

    profile = load_profile(target.profile)
    with open_transport(target) as transport:
        python = device_python(transport, target)
        release = _ensure_release(transport, target, artifact_dir, manifest)
        limit = settings.time_limit(data.dataset.samples if data else 0)
        runs_dir = f"{device_workdir(transport, target)}/runs"
        _remove_stale_runs(transport, target, runs_dir)
        # The name carries how long the run may take, so a later run can tell when it is surely over.
        run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}-L{int(limit) + KILL_AFTER_S}"
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
            done = device_op(transport, target, "bench",
                             {"request": f"{run_dir}/request.json", "result": f"{run_dir}/result.json",
                              "limit_s": limit, "kill_after_s": KILL_AFTER_S},
                             python=python, timeout=limit + KILL_AFTER_S + 30)
            local_result = scratch / "result.json"
            try:
                transport.get(f"{run_dir}/result.json", local_result, max_bytes=MAX_RESULT_BYTES)
                runner = parse_runner_result(local_result.read_bytes(), target)
            except BenchError:
                raise
            except SizeLimitError as exc:  # a result this large is no runner's: say so, not "no result"
                raise BenchError(str(exc), hint="the device's runner or its disk may be broken") from exc
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


# What a device may send back: the runner's result is a few hundred KiB at most (latency samples); the eval
# outputs are samples x output elements x 4 bytes (float32), allowed 4x that for wider types and framing.
MAX_RESULT_BYTES = 16 << 20


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


def _merge(result: dict, runner: dict) -> None:
    for key in ("env", "runtime", "load_ms", "first_inference_ms", "latency_ms", "throughput_ips",
                "memory_mb", "power", "energy_j_per_inference"):
        if key in runner:
            result[key] = runner[key]
    run_settings = runner.get("settings") or {}
    result["settings"].update({k: run_settings[k] for k in ("threads", "threads_requested", "threads_note",
                                                            "idle_seconds", "interval_ms", "power_sensor")
                               if k in run_settings})
    if runner.get("timed_wall_s") is not None:
        result["timed_wall_s"] = runner["timed_wall_s"]


def bench(artifact_dir: str | Path, target: Target, *, eval_path: str | Path | None = None, warmup: int = 10,
          runs: int = 100, min_seconds: float = 1.0, threads: int | None = None, power: bool = True,
          output_dir: str | Path, idle_seconds: float | None = None, timeout_s: float | None = None,
          _prepared: tuple | None = None) -> dict:
    """Benchmark ``artifact_dir`` on ``target`` and write its result file; returns the result dict.

    Local problems (artifact, eval data) raise before anything runs. Anything that goes wrong on or on
    the way to the device gives a result with ``status: failed`` and a one-line ``error``, still written.
    """
    settings = BenchSettings(warmup, runs, min_seconds, threads, power, idle_seconds, timeout_s)
    artifact_dir = Path(artifact_dir)
    if _prepared is None:
        prepared = prepare(artifact_dir, eval_path)
        try:
            _make_results_dir(output_dir)
            return bench(artifact_dir, target, warmup=warmup, runs=runs, min_seconds=min_seconds, threads=threads,
                         power=power, output_dir=output_dir, idle_seconds=idle_seconds, timeout_s=timeout_s,
                         _prepared=prepared)
        finally:
            _discard(prepared)
    manifest, data = _prepared
    result = failed_result(target.name, manifest, artifact_dir, settings, None)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgeq-bench-") as tmp:
        scratch = Path(tmp)
        try:
            runner, outputs = _run_on_device(target, artifact_dir, manifest, settings, data, scratch)
            _merge(result, runner)
            if runner.get("status") != "ok":
                result["error"] = _runner_error(target, runner)
                result["runner_traceback"] = runner.get("traceback")
                if runner.get("error_kind") == "runtime_missing":
                    result["hint"] = f"run 'edgeq targets setup {target.name}' (installs the profile's runtime)"
            else:
                if data is not None and outputs is not None:
                    scores = _device_scores(target, data, outputs, runner["eval"]["output_names"])
                    result["accuracy"] = compute_accuracy(scores, data.labels, data.reference, data.reference_note)
                result["status"] = "ok"
        except EdgeqError as exc:
            result["error"] = exc.message if exc.message.startswith(target.label) else f"{target.label}: {exc.message}"
            if exc.hint:
                result["hint"] = exc.hint
        except Exception as exc:  # a bug for one target must not lose the others' results; say what it was
            log.exception("bench on %s failed unexpectedly", target.name)
            result["error"] = f"{target.label}: unexpected {type(exc).__name__}: {exc}"
    if result["error"]:
        result["error"] = " ".join(str(result["error"]).split())
    result["duration_s"] = time.monotonic() - started
    path = result_path(output_dir, target.name, manifest.id)
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:  # whatever got in, this target's result fails, not the run
        log.warning("%s: result not writable as strict JSON: %s", target.name, exc)
        result = failed_result(target.name, manifest, artifact_dir, settings,
                               f"{target.label}: the measurements hold values that are not finite numbers ({exc})",
                               duration_s=result["duration_s"])
    _write_result(path, result)
    result["result_file"] = str(path)
    return result


def prepare(artifact_dir: str | Path, eval_path: str | Path | None) -> tuple[Manifest, EvalData | None]:
    """Check the artifact and the eval data once (raises naming the file); run the FP32 reference."""
    artifact_dir = Path(artifact_dir)
    manifest = verify_artifact(artifact_dir)
    if eval_path is None:
        return manifest, None
    dataset = _read_eval(eval_path, manifest)  # shapes first: no model load for a file that does not fit
    source, why_not = _load_source(manifest)
    data = _checked_eval(dataset, manifest, _compared_output(manifest, source))
    if source is None:
        data.reference, data.reference_note = None, why_not
    else:
        data.reference, data.reference_note = _reference_outputs(manifest, source, data)
    # Labels stay here: the file that travels holds inputs only.
    fd, name = tempfile.mkstemp(prefix="edgeq-eval-", suffix=".npz")
    with open(fd, "wb") as handle:
        np.savez(handle, **data.inputs)
    data.device_file = Path(name)
    return manifest, data


def _discard(prepared: tuple) -> None:
    if prepared[1] is not None and prepared[1].device_file:
        prepared[1].device_file.unlink(missing_ok=True)


def bench_fleet(artifact_dir: str | Path, targets: list[Target], *, output_dir: str | Path, parallel: int = 8,
                **kwargs) -> list[dict]:
    """``bench`` on every target in parallel (bounded pool); one result per target, in ``targets`` order."""
    if parallel < 1:
        raise BenchError(f"parallel must be at least 1, got {parallel}")
    prepared = prepare(artifact_dir, kwargs.pop("eval_path", None))
    try:
        _make_results_dir(output_dir)
        with ThreadPoolExecutor(max_workers=min(parallel, max(len(targets), 1))) as pool:
            futures = [pool.submit(bench, artifact_dir, target, output_dir=output_dir, _prepared=prepared, **kwargs)
                       for target in targets]
            return [future.result() for future in futures]
    finally:
        _discard(prepared)
