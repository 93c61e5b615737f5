"""Host-side validation: run the FP32 source and the new artifact on the same inputs and compare."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgeq.convert.source import SourceModel
from edgeq.data import Dataset, check_labels_range
from edgeq.device.errors import InferenceFailed
from edgeq.device.feeds import run_samples, spec_ranks, whole_inputs
from edgeq.errors import ConversionError
from edgeq.manifest import OutputAgreement, Validation
from edgeq.metrics import agreement, by_source_name, per_output_agreement, top_k_accuracy
from edgeq.profiles import DeviceProfile
from edgeq.taskmetrics import Gate, Metric, MetricData, check_gates, compute_metrics

log = logging.getLogger(__name__)

# Artifacts with a free batch dimension are run in batches of this size; others one sample at a time.
ARTIFACT_BATCH = 64


def _artifact_feed(session, source_names: dict[str, str], data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    feed = {}
    for spec in session.inputs:
        name = source_names.get(spec["name"], spec["name"])
        if name not in data and len(data) == 1 and len(session.inputs) == 1:
            name = next(iter(data))
        feed[spec["name"]] = data[name]
    return feed


def primary_output_index(session, source: SourceModel, source_names: dict[str, str]) -> int:
    """The artifact output that corresponds to the source's first output (the scores we compare)."""
    wanted = source.outputs[0] if source.outputs else None
    for index, spec in enumerate(session.outputs):
        if source_names.get(spec["name"], spec["name"]) == wanted:
            return index
    return 0


def run_artifact_outputs(session, source_names: dict[str, str], dataset: Dataset,
                         where: Path | str = "the model") -> list[np.ndarray]:
    """Every output of the artifact on the whole dataset: batched when its batch dimension is free, except a
    dynamic-quantized artifact's, whose activation scales are computed over the whole input tensor: in a batch
    one sample's range sets another's scale, so it is run one sample at a time, as the device runs it.
    ConversionError, naming ``where``, when the runtime fails while running it."""
    feed = _artifact_feed(session, source_names, dataset.inputs)
    batched = all(spec["shape"] and spec["shape"][0] is None for spec in session.inputs) and \
        (getattr(session, "execution", None) or {}).get("precision") != "dynamic"
    try:
        return run_samples(session.run, feed, whole_inputs(feed, spec_ranks(session.inputs)),
                           ARTIFACT_BATCH if batched else 1)
    except InferenceFailed as exc:
        precision = (getattr(session, "execution", None) or {}).get("precision")
        what = f"the {precision} artifact" if precision else "the artifact"
        raise ConversionError(f"{where}: {what} cannot run the eval data: {exc}",
                              hint="an INT8 kernel that refused its data (a divisor quantized to zero) needs a "
                                   "wider range: try --activation-bits 16, or another --precision") from exc


def validate(source: SourceModel, session, source_names: dict[str, str], dataset: Dataset,
             max_accuracy_drop: float | None, min_cosine: float | None = None,
             metrics: list[Metric] = (), gates: list[Gate] = ()) -> Validation:
    """Compare ``session`` (the artifact) with the FP32 source on ``dataset``.

    With labels the ``max_accuracy_drop`` gate is the top-1 accuracy drop; without, it is the share of samples
    whose top-1 class changed (1 - top-1 agreement), the only drop measurable without labels. ``min_cosine``
    gates every compared output's mean cosine (embeddings, detector heads: outputs top-1 means nothing for).
    ``metrics`` are computed into ``Validation.metrics`` and ``gates`` checked over them (``edgeq.taskmetrics``).
    """
    references = source.run(dataset.inputs)
    reference = references[0]
    if dataset.labels is not None:
        check_labels_range(dataset, int(np.prod(reference.shape[1:])))
    outputs = run_artifact_outputs(session, source_names, dataset, source.path)
    artifact_names = [s["name"] for s in session.outputs]
    measured = compute_metrics(list(metrics), MetricData(
        references=dict(zip(source.outputs, references, strict=False)), labels=dataset.labels,
        outputs=by_source_name(outputs, artifact_names, source.outputs, source_names), inputs=dataset.inputs,
        scores=source.outputs[0] if source.outputs else None)) if metrics else None
    candidate = outputs[primary_output_index(session, source, source_names)]
    agree = agreement(reference, candidate)
    compared = per_output_agreement(references, source.outputs, outputs, artifact_names, source_names)
    result = Validation(
        status="passed", eval_path=str(dataset.path), eval_sha256=dataset.sha256, samples=dataset.samples,
        reference=source.reference_label, max_accuracy_drop=max_accuracy_drop,
        min_cosine=min_cosine, metrics=measured, gates=[gate.spec for gate in gates] or None,
        execution=session.execution, outputs={k: OutputAgreement(**v) for k, v in compared.items()} or None, **agree,
    )
    if dataset.labels is not None:
        result.top1_reference = top_k_accuracy(reference, dataset.labels, 1)
        result.top1 = top_k_accuracy(candidate, dataset.labels, 1)
        result.top1_drop = result.top1_reference - result.top1
        drop, what = result.top1_drop, "top-1 accuracy drop"
    else:
        drop, what = 1.0 - agree["top1_agreement"], "top-1 disagreement with the fp32 source (no labels)"
    if max_accuracy_drop is not None and drop > max_accuracy_drop + 1e-12:
        result.status = "failed"
        result.message = (f"{what} {drop * 100:.2f} points exceeds --max-accuracy-drop "
                          f"{max_accuracy_drop * 100:.2f} points on {dataset.samples} samples")
    else:
        result.message = f"{what} {drop * 100:.2f} points on {dataset.samples} samples"
    if min_cosine is not None:
        cosines = {name: each.cosine_mean for name, each in (result.outputs or {}).items()}
        if not cosines:  # no output matched by name: the scores output is still compared
            cosines = {"output": result.cosine_similarity}
        worst = min(cosines, key=cosines.get)
        if cosines[worst] < min_cosine and result.status == "passed":
            result.status = "failed"
            result.message = (f"output '{worst}' cosine {cosines[worst]:.5f} is below --min-cosine {min_cosine} "
                              f"on {dataset.samples} samples")
    gate_failure = check_gates(list(gates), measured or {})
    if gate_failure and result.status == "passed":
        result.status, result.message = "failed", f"{gate_failure} on {dataset.samples} samples"
    return result


def host_profile_name() -> str | None:
    """The CPU class of this machine: the shipped profile that fits it, ``x86-avx-vnni`` for an x86 CPU with
    AVX-VNNI but no AVX-512 (no profile of its own; its int8 kernels do not saturate), or None where the CPU's
    flags cannot be read (no /proc/cpuinfo) or no profile describes it."""
    import platform

    from edgeq.errors import EdgeqError
    from edgeq.targets import profile_for_cpu

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.lower().startswith(("flags", "features"))), None)
    if not flags:
        return None
    try:
        profile = profile_for_cpu(platform.machine(), flags)
    except EdgeqError:
        return None
    return "x86-avx-vnni" if profile == "x86-avx2" and "avx_vnni" in flags else profile


def host_caveat(fmt: str, precision: str, profile: DeviceProfile, host_profile: str) -> str | None:
    """Why an int8 artifact's accuracy on this host may not be the device's, or None.

    ONNX Runtime's U8S8 kernels and OpenVINO's int8 kernels on x86 without VNNI sum byte pairs into int16
    (vpmaddubsw), which saturates with full 8-bit weights; a VNNI or AMX CPU (vpdpbusd) and Arm do not. An
    artifact built for such a device keeps 8-bit weights, so validating it on an AVX2 host measures a
    saturation the device never has (measured: OpenVINO logits cosine 0.927 on AVX2 against 0.969 on AMX for
    the same IR). The figures are this host's; the device's come from ``bench --eval`` on it.
    """
    if precision != "int8" or host_profile != "x86-avx2" or profile.name == host_profile:
        return None
    full_weights = {"onnx": not profile.onnx_reduce_range,
                    "openvino": profile.openvino_overflow_fix != "enable"}.get(fmt, False)
    if not full_weights:
        return None
    return (f"validated on a CPU without VNNI (profile {host_profile}), whose {fmt} int8 kernels saturate the "
            f"8-bit weights this {profile.name} artifact keeps; the device does not, so its accuracy may be higher "
            f"than these figures: bench --eval on the device measures it")
