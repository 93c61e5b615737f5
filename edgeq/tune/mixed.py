"""Tune's stage B by shortlist (ONNX and TFLite; OpenVINO has NNCF's accuracy control): INT8 with the layers
that lose most to quantization kept in float, measured on the eval set like every candidate."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeq.data import load_dataset
from edgeq.tune import sensitivity
from edgeq.tune.candidates import Candidate

if TYPE_CHECKING:
    from edgeq.tune.search import _Search

MIXED_K = (2, 4, 8)  # layers kept in float together, after single layers (k=1) were tried one by one
# Formats whose mixed precision starts from a sensitivity shortlist.
SHORTLISTS = {"onnx": sensitivity.onnx_shortlist, "tflite": sensitivity.tflite_shortlist}


def search_mixed(search: _Search, fmt: str, full_int8: Candidate) -> None:
    """Stage B by shortlist: keep the most sensitive layers in float, until a candidate meets the budget.

    1. Shortlist the layers that lose most to quantization (``sensitivity``).
    2. The bound: the whole shortlist float. When even that misses the budget, no subset of it is expected to
       meet it (keeping a layer float rarely costs accuracy), and stage B ends after one candidate. Measured on
       MobileNetV2 at --min-cosine 0.99: 11 candidates and 330 s, where the bound alone was the best of them.
    3. Each layer alone (leave-one-out), ranked by its score on the selection samples.
    4. The best k = 2, 4, 8 together, judged on the held-out samples (they were picked by eval scores).
    """
    calib = load_dataset(search.calibration, search.source.inputs, role="calibration")
    search.progress.step("ranking layers by quantization loss")
    shortlist = SHORTLISTS[fmt](full_int8.directory, search.source, calib, search.input_shapes)
    if not shortlist.ranked:
        search.notes.append(f"{fmt}: layers not ranked by sensitivity: {shortlist.ranked_by}")

    def mixed(nodes: tuple[str, ...], role: str) -> Candidate | None:
        return search.try_candidate(Candidate(fmt, "int8", "mixed", full_int8.calibration_method, nodes,
                                              settings=full_int8.settings, leave_one_out=role))

    every = tuple(dict.fromkeys(n for t in shortlist.tensors for n in t.nodes))
    if len(shortlist.tensors) > 1 and not set(every) >= shortlist.quantized_nodes:
        bound = mixed(every, "bound")
        if bound is None:
            return
        if not bound.passed:
            reached = bound.measured.summary() if bound.measured else bound.error
            search.notes.append(f"{fmt}: mixed precision ended at its bound: all {len(shortlist.tensors)} "
                                f"shortlisted layers kept float ({reached}) miss the budget, so no subset was tried")
            return
    singles: list[tuple[float, sensitivity.SensitiveTensor]] = []
    for tensor in shortlist.tensors:
        tried = mixed(tensor.nodes, "single")
        if tried is None or tried.passed:
            return
        if (ranking := tried.ranking or tried.measured) is not None:  # a screened-out single: its screen
            singles.append((ranking.metric(), tensor))
    ranked = [t for _, t in sorted(singles, key=lambda pair: -pair[0])]  # ties keep the shortlist's order
    tried_sets: set[frozenset[str]] = set()
    for k in MIXED_K:
        if k >= len(shortlist.tensors) or k > len(ranked):
            break  # the whole shortlist is the bound, measured first
        nodes = tuple(dict.fromkeys(n for t in ranked[:k] for n in t.nodes))
        if set(nodes) >= shortlist.quantized_nodes:  # nothing left quantized: that is the fp32 candidate
            search.notes.append(f"{fmt}: no mixed candidate of the {k} most sensitive layers: keeping their "
                                f"{len(nodes)} nodes float would leave nothing quantized")
            return
        if frozenset(nodes) in tried_sets:  # the k best share nodes with each other: no new set
            continue
        tried_sets.add(frozenset(nodes))
        if len(tried_sets) == 1 and search.selection_samples() == search.dataset.samples:
            search.notes.append(f"{fmt}: eval set of {search.dataset.samples} too small to hold out half: the "
                                "k-layer sets were picked and judged on the same samples")
        tried = mixed(nodes, "set")
        if tried is None or tried.passed:
            return
