"""``edgeq lab run LAB.yaml``: the nightly device-lab job as one command.

convert (or reuse) every (model, profile, format, precision) -> deploy and bench each artifact on every target
whose profile it was built for -> store the results in ``history/<YYYY-mm-ddTHH-MM-SS>/`` -> report against
the previous run (or a pinned baseline). One failing conversion or device loses no other results: each
failure becomes a ``failed`` result file of its own, and the report fails on it.

LAB.yaml (paths relative to the file)::

    name: nightly                       # report title (optional)
    models:
      - name: digits
        path: model.keras               # Keras file, SavedModel dir or ONNX file
        calibration: calib.npz          # needed for int8
        eval: eval.npz                  # accuracy on device + the conversion gate
    build:
      profiles: [x86-avx2]              # default: the profiles of the run targets
      formats: [tflite, onnx]           # default: each profile's own format
      precisions: [int8]                # default: each profile's own precision
      max_accuracy_drop: 0.01           # conversion gate, absolute top-1 (0.01 = 1 point)
    run:
      targets: [local]                  # target or group names from the inventory
      warmup: 10
      runs: 200
      min_seconds: 2
    history: {dir: lab-history, keep: 30}
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edgeq import __version__
from edgeq.config import StrictModel, load_yaml_file, validate_model
from edgeq.errors import EdgeqError, ValidationError
from edgeq.files import write_text_atomic
from edgeq.names import Format, Precision

log = logging.getLogger(__name__)

HISTORY_STAMP = "%Y-%m-%dT%H-%M-%S"
_STAMP_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(-\d+)?$")
RESULTS_SUBDIR = "results"
REPORT_FILES = {"html": "report.html", "markdown": "report.md", "csv": "report.csv", "json": "report.json",
                "junit": "junit.xml"}
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class LabError(EdgeqError):
    """A LAB.yaml is invalid, or a lab run cannot start."""


# -- LAB.yaml ------------------------------------------------------------------------------------------
class LabModel(StrictModel):
    """One source model and its data."""

    name: str = Field(pattern=_NAME, description="the model's name in reports")
    path: Path = Field(description="Keras file, SavedModel directory or ONNX file")
    calibration: Path | None = Field(default=None, description=".npz calibration data (int8)")
    eval: Path | None = Field(default=None, description=".npz eval data with labels (accuracy, gate)")


class LabBuild(StrictModel):
    """What to build: every profile x format x precision for every model."""

    profiles: list[str] | None = Field(default=None, min_length=1,
                                       description="default: the profiles of the run targets")
    formats: list[Format] | None = Field(default=None, min_length=1)
    precisions: list[Precision] | None = Field(default=None, min_length=1)
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1,
                                            description="conversion gate: largest top-1 drop (0.01 = 1 point)")
    calibration_samples: int = Field(default=300, ge=1)


class LabRun(StrictModel):
    """Where and how to bench."""

    targets: list[str] = Field(min_length=1, description="target or group names")
    warmup: int = Field(default=10, ge=0)
    runs: int = Field(default=200, ge=1)
    min_seconds: float = Field(default=2.0, ge=0)
    threads: int | None = Field(default=None, ge=1)
    power: Literal["auto", "off"] = Field(default="auto", description="sample the profile's power sensor")
    idle_seconds: float | None = Field(default=None, ge=0, description="override of the profile's idle sampling")
    keep_releases: int = Field(default=3, ge=1, description="releases kept on each device")
    parallel: int = Field(default=1, ge=1, description="targets benched at once (1: one device at a time)")


class LabHistory(StrictModel):
    dir: Path = Field(default=Path("lab-history"), description="one folder per run inside")
    keep: int = Field(default=30, ge=1, description="runs kept (older ones are deleted)")


class LabThresholds(StrictModel):
    min_effect: float = Field(default=0.05, ge=0)
    alpha: float = Field(default=0.05, gt=0, lt=1)
    max_top1_drop: float = Field(default=0.005, ge=0, le=1, description="against the baseline, absolute")
    max_energy_increase: float = Field(default=0.10, ge=0)


class LabConfig(StrictModel):
    """A LAB.yaml file."""

    name: str = "edgeq lab"
    models: list[LabModel] = Field(min_length=1)
    build: LabBuild = Field(default_factory=LabBuild)
    run: LabRun
    history: LabHistory = Field(default_factory=LabHistory)
    artifacts: Path = Field(default=Path(".edgeq-lab/artifacts"), description="artifact cache")
    baseline: list[Path] | None = Field(default=None, description="pinned baseline results (default: last run)")
    thresholds: LabThresholds = Field(default_factory=LabThresholds)

    @field_validator("baseline", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _unique_models(self) -> LabConfig:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"models: duplicate name(s): {', '.join(duplicates)}")
        return self

    def resolve_paths(self, base: Path) -> LabConfig:
        """Make every relative path relative to ``base`` (the LAB.yaml's directory)."""
        def fix(path: Path | None) -> Path | None:
            if path is None:
                return None
            path = path.expanduser()
            return path if path.is_absolute() else base / path

        for model in self.models:
            model.path, model.calibration, model.eval = fix(model.path), fix(model.calibration), fix(model.eval)
        self.history.dir = fix(self.history.dir)
        self.artifacts = fix(self.artifacts)
        if self.baseline:
            self.baseline = [fix(p) for p in self.baseline]
        return self


def load_lab(path: Path | str) -> LabConfig:
    """Read and strictly validate a LAB.yaml; relative paths become relative to its directory."""
    path = Path(path)
    data = load_yaml_file(path, LabError)
    config = validate_model(LabConfig, data, str(path), LabError)
    config.resolve_paths(path.resolve().parent)
    for model in config.models:
        for what, file in (("path", model.path), ("calibration", model.calibration), ("eval", model.eval)):
            if file is not None and not file.exists():
                raise LabError(f"{path}: models.{model.name}.{what}: {file} does not exist")
    return config


# -- the run -------------------------------------------------------------------------------------------
@dataclass
class BuildSpec:
    model: LabModel
    profile: str
    format: str
    precision: str

    @property
    def label(self) -> str:
        return f"{self.model.name} {self.profile} {self.format}/{self.precision}"

    def cache_dir(self, root: Path) -> Path:
        return root / self.model.name / self.profile / f"{self.format}-{self.precision}"


@dataclass
class BuildOutcome:
    spec: BuildSpec
    status: Literal["converted", "reused", "gate-failed", "failed"]
    artifact_dir: Path | None = None
    manifest: Any = None
    seconds: float = 0.0
    error: str | None = None


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


def plan_builds(config: LabConfig, targets) -> tuple[list[BuildSpec], dict[str, list[BuildSpec]]]:
    """Every (model, profile, format, precision) to build, and the builds each target runs (its profile's)."""
    from edgeq.profiles import load_profile

    target_profiles = list(dict.fromkeys(t.profile for t in targets))
    profiles = config.build.profiles or target_profiles
    missing = [t.name for t in targets if t.profile not in profiles]
    if missing:
        raise LabError(f"build.profiles does not include the profile of target(s) {', '.join(missing)} "
                       f"({', '.join(sorted({t.profile for t in targets if t.name in missing}))})",
                       hint="add the profile to build.profiles or leave build.profiles out")
    specs: list[BuildSpec] = []
    for profile_name in profiles:
        profile = load_profile(profile_name)
        formats = config.build.formats or [profile.format]
        precisions = config.build.precisions or [profile.precision]
        for model in config.models:
            for fmt in formats:
                for precision in precisions:
                    specs.append(BuildSpec(model, profile_name, fmt, precision))
    per_target = {t.name: [s for s in specs if s.profile == t.profile] for t in targets}
    return specs, per_target


def _reuse_problem(spec: BuildSpec, config: LabConfig, manifest, profile) -> str | None:
    """Why the cached artifact cannot be reused (None: it can)."""
    from edgeq.manifest import sha256_file, sha256_tree

    options = manifest.options
    if manifest.format != spec.format or manifest.precision != spec.precision:
        return "format or precision differs"
    if options.get("source_sha256") != sha256_tree(spec.model.path):
        return "the source model changed"
    if options.get("edgeq_version") != __version__:
        return "built by another edgeq version"
    if manifest.profile != profile.model_dump(mode="json"):
        return "the device profile changed"
    if "calibration_sha256" in options:
        if spec.model.calibration is None or options["calibration_sha256"] != sha256_file(spec.model.calibration):
            return "the calibration data changed"
        if options.get("calibration_samples") != config.build.calibration_samples:
            return "calibration_samples changed"
    validation = manifest.validation
    eval_sha = sha256_file(spec.model.eval) if spec.model.eval is not None else None
    if validation.eval_sha256 != eval_sha:
        return "the eval data changed"
    if eval_sha is not None and validation.max_accuracy_drop != config.build.max_accuracy_drop:
        return "max_accuracy_drop changed"
    return None


def build_artifact(spec: BuildSpec, config: LabConfig) -> BuildOutcome:
    """Convert one spec into the artifact cache, or reuse the cached artifact when nothing changed."""
    from edgeq.convert import convert
    from edgeq.manifest import read_manifest, verify_artifact
    from edgeq.profiles import load_profile

    started = time.perf_counter()
    out_dir = spec.cache_dir(config.artifacts)
    try:
        profile = load_profile(spec.profile)
        if out_dir.is_dir():
            try:
                manifest = verify_artifact(out_dir, read_manifest(out_dir))
                problem = _reuse_problem(spec, config, manifest, profile)
            except EdgeqError as exc:
                problem = f"cached artifact unusable ({exc.message})"
            if problem is None:
                status = "gate-failed" if manifest.status == "failed" else "reused"
                return BuildOutcome(spec, status, out_dir, manifest, time.perf_counter() - started,
                                    error=manifest.validation.message if status == "gate-failed" else None)
            log.info("%s: rebuilding: %s", spec.label, problem)
        try:
            manifest = convert(spec.model.path, profile, out_dir, format=spec.format, precision=spec.precision,
                               calibration=spec.model.calibration,
                               calibration_samples=config.build.calibration_samples,
                               eval_path=spec.model.eval, max_accuracy_drop=config.build.max_accuracy_drop,
                               force=True)
        except ValidationError as exc:
            manifest = read_manifest(out_dir)
            return BuildOutcome(spec, "gate-failed", out_dir, manifest, time.perf_counter() - started,
                                error=exc.message)
        return BuildOutcome(spec, "converted", out_dir, manifest, time.perf_counter() - started)
    except EdgeqError as exc:
        return BuildOutcome(spec, "failed", None, None, time.perf_counter() - started, error=exc.message)
    except Exception as exc:  # a converter bug on one model must not lose the rest of the night's results
        log.exception("converting %s failed unexpectedly", spec.label)
        return BuildOutcome(spec, "failed", None, None, time.perf_counter() - started,
                            error=f"unexpected {type(exc).__name__}: {_one_line(exc)}")


def _stamp_dir(history: Path, now: _dt.datetime) -> Path:
    base = now.strftime(HISTORY_STAMP)
    candidate, n = history / base, 2
    while candidate.exists():
        candidate, n = history / f"{base}-{n}", n + 1
    return candidate


def history_runs(history: Path) -> list[Path]:
    """Run folders in the history, oldest first."""
    if not history.is_dir():
        return []
    return sorted((p for p in history.iterdir() if p.is_dir() and _STAMP_RE.match(p.name)),
                  key=lambda p: (p.name[:19], int(p.name[20:] or 0) if len(p.name) > 19 else 0))


def previous_results(history: Path, before: Path) -> Path | None:
    """The newest earlier run's results folder that holds at least one result file."""
    runs = [p for p in history_runs(history) if p != before]
    for run in reversed(runs):
        results = run / RESULTS_SUBDIR
        if results.is_dir() and any(results.glob("*.json")):
            return results
    return None


def prune_history(history: Path, keep: int, protect: list[Path] | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` runs, never a run holding one of ``protect`` (a pinned baseline);
    return what was deleted."""
    protected = [Path(p).resolve() for p in protect or []]

    def holds_protected(run: Path) -> bool:
        run = run.resolve()
        return any(p == run or run in p.parents for p in protected)

    runs = history_runs(history)
    doomed = [run for run in (runs[:-keep] if len(runs) > keep else []) if not holds_protected(run)]
    for run in doomed:
        shutil.rmtree(run, ignore_errors=True)
    return doomed


def failed_result(target: str, spec: BuildSpec, manifest, error: str, started_at: str,
                  duration_s: float) -> dict:
    """A schema-1 result for a (target, artifact) that produced no measurement, so the report shows it
    (bench's own failed result, named after the LAB.yaml model so it matches its baseline)."""
    from edgeq.bench import failed_result as bench_failed_result

    return bench_failed_result(
        target, manifest, None, None, error, started_at=started_at, duration_s=round(duration_s, 3),
        artifact={"model": spec.model.name, "format": spec.format, "precision": spec.precision,
                  "profile": spec.profile},
    )


def _result_file(results_dir: Path, target: str, spec: BuildSpec, manifest) -> Path:
    from edgeq.bench import result_path

    ident = manifest.id if manifest is not None else f"unbuilt-{spec.model.name}-{spec.format}-{spec.precision}"
    return result_path(results_dir, target, ident)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


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

    run_dir = _stamp_dir(history_dir, now or _dt.datetime.now(_dt.timezone.utc))
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
            progress(LabEvent("convert", "reused" if outcome.status == "reused" else "ok",
                              f"{spec.label}: {outcome.status} {outcome.manifest.id} ({outcome.seconds:.1f} s)"))

    unreachable: dict[str, str] = {}  # target name -> why its remaining artifacts are skipped
    for spec in specs:
        outcome = builds[id(spec)]
        spec_targets = [t for t in targets if spec in per_target[t.name]]
        ready = []
        for target in spec_targets:
            started, clock = _now(), time.perf_counter()
            if outcome.artifact_dir is None:
                error = f"not built: {outcome.error}"
            elif target.name in unreachable:
                error = f"skipped: {unreachable[target.name]}"
                progress(LabEvent("deploy", "skipped", f"{target.name} {spec.label}: {error}"))
            else:
                error = _deploy(target, spec, outcome, config, progress)
                if error is None:
                    ready.append(target)
                    continue
                if _looks_unreachable(error):
                    unreachable[target.name] = f"{target.name} was unreachable earlier in this run"
            failures.append(f"{target.name} {spec.label}: {error}")
            _write_json(_result_file(results_dir, target.name, spec, outcome.manifest),
                        failed_result(target.name, spec, outcome.manifest, error, started,
                                      time.perf_counter() - clock))
        if ready:
            for target, error in _bench(ready, spec, outcome, config, results_dir, progress):
                if error is not None:
                    failures.append(f"{target.name} {spec.label}: {error}")
                    if _looks_unreachable(error):
                        unreachable[target.name] = f"{target.name} was unreachable earlier in this run"

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


def _deploy(target, spec: BuildSpec, outcome: BuildOutcome, config: LabConfig, progress: Progress) -> str | None:
    """Deploy one artifact to one target; None when it is active there, else a one-line error."""
    from edgeq.deploy import deploy

    label = f"{target.name} {spec.label}"
    progress(LabEvent("deploy", "start", label))
    try:
        deployed = deploy(outcome.artifact_dir, target, keep=config.run.keep_releases, allow_failed=True)
    except EdgeqError as exc:
        deployed_error = exc.message
    except Exception as exc:  # a bug for one device must not lose the other devices' results
        log.exception("deploying %s to %s failed unexpectedly", spec.label, target.name)
        deployed_error = f"unexpected {type(exc).__name__}: {_one_line(exc)}"
    else:
        if deployed.ok:
            progress(LabEvent("deploy", "ok", f"{label}: {deployed.status} ({deployed.seconds:.1f} s)"))
            return None
        deployed_error = deployed.error or "unknown error"
    progress(LabEvent("deploy", "failed", f"{label}: {deployed_error}"))
    return f"deploy failed: {deployed_error}"


def _bench(targets: list, spec: BuildSpec, outcome: BuildOutcome, config: LabConfig, results_dir: Path,
           progress: Progress) -> list[tuple[Any, str | None]]:
    """Bench one artifact on its deployed targets (bench's eval/reference preparation runs once).

    Every target ends with a result file in ``results_dir`` (bench writes failed ones too); returns
    (target, None or one-line error) per target. ``artifact.model`` becomes the LAB.yaml model name (bench
    records the source path, which differs between machines and would break matching with the baseline).
    """
    from edgeq.bench import bench_fleet

    run = config.run
    names = ", ".join(t.name for t in targets)
    progress(LabEvent("bench", "start", f"{spec.label} on {names}"))
    started, clock = _now(), time.perf_counter()
    try:
        results = bench_fleet(outcome.artifact_dir, targets, parallel=run.parallel, eval_path=spec.model.eval,
                              warmup=run.warmup, runs=run.runs, min_seconds=run.min_seconds, threads=run.threads,
                              power=run.power == "auto", idle_seconds=run.idle_seconds, output_dir=results_dir)
    except Exception as exc:  # the artifact or the eval data is unusable: every target fails alike
        if isinstance(exc, EdgeqError):
            why = exc.message
        else:
            log.exception("benching %s failed unexpectedly", spec.label)
            why = f"unexpected {type(exc).__name__}: {_one_line(exc)}"
        out = []
        for target in targets:
            error = f"bench failed: {why}"
            progress(LabEvent("bench", "failed", f"{target.name} {spec.label}: {error}"))
            _write_json(_result_file(results_dir, target.name, spec, outcome.manifest),
                        failed_result(target.name, spec, outcome.manifest, error, started,
                                      time.perf_counter() - clock))
            out.append((target, error))
        return out
    out = []
    for target, result in zip(targets, results, strict=True):
        path = Path(result.get("result_file") or _result_file(results_dir, target.name, spec, outcome.manifest))
        result.pop("result_file", None)
        result["artifact"]["model"] = spec.model.name
        _write_json(path, result)
        label = f"{target.name} {spec.label}"
        if result.get("status") != "ok":
            error = f"bench failed: {result.get('error') or 'no error message'}"
            progress(LabEvent("bench", "failed", f"{label}: {error}"))
            out.append((target, error))
            continue
        latency = result.get("latency_ms") or {}
        accuracy = result.get("accuracy") or {}
        summary = f"p50 {latency['p50']:.3g} ms" if latency.get("p50") is not None else "no latency"
        if accuracy.get("top1") is not None:
            summary += f", top-1 {accuracy['top1']:.2%}"
        if (result.get("env") or {}).get("emulated"):
            summary += " (emulated: latency meaningless)"
        progress(LabEvent("bench", "ok", f"{label}: {summary}"))
        out.append((target, None))
    return out


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _looks_unreachable(error: str | None) -> bool:
    text = (error or "").lower()
    return any(word in text for word in ("connection refused", "timed out", "cannot resolve host", "host key",
                                         "authentication failed", "no ssh banner", "ssh negotiation failed",
                                         "unreachable", "no route"))
