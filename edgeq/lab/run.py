"""One device-lab run (``edgeq lab run``): builds, then deploy and bench of each artifact on its targets, the
results in the run's history folder, and the report against the baseline. One failure loses no other result:
each becomes a ``failed`` result file carrying its typed ``Failure``, and a target whose connection failed
(kind ``connect``) is skipped for the rest of the run instead of timing out again on every artifact."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgeq.errors import EdgeqError, Failure, internal_failure
from edgeq.files import write_text_atomic
from edgeq.lab.builds import BuildOutcome, BuildSpec, build_artifact, plan_builds
from edgeq.lab.config import LabConfig, LabError
from edgeq.lab.history import REPORT_FILES, RESULTS_SUBDIR, previous_results, prune_history, stamp_dir
from edgeq.result import BenchResult

log = logging.getLogger(__name__)


@dataclass
class LabEvent:
    """A progress step, for the CLI to show (the library itself never prints)."""

    step: Literal["plan", "convert", "deploy", "bench", "report"]
    status: Literal["start", "ok", "reused", "failed", "skipped", "info"]
    message: str


@dataclass
class LabOutcome:
    run_dir: Path
    results_dir: Path
    builds: list[BuildOutcome]
    report: Any
    report_files: dict[str, Path]
    baseline: list[Path] | None
    failures: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return self.report.exit_code


Progress = Callable[[LabEvent], None]


def _quiet(_: LabEvent) -> None:
    return None


def failed_result(target: str, spec: BuildSpec, manifest, failure: Failure, started_at: str,
                  duration_s: float) -> BenchResult:
    """The result of a (target, artifact) that produced no measurement, so the report shows it (bench's own
    failed result, named after the LAB.yaml model so it matches its baseline)."""
    from edgeq.bench import failed_result as bench_failed_result

    return bench_failed_result(
        target, manifest, None, None, failure.on(target), started_at=started_at, duration_s=round(duration_s, 3),
        artifact={"name": spec.model.name, "format": spec.format, "precision": spec.precision,
                  "profile": spec.profile},
    )


def _result_file(results_dir: Path, target: str, spec: BuildSpec, manifest) -> Path:
    from edgeq.bench import result_path

    ident = manifest.id if manifest is not None else f"unbuilt-{spec.model.name}-{spec.format}-{spec.precision}"
    return result_path(results_dir, target, ident)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_result(path: Path, result: BenchResult) -> None:
    write_text_atomic(path, json.dumps(result.to_json_dict(), indent=1, allow_nan=False) + "\n")


def run_lab(config: LabConfig, *, inventory: Path | str | None = None, baseline: list[Path] | None = None,
            history: Path | None = None, progress: Progress = _quiet,
            now: _dt.datetime | None = None) -> LabOutcome:
    """Run the whole matrix once; see the module docstring. Raises only for problems before any work starts."""
    from edgeq.report import Thresholds, create_report, write_reports
    from edgeq.targets import load_inventory, resolve_targets

    history_dir = Path(history) if history is not None else config.history.dir
    inv = load_inventory(inventory)
    targets = []
    for name in config.run.targets:
        for target in resolve_targets(inv, name):
            if target.name not in [t.name for t in targets]:
                targets.append(target)
    specs, per_target = plan_builds(config, targets)
    pinned = baseline or config.baseline
    for path in pinned or []:
        if not Path(path).exists():
            raise LabError(f"baseline {path}: no such file or directory")

    run_dir = stamp_dir(history_dir, now or _dt.datetime.now(_dt.timezone.utc))
    results_dir = run_dir / RESULTS_SUBDIR
    try:
        results_dir.mkdir(parents=True)
    except OSError as exc:
        raise LabError(f"{results_dir}: cannot create the run folder ({exc.strerror or exc})",
                       hint="check history.dir in the LAB.yaml or pass --history") from exc
    progress(LabEvent("plan", "info", f"{len(specs)} artifact(s) x {len(targets)} target(s) -> {run_dir}"))
    failures: list[str] = []

    builds: dict[int, BuildOutcome] = {}
    for index, spec in enumerate(specs, 1):
        progress(LabEvent("convert", "start", f"[{index}/{len(specs)}] {spec.label}"))
        outcome = build_artifact(spec, config)
        builds[id(spec)] = outcome
        if outcome.status == "failed":
            failures.append(f"convert {spec.label}: {outcome.error}")
            progress(LabEvent("convert", "failed", f"{spec.label}: {outcome.error}"))
        elif outcome.status == "gate-failed":
            progress(LabEvent("convert", "failed", f"{spec.label}: accuracy gate failed ({outcome.error}); "
                                                   "benching it anyway"))
        else:
            chosen = f" -> {outcome.manifest.format}/{outcome.manifest.precision}" if spec.tuned else ""
            progress(LabEvent("convert", "reused" if outcome.status == "reused" else "ok",
                              f"{spec.label}: {outcome.status}{chosen} {outcome.manifest.id} "
                              f"({outcome.seconds:.1f} s)"))

    unreachable: dict[str, Failure] = {}  # target name -> why its remaining artifacts are skipped
    for spec in specs:
        outcome = builds[id(spec)]
        spec_targets = [t for t in targets if spec in per_target[t.name]]
        ready = []
        for target in spec_targets:
            started, clock = _now(), time.perf_counter()
            if outcome.artifact_dir is None:
                failure = _reworded(outcome.failure, "not built: ")
            elif target.name in unreachable:
                failure = unreachable[target.name]
                progress(LabEvent("deploy", "skipped", f"{target.name} {spec.label}: {failure.message}"))
            else:
                failure = _deploy(target, spec, outcome, config, progress)
                if failure is None:
                    ready.append(target)
                    continue
            _note_unreachable(unreachable, target.name, failure)
            failures.append(f"{target.name} {spec.label}: {failure.message}")
            _write_result(_result_file(results_dir, target.name, spec, outcome.manifest),
                          failed_result(target.name, spec, outcome.manifest, failure, started,
                                        time.perf_counter() - clock))
        if ready:
            for target, failure in _bench(ready, spec, outcome, config, results_dir, progress):
                if failure is not None:
                    failures.append(f"{target.name} {spec.label}: {failure.message}")
                    _note_unreachable(unreachable, target.name, failure)

    t = config.thresholds
    thresholds = Thresholds(min_effect=t.min_effect, alpha=t.alpha, max_top1_drop=t.max_top1_drop,
                            max_energy_increase=t.max_energy_increase)
    baseline_paths = list(pinned) if pinned else None
    if baseline_paths is None:
        previous = previous_results(history_dir, run_dir)
        baseline_paths = [previous] if previous is not None else None
    progress(LabEvent("report", "start", f"baseline: {', '.join(map(str, baseline_paths or [])) or 'none'}"))
    report = create_report([results_dir], baseline_paths, thresholds, title=config.name)
    files = write_reports(report, **{fmt: run_dir / name for fmt, name in REPORT_FILES.items()})
    latest = history_dir / "latest"
    try:
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(run_dir.name)
    except OSError as exc:  # e.g. a filesystem without symlinks: the history still works without it
        log.info("cannot point %s at %s: %s", latest, run_dir.name, exc)
    for old in prune_history(history_dir, config.history.keep, protect=list(pinned or [])):
        progress(LabEvent("report", "info", f"deleted old run {old.name} (history.keep={config.history.keep})"))
    progress(LabEvent("report", "ok" if report.passed else "failed", report.headline()))
    return LabOutcome(run_dir, results_dir, [builds[id(s)] for s in specs], report, files, baseline_paths, failures)


def _reworded(failure: Failure | None, prefix: str) -> Failure:
    failure = failure or Failure(kind="internal", message="no reason given")
    return failure.model_copy(update={"message": prefix + failure.message})


def _note_unreachable(unreachable: dict[str, Failure], target: str, failure: Failure) -> None:
    """A target whose connection failed is skipped for the rest of the run (decided on the kind, ``connect``:
    a failed command or runner on a reachable device says nothing about the next artifact)."""
    if failure.kind == "connect" and target not in unreachable:
        unreachable[target] = Failure(kind="connect", host=target,
                                      message=f"skipped: {target} was unreachable earlier in this run "
                                              f"({failure.message})")


def _deploy(target, spec: BuildSpec, outcome: BuildOutcome, config: LabConfig,
            progress: Progress) -> Failure | None:
    """Deploy one artifact to one target; None when it is active there, else why not."""
    from edgeq.deploy import deploy

    label = f"{target.name} {spec.label}"
    progress(LabEvent("deploy", "start", label))
    try:
        deployed = deploy(outcome.artifact_dir, target, keep=config.run.keep_releases, allow_failed=True)
    except Exception as exc:  # a bug for one device must not lose the other devices' results
        if not isinstance(exc, EdgeqError):
            log.exception("deploying %s to %s failed unexpectedly", spec.label, target.name)
        failure = internal_failure(exc, target.name)
    else:
        if deployed.ok:
            progress(LabEvent("deploy", "ok", f"{label}: {deployed.status} ({deployed.seconds:.1f} s)"))
            return None
        failure = deployed.failure or Failure(kind="internal", message="unknown error", host=target.name)
    progress(LabEvent("deploy", "failed", f"{label}: {failure.message}"))
    return _reworded(failure, "deploy failed: ")


def _bench(targets: list, spec: BuildSpec, outcome: BuildOutcome, config: LabConfig, results_dir: Path,
           progress: Progress) -> list[tuple[Any, Failure | None]]:
    """Bench one artifact on its deployed targets (bench's eval/reference preparation runs once).

    Every target ends with a result file in ``results_dir`` (bench writes failed ones too); returns
    (target, None or its failure) per target. ``artifact.name`` becomes the LAB.yaml model name, so results
    match their baseline whatever the source file is called on this machine.
    """
    from edgeq.bench import bench_fleet

    run = config.run
    names = ", ".join(t.name for t in targets)
    progress(LabEvent("bench", "start", f"{spec.label} on {names}"))
    started, clock = _now(), time.perf_counter()
    try:
        runs = bench_fleet(outcome.artifact_dir, targets, parallel=run.parallel, eval_path=spec.model.eval,
                           warmup=run.warmup, runs=run.runs, min_seconds=run.min_seconds, threads=run.threads,
                           power=run.power == "auto", idle_seconds=run.idle_seconds, output_dir=results_dir)
    except Exception as exc:  # the artifact or the eval data is unusable: every target fails alike
        if not isinstance(exc, EdgeqError):
            log.exception("benching %s failed unexpectedly", spec.label)
        failure = _reworded(internal_failure(exc), "bench failed: ")
        out = []
        for target in targets:
            progress(LabEvent("bench", "failed", f"{target.name} {spec.label}: {failure.message}"))
            _write_result(_result_file(results_dir, target.name, spec, outcome.manifest),
                          failed_result(target.name, spec, outcome.manifest, failure, started,
                                        time.perf_counter() - clock))
            out.append((target, failure.on(target.name)))
        return out
    out = []
    for target, bench_run in zip(targets, runs, strict=True):
        result = bench_run.result
        result.artifact.name = spec.model.name
        _write_result(bench_run.path, result)
        label = f"{target.name} {spec.label}"
        if not bench_run.ok:
            failure = _reworded(result.failure, "bench failed: ")
            progress(LabEvent("bench", "failed", f"{label}: {failure.message}"))
            out.append((target, failure))
            continue
        summary = f"p50 {result.latency_ms.p50:.3g} ms" if result.latency_ms is not None else "no latency"
        if result.accuracy is not None and result.accuracy.top1 is not None:
            summary += f", top-1 {result.accuracy.top1:.2%}"
        if result.env.get("emulated"):
            summary += " (emulated: latency meaningless)"
        progress(LabEvent("bench", "ok", f"{label}: {summary}"))
        out.append((target, None))
    return out
