"""Benchmark orchestration on the controller (see ``edgeq.bench``).

Everything that can be checked here is checked before anything runs on a device (artifact, eval data
against the model's inputs, labels against its classes: ``evaldata``). On the device the device package's
``bench`` op does the timing (``on_device``); accuracy is computed here, so labels never leave the
controller. Every attempt ends in a ``BenchResult`` written to ``RESULTS_DIR/<target>__<artifact-id>.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError as PydanticValidationError

from edgeq.bench.evaldata import (
    compute_accuracy,
    device_metrics,
    device_output_agreement,
    device_outputs,
    device_scores,
    discard,
    prepare,
)
from edgeq.bench.on_device import BenchSettings, run_on_device
from edgeq.config import format_validation_error
from edgeq.errors import BenchError, EdgeqError, Failure, internal_failure
from edgeq.manifest import Manifest
from edgeq.result import AccuracyStats, BenchResult, model_name
from edgeq.targets import Target
from edgeq.taskmetrics import Metric, check_labels

log = logging.getLogger(__name__)


@dataclass
class BenchRun:
    """What ``bench`` gives back: the result as it was written, and the file it was written to."""

    result: BenchResult
    path: Path

    @property
    def ok(self) -> bool:
        return self.result.status == "ok"


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


def _write_result(path: Path, result: BenchResult) -> None:
    tmp_path = path.with_suffix(".json.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path.write_text(json.dumps(result.to_json_dict(), indent=1, allow_nan=False) + "\n")
        tmp_path.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)
        raise BenchError(f"{path}: cannot write the result ({exc.strerror})") from exc


def _artifact_block(manifest: Manifest | None, artifact_dir: str | Path | None) -> dict:
    block = {"path": str(artifact_dir) if artifact_dir is not None else None}
    if manifest is not None:
        block.update(id=manifest.id, name=model_name(manifest.source.path), source_path=manifest.source.path,
                     format=manifest.format, precision=manifest.precision, profile=manifest.profile.get("name"),
                     size_bytes=sum(f.size for f in manifest.files), source_sha256=manifest.source.sha256,
                     validation_status=manifest.validation.status)
    return block


def failed_result(target_name: str, manifest: Manifest | None, artifact_dir: str | Path | None,
                  settings: BenchSettings | None, failure: Failure, *, artifact: dict | None = None,
                  started_at: str | None = None, duration_s: float | None = None) -> BenchResult:
    """The result of a (target, artifact) that produced no measurement, ``status: failed`` with ``failure``,
    so reports still show it.

    ``manifest`` None (an artifact that was never built) leaves the artifact fields None unless ``artifact``
    gives them (its keys override the manifest's: name, format, precision...); ``settings`` None records
    the default ``BenchSettings``; ``started_at`` defaults to now (UTC).
    """
    settings = settings if settings is not None else BenchSettings()
    block = _artifact_block(manifest, artifact_dir)
    block.update(artifact or {})
    return BenchResult(
        target=target_name, status="failed", error=failure.message, hint=failure.hint, failure=failure,
        started_at=started_at or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        duration_s=duration_s, artifact=block, env=None,
        settings={"warmup": settings.warmup, "runs": settings.runs, "min_seconds": settings.min_seconds,
                  "threads": settings.threads, "power": settings.power})


def _runner_failure(target: Target, runner: dict) -> Failure:
    message = " ".join(str(runner.get("error") or "the runner failed without saying why").split())
    if runner.get("error_kind") == "runtime_missing":
        return Failure(kind="runner", host=target.name, message=f"{target.label}: runtime missing on the device: "
                       f"{message}", hint=f"run 'edgeq targets setup {target.name}' (installs the profile's runtime)")
    return Failure(kind="runner", host=target.name, message=f"{target.label}: runner failed: {message}")


def _measured(result: BenchResult, runner: dict) -> BenchResult:
    """``result`` with the runner's measurements in; ValueError (one line) when the device sent fields that do
    not fit the result model."""
    data = result.to_json_dict()
    for key in ("env", "runtime", "load_ms", "first_inference_ms", "latency_ms", "throughput_ips",
                "memory_mb", "power", "energy_j_per_inference", "timed_wall_s"):
        if runner.get(key) is not None:
            data[key] = runner[key]
    run_settings = runner.get("settings") or {}
    data["settings"].update({k: run_settings[k] for k in ("threads", "threads_requested", "threads_note",
                                                          "idle_seconds", "interval_ms", "power_sensor")
                             if k in run_settings})
    try:
        return BenchResult.model_validate(data)
    except PydanticValidationError as exc:
        raise ValueError(format_validation_error(exc, "result")) from exc


def bench(artifact_dir: str | Path, target: Target, *, eval_path: str | Path | None = None, warmup: int = 10,
          runs: int = 100, min_seconds: float = 1.0, threads: int | None = None, power: bool = True,
          output_dir: str | Path, idle_seconds: float | None = None, timeout_s: float | None = None,
          metrics: Sequence[Metric] = (), _prepared: tuple | None = None) -> BenchRun:
    """Benchmark ``artifact_dir`` on ``target`` and write its result file; returns the result and its path.

    Local problems (artifact, eval data) raise before anything runs. Anything that goes wrong on or on
    the way to the device gives a result with ``status: failed`` and a typed ``failure``, still written.
    ``metrics`` (``edgeq.taskmetrics``, parsed by the caller) are computed here on the device's eval outputs
    against the FP32 source's, into ``accuracy.metrics``.
    """
    settings = BenchSettings(warmup, runs, min_seconds, threads, power, idle_seconds, timeout_s)
    artifact_dir = Path(artifact_dir)
    if _prepared is None:
        prepared = prepare(artifact_dir, eval_path)
        try:
            _make_results_dir(output_dir)
            return bench(artifact_dir, target, warmup=warmup, runs=runs, min_seconds=min_seconds, threads=threads,
                         power=power, output_dir=output_dir, idle_seconds=idle_seconds, timeout_s=timeout_s,
                         metrics=metrics, _prepared=prepared)
        finally:
            discard(prepared)
    manifest, data = _prepared
    if data is not None:
        check_labels(list(metrics), data.labels is not None, data.dataset.path)
    started_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    started = time.monotonic()
    result = failed_result(target.name, manifest, artifact_dir, settings,
                           Failure(kind="internal", message="not run"), started_at=started_at)
    with tempfile.TemporaryDirectory(prefix="edgeq-bench-") as tmp:
        try:
            runner, outputs = run_on_device(target, artifact_dir, manifest, settings, data, Path(tmp))
            result = _measured(result, runner)
            if runner.get("status") != "ok":
                result.fail(_runner_failure(target, runner))
                result.runner_traceback = runner.get("traceback")
            else:
                if data is not None and outputs is not None:
                    names = runner["eval"]["output_names"]
                    scores = device_scores(target, data, outputs, names)
                    accuracy = compute_accuracy(scores, data.labels, data.reference, data.reference_note)
                    by_source = device_outputs(manifest, data, outputs, names)
                    accuracy["outputs"] = device_output_agreement(data, by_source) or None
                    accuracy["metrics"] = device_metrics(list(metrics), data, by_source, manifest)
                    result.accuracy = AccuracyStats.model_validate(accuracy)
                result.status, result.failure, result.error, result.hint = "ok", None, None, None
        except ValueError as exc:  # the device's result does not fit the result model
            result.fail(Failure(kind="runner", host=target.name,
                                message=f"{target.label}: the runner's result is malformed: {exc}"))
        except Exception as exc:  # a bug for one target must not lose the others' results; say what it was
            if not isinstance(exc, EdgeqError):
                log.exception("bench on %s failed unexpectedly", target.name)
            failure = internal_failure(exc, target.name)
            if not failure.message.startswith(target.label):
                failure = failure.model_copy(update={"message": f"{target.label}: {failure.message}"})
            result.fail(failure)
    result.duration_s = time.monotonic() - started
    path = result_path(output_dir, target.name, manifest.id)
    try:
        json.dumps(result.to_json_dict(), allow_nan=False)
    except (TypeError, ValueError) as exc:  # whatever got in, this target's result fails, not the run
        log.warning("%s: result not writable as strict JSON: %s", target.name, exc)
        result = failed_result(target.name, manifest, artifact_dir, settings, Failure(
            kind="runner", host=target.name,
            message=f"{target.label}: the measurements hold values that are not finite numbers ({exc})"),
            started_at=started_at, duration_s=result.duration_s)
    _write_result(path, result)
    return BenchRun(result, path)


def bench_fleet(artifact_dir: str | Path, targets: list[Target], *, output_dir: str | Path, parallel: int = 8,
                **kwargs) -> list[BenchRun]:
    """``bench`` on every target in parallel (bounded pool); one run per target, in ``targets`` order."""
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
        discard(prepared)
