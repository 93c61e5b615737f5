"""``tune``: for one device, the fastest artifact that meets an accuracy budget, found by building the
candidates (``candidates``), scoring them on the host against FP32 (``budget``), and benchmarking the ones
that pass on the device itself through the ordinary bench path.

The host decides what is accurate enough, the device decides what is fastest: latency differs per device
(an INT8 model can be slower than FP32 on a CPU without integer dot-product instructions), accuracy does
not depend on where the same artifact runs.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.convert import convert, registry
from edgeq.convert.source import SourceModel, load_source
from edgeq.convert.validate import primary_output_index, run_artifact
from edgeq.data import Dataset, check_labels_range, load_dataset
from edgeq.device.runtimes import cpu_supports_bf16, open_session
from edgeq.errors import EdgeqError, TuneError
from edgeq.manifest import Manifest
from edgeq.profiles import DeviceProfile
from edgeq.targets import Target
from edgeq.tune import sensitivity
from edgeq.tune.budget import Budget, check_eval_for_budget, score
from edgeq.tune.cache import reference_outputs
from edgeq.tune.candidates import Candidate, buildable, calibration_methods
from edgeq.tune.choose import choose, mark_pareto

log = logging.getLogger(__name__)

SCREEN_SAMPLES = 100  # the host screen's subset; only eval sets at least twice this size are screened
MIXED_K = (2, 4, 8)  # layers kept in float, after single layers (k=1) were tried one by one
OBJECTIVES = ("latency", "energy", "size")


class Progress:
    """What tune reports while it works; the CLI draws it, the library default says nothing."""

    def stage(self, name: str, total: int | None = None) -> None: ...

    def step(self, text: str) -> None: ...


@dataclass
class TuneResult:
    output: Path
    target: str
    profile: str
    objective: str
    budget: Budget
    candidates: list[Candidate]
    chosen: Candidate | None
    chosen_dir: Path | None
    reason: str
    notes: list[str] = field(default_factory=list)
    reference_cached: bool = False
    device_accuracy: dict | None = None
    seconds: float = 0.0


@dataclass
class _Search:
    """The state one tune carries from candidate to candidate."""

    model: Path
    profile: DeviceProfile
    calibration: Path
    calibration_samples: int
    budget: Budget
    source: SourceModel
    dataset: Dataset
    reference: np.ndarray
    root: Path
    deadline: float
    max_candidates: int
    progress: Progress
    candidates: list[Candidate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stopped: str | None = None

    def out_of_budget(self) -> bool:
        if self.stopped is None and len(self.candidates) >= self.max_candidates:
            self.stopped = f"stopped at --max-candidates {self.max_candidates}"
        if self.stopped is None and time.monotonic() > self.deadline:
            self.stopped = f"stopped at --max-time after {len(self.candidates)} candidates"
        return self.stopped is not None

    def try_candidate(self, candidate: Candidate, *, always: bool = False) -> Candidate | None:
        """Build and score ``candidate``; None when the search is out of time or candidates (unless
        ``always``: the FP32 baseline is built whatever the limits, so a tune always has an answer)."""
        if not always and self.out_of_budget():
            return None
        self.candidates.append(candidate)
        candidate.index = len(self.candidates)
        self.progress.step(candidate.id)
        started = time.monotonic()
        candidate.directory = self.root / "candidates" / candidate.id
        try:
            manifest = convert(
                self.model, self.profile, candidate.directory, format=candidate.format,
                precision=candidate.precision,
                calibration=self.calibration if candidate.precision == "int8" else None,
                calibration_samples=self.calibration_samples, calibration_method=candidate.calibration_method,
                float_nodes=candidate.float_nodes, force=True)
            candidate.artifact_id = manifest.id
            candidate.size_bytes = sum(f.size for f in manifest.files)
            self._evaluate(candidate, manifest)
        except EdgeqError as exc:
            candidate.error = exc.message
            log.info("%s: %s", candidate.name, exc.message)
        candidate.seconds = time.monotonic() - started
        return candidate

    def _evaluate(self, candidate: Candidate, manifest: Manifest) -> None:
        session = open_session(candidate.directory / manifest.model_file, manifest.format,
                               precision=manifest.precision)
        names = {t.name: t.source_name for t in [*manifest.inputs, *manifest.outputs] if t.source_name}
        index = primary_output_index(session, self.source, names)
        labels = self.dataset.labels
        if self.dataset.samples >= 2 * SCREEN_SAMPLES:
            subset = _head(self.dataset, SCREEN_SAMPLES)
            candidate.screen = score(self.reference[:SCREEN_SAMPLES], run_artifact(session, names, subset, index),
                                     subset.labels, self.budget)
            if candidate.screen.clearly_fails(self.budget):
                candidate.rejected_by = "screen"
                return
        candidate.score = score(self.reference, run_artifact(session, names, self.dataset, index), labels,
                                self.budget)


def _head(dataset: Dataset, count: int) -> Dataset:
    return Dataset(path=dataset.path, sha256=dataset.sha256,
                   inputs={k: v[:count] for k, v in dataset.inputs.items()},
                   labels=None if dataset.labels is None else dataset.labels[:count],
                   samples_available=dataset.samples_available)


def allowed_formats(profile: DeviceProfile, source_kind: str, wanted: list[str] | None) -> list[str]:
    """The formats tune may use: those the profile's device can run (its ``runtime_packages``), its own
    format first, that edgeq can build from this kind of source."""
    allowed = [profile.format, *[f for f in profile.runtime_packages if f != profile.format]]
    for fmt in wanted or []:
        if fmt not in allowed:
            raise TuneError(f"profile '{profile.name}' does not allow format '{fmt}' (it allows "
                            f"{', '.join(allowed)})", hint="add it to the profile's runtime_packages")
    chosen = [f for f in allowed if (not wanted or f in wanted) and buildable(f, source_kind)]
    if not chosen:
        raise TuneError(f"none of the formats profile '{profile.name}' allows ({', '.join(allowed)}) can be "
                        f"built from a {source_kind} model")
    return chosen


def _search_format(search: _Search, fmt: str) -> None:
    """Stages A and B for one format: full INT8 (one calibration method at a time), dynamic, then mixed."""
    can = buildable(fmt, search.source.kind)
    best: Candidate | None = None
    if "int8" in can:
        for method in calibration_methods(can["int8"]):
            tried = search.try_candidate(Candidate(fmt, "int8", "int8", calibration_method=method))
            if tried is None:
                return
            if tried.measured is not None and (best is None or tried.measured.metric() > best.measured.metric()):
                best = tried
            if tried.passed:
                break
    if "dynamic" in can and search.try_candidate(Candidate(fmt, "dynamic", "dynamic")) is None:
        return
    if best is not None and not best.passed and registry.backend(fmt).float_node_precisions:
        _search_mixed(search, fmt, best)


def _search_mixed(search: _Search, fmt: str, full_int8: Candidate) -> None:
    """Stage B: keep the most sensitive layers in float. Shortlist by quantization loss, measure each alone
    (leave-one-out), then keep the best k = 2, 4, 8 together until one meets the budget."""
    if fmt != "onnx":  # the only backend with a sensitivity shortlist so far
        return
    model_file = full_int8.directory / "model.onnx"
    calib = load_dataset(search.calibration, search.source.inputs, role="calibration")
    search.progress.step("ranking layers by quantization loss")
    shortlist = sensitivity.shortlist(model_file, calib)
    method = full_int8.calibration_method
    singles: list[tuple[float, sensitivity.SensitiveTensor]] = []
    for tensor in shortlist.tensors:
        tried = search.try_candidate(Candidate(fmt, "int8", "mixed", method, tensor.nodes))
        if tried is None:
            return
        if tried.passed:
            return
        if tried.measured is not None:
            singles.append((tried.measured.metric(), tensor))
    ranked = [t for _, t in sorted(singles, key=lambda pair: -pair[0])]
    for k in MIXED_K:
        if k > len(ranked):
            break
        nodes = tuple(dict.fromkeys(n for t in ranked[:k] for n in t.nodes))
        if set(nodes) >= shortlist.quantized_nodes:  # nothing left quantized: that is the fp32 candidate
            search.notes.append(f"{fmt}: no mixed candidate of the {k} most sensitive layers: keeping their "
                                f"{len(nodes)} nodes float would leave nothing quantized")
            return
        tried = search.try_candidate(Candidate(fmt, "int8", "mixed", method, nodes))
        if tried is None or tried.passed:
            return


def tune(model: Path | str, target: Target, profile: DeviceProfile, *, calibration: Path | str,
         eval_path: Path | str, budget: Budget, output: Path | str, objective: str = "latency",
         formats: list[str] | None = None, max_time_s: float = 1200.0, max_candidates: int = 24,
         calibration_samples: int = 300, runs: int = 100, min_seconds: float = 0.5, force: bool = False,
         progress: Progress | None = None) -> TuneResult:
    """Find the artifact for ``target`` that meets ``budget`` and is best by ``objective``; see the module."""
    from edgeq.tune.output import write_outputs  # the report's writers, only once there is something to write

    started = time.monotonic()
    progress = progress or Progress()
    root = Path(output)
    if objective not in OBJECTIVES:
        raise TuneError(f"unknown objective '{objective}' (one of {', '.join(OBJECTIVES)})")
    if objective == "energy" and profile.power.sensor == "none":
        raise TuneError(f"profile '{profile.name}' has no power sensor: --objective energy cannot be measured",
                        hint="use --objective latency or size, or set power.sensor in the profile")
    if root.exists() and any(root.iterdir()) and not force:
        raise TuneError(f"{root}: output directory is not empty", hint="use --force to replace it")
    model, calibration, eval_path = Path(model), Path(calibration), Path(eval_path)
    source = load_source(model)
    fmts = allowed_formats(profile, source.kind, formats)
    dataset = load_dataset(eval_path, source.inputs, role="eval")
    check_eval_for_budget(budget, dataset.labels, eval_path)
    load_dataset(calibration, source.inputs, role="calibration")  # a bad file fails now, not at stage A
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)

    progress.stage("fp32 reference")
    reference, cached = reference_outputs(source, dataset)
    if dataset.labels is not None:
        check_labels_range(dataset, int(np.prod(reference.shape[1:])))
    search = _Search(model, profile, calibration, calibration_samples, budget, source, dataset, reference, root,
                     started + max_time_s, max_candidates, progress)
    progress.stage("host: build and score candidates")
    search.try_candidate(Candidate(fmts[0], "fp32", "fp32"), always=True)  # the baseline, first
    for fmt in fmts:
        _search_format(search, fmt)
    can_bf16, why_not = cpu_supports_bf16()
    if not can_bf16 and any("bf16" in buildable(f, source.kind) for f in fmts):
        search.notes.append(f"bf16 not tried: this host cannot validate it ({why_not})")
    for fmt in fmts:
        for precision in ("fp16", "bf16"):
            if precision in buildable(fmt, source.kind) and (precision != "bf16" or can_bf16):
                search.try_candidate(Candidate(fmt, precision, precision))
        if fmt != fmts[0]:
            search.try_candidate(Candidate(fmt, "fp32", "fp32"))
    if search.stopped:
        search.notes.append(search.stopped)

    result = TuneResult(root, target.name, profile.name, objective, budget, search.candidates, None, None, "",
                        search.notes, cached)
    choose(result, target, eval_path, runs=runs, min_seconds=min_seconds, progress=progress)
    mark_pareto(result.candidates)
    result.seconds = time.monotonic() - started
    write_outputs(result)
    return result
