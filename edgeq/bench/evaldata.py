"""Eval data on the controller: read and checked against the artifact, the FP32 reference computed from the
manifest's own source, and accuracy computed from what the device sent back. Labels never leave here."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from edgeq.data import Dataset, InputSpec, check_labels_range, load_dataset, read_npz
from edgeq.errors import BenchError, DataError, EdgeqError
from edgeq.manifest import Manifest, TensorSpec, sha256_tree, verify_artifact
from edgeq.metrics import agreement, by_source_name, per_output_agreement, top_k_accuracy
from edgeq.targets import Target
from edgeq.taskmetrics import Metric, MetricData, compute_metrics

log = logging.getLogger(__name__)


@dataclass
class EvalData:
    """Eval inputs as they go to the device (keyed by artifact input name), and labels that stay here."""

    dataset: Dataset
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    reference: np.ndarray | None = None  # the source's first output: what the scores are compared with
    references: dict[str, np.ndarray] = field(default_factory=dict)  # every source output, by its name
    reference_note: str | None = None
    scores_output: str | None = None  # the artifact output compared (the scores)
    device_file: Path | None = field(default=None, repr=False)


def _num_classes(spec: TensorSpec | None) -> int | None:
    if spec is None:
        return None
    dims = spec.shape[1:]
    if not dims or any(d is None for d in dims):
        return None
    return int(np.prod(dims))


def _read_eval(eval_path: str | Path, manifest: Manifest) -> Dataset:
    # Quantized artifacts take float data too: the runner quantizes with the artifact's own parameters.
    # Integer inputs (token ids, byte values) are data, not quantized floats: they stay integers.
    specs = [InputSpec(name=t.name, shape=list(t.shape), dtype=t.dtype if t.dtype.startswith(("int", "uint")) and
                       t.scale is None else "float32") for t in manifest.inputs]
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


def _reference_outputs(manifest: Manifest, source, data: EvalData) -> tuple[list[np.ndarray] | None, str]:
    """FP32 outputs of the manifest's source model on the eval inputs; (None, why) when it fails."""
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
    source.quantized_ops = manifest.options.get("source_quantized_ops") or {}
    return outputs, source.reference_label


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


def device_outputs(manifest: Manifest, data: EvalData, outputs: Path, output_names: list[str]) -> dict[str, np.ndarray]:
    """The finite numeric outputs the device sent back, keyed by the source output each one is. Only called once
    ``device_scores`` has checked the file."""
    arrays = read_npz(outputs)
    got = [arrays.get(f"output_{i}") for i in range(len(output_names))]
    present = [(name, array) for name, array in zip(output_names, got, strict=True)
               if array is not None and np.issubdtype(array.dtype, np.number) and np.all(np.isfinite(array))]
    source_names = {t.name: t.source_name for t in manifest.outputs if t.source_name}
    sources = list(data.references) or [t.source_name or t.name for t in manifest.outputs]
    return by_source_name([a for _, a in present], [n for n, _ in present], sources, source_names)


def device_output_agreement(data: EvalData, by_source: dict[str, np.ndarray]) -> dict:
    """Every output the device sent back (``device_outputs``) compared with the FP32 source's output of the same
    name (``{}`` without references)."""
    names = [name for name in data.references if name in by_source]
    return per_output_agreement([data.references[n] for n in names], names, [by_source[n] for n in names], names, {})


def device_metrics(metrics: list[Metric], data: EvalData, by_source: dict[str, np.ndarray],
                   manifest: Manifest) -> dict[str, dict[str, float]] | None:
    """``--metric`` results on the device's outputs; None without metrics or without an FP32 reference."""
    if not metrics or not data.references:
        return None
    inputs = {(spec.source_name or spec.name): data.inputs[spec.name] for spec in manifest.inputs}
    return compute_metrics(metrics, MetricData(references=data.references, outputs=by_source, inputs=inputs,
                                               labels=data.labels, scores=next(iter(data.references))))


def device_scores(target: Target, data: EvalData, outputs: Path, output_names: list[str]) -> np.ndarray:
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
        references, data.reference_note = _reference_outputs(manifest, source, data)
        if references is not None:
            data.reference = references[0]
            data.references = dict(zip(source.outputs, references, strict=False))
    # Labels stay here: the file that travels holds inputs only.
    fd, name = tempfile.mkstemp(prefix="edgeq-eval-", suffix=".npz")
    with open(fd, "wb") as handle:
        np.savez(handle, **data.inputs)
    data.device_file = Path(name)
    return manifest, data


def discard(prepared: tuple) -> None:
    if prepared[1] is not None and prepared[1].device_file:
        prepared[1].device_file.unlink(missing_ok=True)
