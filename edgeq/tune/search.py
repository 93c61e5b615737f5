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
from edgeq.convert.base import AccuracyControl
from edgeq.convert.prequantized import describe, onnx_quantized_ops
from edgeq.convert.source import SourceModel, load_source
from edgeq.convert.validate import host_caveat, host_profile_name, run_artifact_outputs
from edgeq.data import Dataset, check_labels_range, load_dataset
from edgeq.device.runtimes import cpu_supports_bf16, open_session
from edgeq.errors import EdgeqError, TuneError
from edgeq.manifest import Manifest
from edgeq.metrics import by_source_name, cosine_per_sample, per_sample
from edgeq.profiles import DeviceProfile
from edgeq.targets import Target
from edgeq.tune.budget import Budget, check_eval_for_budget, score
from edgeq.tune.cache import reference_outputs
from edgeq.tune.candidates import Candidate, buildable, calibration_methods, looks_like_transformer
from edgeq.tune.choose import choose, mark_pareto
from edgeq.tune.formats import allowed_formats, runnable_formats
from edgeq.tune.mixed import SHORTLISTS, search_mixed
from edgeq.tune.qat_stage import search_qat

log = logging.getLogger(__name__)

SCREEN_SAMPLES = 100  # the host screen's subset; only eval sets at least twice this size are screened
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
    source_kind: str = ""


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
    references: dict[str, np.ndarray]  # every FP32 output by source name, the scores output first
    root: Path
    deadline: float
    max_candidates: int
    progress: Progress
    input_shapes: dict = field(default_factory=dict)  # convert's input_shapes, for every candidate
    candidates: list[Candidate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stopped: str | None = None
    transformer: bool = False  # candidates.looks_like_transformer(source): SmoothQuant is worth a candidate

    def out_of_budget(self) -> bool:
        if self.stopped is None and len(self.candidates) >= self.max_candidates:
            self.stopped = f"stopped at --max-candidates {self.max_candidates}"
        if self.stopped is None and time.monotonic() > self.deadline:
            self.stopped = f"stopped at --max-time after {len(self.candidates)} candidates"
        return self.stopped is not None

    def try_candidate(self, candidate: Candidate, *, always: bool = False) -> Candidate | None:
        """Build and score ``candidate``; None when the search is out of time or candidates (unless
        ``always``: the FP32 baseline and the float candidates are built whatever the limits)."""
        if not always and self.out_of_budget():
            return None
        self.candidates.append(candidate)
        candidate.index = len(self.candidates)
        self.progress.step(candidate.id)
        started = time.monotonic()
        candidate.directory = self.root / "candidates" / candidate.id
        try:
            # A QAT candidate's model carries its own scales: nothing to calibrate.
            calibrate = candidate.precision == "int8" and candidate.source_model is None
            manifest = convert(
                candidate.source_model or self.model, self.profile, candidate.directory, format=candidate.format,
                precision=candidate.precision, calibration=self.calibration if calibrate else None,
                calibration_samples=self.calibration_samples, calibration_method=candidate.calibration_method,
                float_nodes=() if candidate.accuracy_control else candidate.float_nodes,
                accuracy_control=self._accuracy_control() if candidate.accuracy_control else None,
                input_shapes=self.input_shapes, force=True, **candidate.settings)
            candidate.float_nodes = tuple(manifest.options.get("float_layers", candidate.float_nodes))
            candidate.artifact_id = manifest.id
            candidate.size_bytes = sum(f.size for f in manifest.files)
            candidate.calibration_cache = manifest.options.get("calibration_cache")
            if manifest.options.get("int8_layers") == 0:  # accuracy control reverted everything: an fp32 model
                candidate.rejected_by = "no int8 layer left"
                candidate.error = f"accuracy control kept all {len(candidate.float_nodes)} layers in float"
            else:
                self._evaluate(candidate, manifest)
        except EdgeqError as exc:
            candidate.error = exc.message
            log.info("%s: %s", candidate.name, exc.message)
        candidate.seconds = time.monotonic() - started
        return candidate

    def _accuracy_control(self) -> AccuracyControl:
        """The budget as the backend's own accuracy control sees it, with half the budget as its target:
        its metric runs on the backend's float model, ours on the source, and ours decides. It reads the
        scores output, one sample at a time (NNCF ranks layers by per-sample values)."""
        labels, reference = self.dataset.labels, next(iter(self.references.values()))
        selection = self.selection_samples()

        if self.budget.max_accuracy_drop is not None:
            def metric(outputs, indices):
                correct = [float(np.argmax(o) == labels[i]) for o, i in zip(outputs, indices, strict=True)]
                return float(np.mean(correct)), correct
            max_drop = self.budget.max_accuracy_drop / 2
        else:
            # One call's output: a batch of one, or, for a model with whole inputs, the sample's output itself.
            sample_axis = bool(self.dataset.whole)

            def metric(outputs, indices):
                values = [float(cosine_per_sample(*per_sample(
                    reference[i : i + 1], np.asarray(o)[None] if sample_axis else np.asarray(o)))[0])
                          for o, i in zip(outputs, indices, strict=True)]
                return float(np.mean(values)), values
            max_drop = (1.0 - self.budget.min_cosine) / 2
        return AccuracyControl(inputs=dict(self.dataset.head(selection).inputs), metric=metric, max_drop=max_drop)

    def selection_samples(self) -> int:
        """How many eval samples (the first ones) may choose float layers: NNCF's accuracy control validates on
        them, leave-one-out ranks layers by them. Half the set, so the other half can judge the choice without
        the optimism of having been picked on it; the whole set when it is too small to split."""
        return self.dataset.samples // 2 if self.dataset.samples >= 2 * SCREEN_SAMPLES else self.dataset.samples

    def _evaluate(self, candidate: Candidate, manifest: Manifest) -> None:
        session = open_session(candidate.directory / manifest.model_file, manifest.format,
                               precision=manifest.precision)
        names = {t.name: t.source_name for t in [*manifest.inputs, *manifest.outputs] if t.source_name}
        artifact_outputs = [spec["name"] for spec in session.outputs]

        def scored(start: int, stop: int, ran: dict[str, np.ndarray] | None = None):
            """The score on samples ``start`` to ``stop``, from ``ran`` (outputs on every sample) when given."""
            dataset = self.dataset.part(start, stop)
            if ran is None:
                outputs = by_source_name(run_artifact_outputs(session, names, dataset, candidate.directory),
                                         artifact_outputs, self.source.outputs, names)
            else:
                outputs = {name: array[start:stop] for name, array in ran.items()}
            references = {name: array[start:stop] for name, array in self.references.items()}
            return score(references, outputs, dataset.labels, self.budget, inputs=dataset.inputs), outputs

        samples, selection = self.dataset.samples, self.selection_samples()
        if (candidate.accuracy_control or candidate.leave_one_out == "set") and selection < samples:
            # Its float layers were chosen by scores on the first samples: it is judged on the others only.
            candidate.score = scored(selection, samples)[0]
            chooser = "accuracy control" if candidate.accuracy_control else "leave-one-out"
            candidate.scored_on = (f"held out: samples {selection}-{samples - 1} ({chooser} chose its float "
                                   f"layers on 0-{selection - 1})")
            return
        if samples >= 2 * SCREEN_SAMPLES:
            candidate.screen = scored(0, SCREEN_SAMPLES)[0]  # inside the selection samples (half the set)
            if candidate.screen.clearly_fails(self.budget):
                candidate.rejected_by = "screen"
                return
        candidate.score, outputs = scored(0, samples)
        if candidate.leave_one_out == "single":
            candidate.ranking = scored(0, selection, outputs)[0] if selection < samples else candidate.score


def _better(tried: Candidate | None, best: Candidate | None) -> Candidate | None:
    if tried is None or tried.measured is None:
        return best
    return tried if best is None or tried.measured.metric() > best.measured.metric() else best


# Settings tried one at a time after the calibration method, each kept only if it scores better, where the
# format's backend takes them: ORT on weighted layers only; NNCF's asymmetric preset, full bias correction.
INT8_SETTINGS = ({"int8_op_types": "weighted"}, {"int8_preset": "mixed"}, {"fast_bias_correction": False})
# and, for transformer-like sources (candidates.looks_like_transformer), {"transformer": True}: SmoothQuant


def _search_int8(search: _Search, fmt: str, methods: tuple[str, ...]) -> Candidate | None:
    """Stage A, full INT8: one parameter at a time, keeping the best (as NNCF's hyperparameter tuner does);
    returns the best candidate (None when none could be built or the search is out of budget)."""
    best = None
    for method in calibration_methods(methods):
        tried = search.try_candidate(Candidate(fmt, "int8", "int8", calibration_method=method))
        best = _better(tried, best)
        if tried is None or tried.passed:
            return best
    tunables = registry.backend(fmt).int8_tunables
    settings = INT8_SETTINGS + (({"transformer": True},) if search.transformer else ())
    for setting in settings:
        if best is None or best.passed or not set(setting) <= set(tunables):
            continue
        tried = search.try_candidate(Candidate(fmt, "int8", "int8", best.calibration_method,
                                               settings={**best.settings, **setting}))
        if tried is None:
            return best
        best = _better(tried, best)
    return best


def _search_format(search: _Search, fmt: str) -> None:
    """Stages A to C for one format: full INT8, dynamic, then mixed precision when INT8 missed the budget, then
    16-bit activations when mixed precision missed it too (or the format has none)."""
    can = buildable(fmt, search.source.kind)
    best = _search_int8(search, fmt, can["int8"]) if "int8" in can else None
    if "dynamic" in can and search.try_candidate(Candidate(fmt, "dynamic", "dynamic")) is None:
        return
    backend = registry.backend(fmt)
    failed = [c for c in search.candidates if c.format == fmt and c.scheme == "int8" and c.error]
    if best is None and failed and not search.out_of_budget():
        # Every full-INT8 candidate failed (Basic Pitch in TFLite: the int8 DIV kernel refuses a divisor quantized
        # to zero). Nothing to rank layers from; 16-bit activations may still hold the range.
        search.notes.append(f"{fmt}: no full-INT8 candidate could be scored, so no mixed candidate "
                            f"({failed[0].error})")
        _try_16_bit_activations(search, fmt, failed[0].calibration_method, {})
        return
    if best is None or best.passed or search.out_of_budget():
        return
    if "accuracy_control" in backend.int8_tunables and search.budget.gates:
        search.notes.append(f"{fmt}: no mixed candidate: NNCF's accuracy control ranks layers by a per-sample "
                            "metric, and --gate metrics are computed over the whole eval set")
    elif "accuracy_control" in backend.int8_tunables:
        search.try_candidate(Candidate(fmt, "int8", "mixed", best.calibration_method, settings=best.settings,
                                       accuracy_control=True))
    elif fmt in SHORTLISTS and "int8" in backend.float_node_precisions:
        search_mixed(search, fmt, best)
    if not any(c.passed for c in search.candidates if c.format == fmt and c.scheme in ("int8", "mixed")):
        # Stage C keeps A's best settings: what 16 bits fix is the activation range, not the rest. A passing
        # dynamic candidate does not skip it: float activations are another kernel path, and the device decides.
        _try_16_bit_activations(search, fmt, best.calibration_method, best.settings)


def _try_16_bit_activations(search: _Search, fmt: str, method: str | None, settings: dict) -> None:
    """Stage C: int8 weights with 16-bit activations and otherwise ``settings``, where ``fmt`` has them."""
    if "activation_bits" in registry.backend(fmt).int8_tunables:
        search.try_candidate(Candidate(fmt, "int8", "a16", method, settings={**settings, "activation_bits": 16}))


def tune(model: Path | str, target: Target, profile: DeviceProfile, *, calibration: Path | str,
         eval_path: Path | str, budget: Budget, output: Path | str, objective: str = "latency",
         formats: list[str] | None = None, max_time_s: float = 1200.0, max_candidates: int = 24,
         calibration_samples: int = 300, runs: int = 100, min_seconds: float = 0.5,
         input_shapes: dict | None = None, force: bool = False, progress: Progress | None = None,
         train: Path | str | None = None, qat_epochs: int = 3) -> TuneResult:
    """Find the artifact for ``target`` that meets ``budget`` and is best by ``objective``; see the module.
    ``train`` (a Keras or .pt2 model's training .npz with labels) adds QAT candidates (stage Q)."""
    from edgeq.tune.output import write_outputs  # the report's writers, only once there is something to write

    started = time.monotonic()
    progress = progress or Progress()
    root = Path(output)
    if objective not in OBJECTIVES:
        raise TuneError(f"unknown objective '{objective}' (one of {', '.join(OBJECTIVES)})")
    if objective == "energy" and profile.power.sensor == "none":
        raise TuneError(f"profile '{profile.name}' has no power sensor: --objective energy cannot be measured",
                        hint="use --objective latency or size, or set power.sensor in the profile")
    if root.exists() and any(root.iterdir()):
        if not force:
            raise TuneError(f"{root}: output directory is not empty", hint="use --force to replace it")
        if not (root / "tune.json").exists() and not (root / "candidates").is_dir():
            # --force deletes the directory: only ever one that an earlier tune wrote.
            raise TuneError(f"{root}: not an edgeq tune output directory; refusing to replace it",
                            hint="give --output a new or empty directory")
    model, calibration, eval_path = Path(model), Path(calibration), Path(eval_path)
    if model.suffix.lower() == ".onnx" and model.is_file() and (ops := onnx_quantized_ops(model)):
        # Its scales are fixed and there is no FP32 model to measure a budget against: nothing to search.
        raise TuneError(f"{model}: the model is already quantized ({describe(ops)}): tune searches how to "
                        "quantize a float model", hint="convert it with --precision int8 for each format (its "
                        "scales are kept) and bench each on the device; or tune the float model")
    source = load_source(model, input_shapes)
    if train is not None:
        if source.kind not in ("keras", "pytorch"):
            raise TuneError(f"{model}: --train adds QAT candidates, which are built for Keras and PyTorch .pt2 "
                            f"models only (this is a {source.kind} model)", hint="leave out --train")
        from edgeq.qat.core import check_train

        check_train(model, Path(train))  # a bad file or missing QAT packages fail now, not after stage C
    notes: list[str] = []
    fmts = runnable_formats(target, allowed_formats(profile, source.kind, formats), formats, notes)
    dataset = load_dataset(eval_path, source.inputs, role="eval")
    check_eval_for_budget(budget, dataset.labels, eval_path)
    load_dataset(calibration, source.inputs, role="calibration")  # a bad file fails now, not at stage A
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)

    progress.stage("fp32 reference")
    references, cached = reference_outputs(source, dataset)
    if dataset.labels is not None:
        check_labels_range(dataset, int(np.prod(next(iter(references.values())).shape[1:])))
    search = _Search(model, profile, calibration, calibration_samples, budget, source, dataset, references, root,
                     started + max_time_s, max_candidates, progress, input_shapes=dict(input_shapes or {}),
                     notes=notes)
    search.transformer = "openvino" in fmts and looks_like_transformer(source)
    progress.stage("host: build and score candidates")
    search.try_candidate(Candidate(fmts[0], "fp32", "fp32"), always=True)  # the baseline, first
    for fmt in fmts:
        _search_format(search, fmt)
    if train is not None:
        search_qat(search, fmts, Path(train), qat_epochs)
    can_bf16, why_not = cpu_supports_bf16()
    if not can_bf16 and any("bf16" in buildable(f, source.kind) for f in fmts):
        search.notes.append(f"bf16 not tried: this host cannot validate it ({why_not})")
    # Stages D and E, whatever the limits (as the FP32 baseline): at most three per format, no calibration and no
    # search. The limits bound the quantized search; a tuned artifact slower than a plain float conversion would
    # be worse than none. Measured: MobileNetV2 at --min-cosine 0.99 hit --max-candidates 24 in ONNX mixed
    # precision, so TFLite FP32, the fastest artifact in the budget, was never built and tune chose 0.91x of it.
    for fmt in fmts:
        for precision in ("fp16", "bf16"):
            if precision in buildable(fmt, source.kind) and (precision != "bf16" or can_bf16):
                search.try_candidate(Candidate(fmt, precision, precision), always=True)
        if fmt != fmts[0]:
            search.try_candidate(Candidate(fmt, "fp32", "fp32"), always=True)
    if search.stopped:
        search.notes.append(search.stopped)
    cache = [c.calibration_cache for c in search.candidates if c.calibration_cache in ("hit", "stored")]
    if cache:
        search.notes.append(f"onnx calibration ranges: {cache.count('stored')} computed, {cache.count('hit')} "
                            "reused from the cache (ORT's calibration cache, by content hash)")
    host = host_profile_name()
    search.notes += [f"{fmt} int8 host scores: {c}" for fmt in fmts if host and any(
        x.format == fmt and x.quantized for x in search.candidates) and (c := host_caveat(fmt, "int8", profile, host))]

    result = TuneResult(root, target.name, profile.name, objective, budget, search.candidates, None, None, "",
                        search.notes, cached, source_kind=source.kind)
    choose(result, target, eval_path, runs=runs, min_seconds=min_seconds, progress=progress)
    mark_pareto(result.candidates)
    result.seconds = time.monotonic() - started
    write_outputs(result)
    return result
