"""The lab's builds: every (model, profile, format, precision) to convert, converted into the artifact cache
or reused from it when nothing that made it has changed; ``precisions: [auto]`` builds are tuned instead
(``edgeq.lab.tuned``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgeq import __version__
from edgeq.errors import EdgeqError, Failure, ValidationError, internal_failure
from edgeq.lab.config import AUTO, LabConfig, LabError, LabModel
from edgeq.targets import Target

log = logging.getLogger(__name__)


@dataclass
class BuildSpec:
    model: LabModel
    profile: str
    format: str  # "auto" for a tuned build: tune chooses among build.formats (or all the profile allows)
    precision: str  # "auto" for a tuned build
    measure_on: Target | None = None  # a tuned build's device: the first run target of its profile

    @property
    def tuned(self) -> bool:
        return self.precision == AUTO

    @property
    def label(self) -> str:
        return f"{self.model.name} {self.profile} {self.format}/{self.precision}"

    def cache_dir(self, root: Path) -> Path:
        return root / self.model.name / self.profile / f"{self.format}-{self.precision}"


@dataclass
class BuildOutcome:
    spec: BuildSpec
    status: Literal["converted", "tuned", "reused", "gate-failed", "failed"]
    artifact_dir: Path | None = None
    manifest: Any = None
    seconds: float = 0.0
    failure: Failure | None = None  # why it failed (failed) or what the gate said (gate-failed)

    @property
    def error(self) -> str | None:
        return self.failure.message if self.failure else None


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
        measure_on = next((t for t in targets if t.profile == profile_name), None)
        if AUTO in precisions and measure_on is None:
            raise LabError(f"build.precisions: auto is tuned on a device, and no run target has profile "
                           f"'{profile_name}'", hint="leave build.profiles out or add a target of that profile")
        for model in config.models:
            if AUTO in precisions:  # one tuned build per (model, profile): tune picks the format too
                specs.append(BuildSpec(model, profile_name, AUTO, AUTO, measure_on))
            for fmt in formats:
                for precision in precisions:
                    if precision != AUTO:
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
    asked = spec.model.input_shapes or {}
    built = options.get("input_shapes", {}) if options.get("input_shapes_from") == "--input-shape" else {}
    if asked != built:
        return "input_shapes changed"
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
        if spec.tuned:
            from edgeq.lab.tuned import tuned_artifact

            return tuned_artifact(spec, config, profile, out_dir, started)
        if out_dir.is_dir():
            try:
                manifest = verify_artifact(out_dir, read_manifest(out_dir))
                problem = _reuse_problem(spec, config, manifest, profile)
            except EdgeqError as exc:
                problem = f"cached artifact unusable ({exc.message})"
            if problem is None:
                status = "gate-failed" if manifest.status == "failed" else "reused"
                return BuildOutcome(spec, status, out_dir, manifest, time.perf_counter() - started,
                                    failure=_gate(manifest.validation.message) if status == "gate-failed" else None)
            log.info("%s: rebuilding: %s", spec.label, problem)
        try:
            manifest = convert(spec.model.path, profile, out_dir, format=spec.format, precision=spec.precision,
                               calibration=spec.model.calibration,
                               calibration_samples=config.build.calibration_samples,
                               eval_path=spec.model.eval, max_accuracy_drop=config.build.max_accuracy_drop,
                               input_shapes=spec.model.input_shapes, force=True)
        except ValidationError as exc:
            manifest = read_manifest(out_dir)
            return BuildOutcome(spec, "gate-failed", out_dir, manifest, time.perf_counter() - started,
                                failure=exc.failure())
        return BuildOutcome(spec, "converted", out_dir, manifest, time.perf_counter() - started)
    except EdgeqError as exc:
        return BuildOutcome(spec, "failed", None, None, time.perf_counter() - started, failure=exc.failure())
    except Exception as exc:  # a converter bug on one model must not lose the rest of the night's results
        log.exception("converting %s failed unexpectedly", spec.label)
        return BuildOutcome(spec, "failed", None, None, time.perf_counter() - started, failure=internal_failure(exc))


def _gate(message: str | None) -> Failure:
    return Failure(kind="artifact", message=message or "the accuracy gate failed")
