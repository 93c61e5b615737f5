"""Metrics computed on the controller: accuracy against labels and agreement between two models' outputs."""

from __future__ import annotations

import numpy as np


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Share of samples whose label is among the ``k`` highest scores. ``scores`` is (N, classes).

    With ``k`` equal to the number of classes every label is among the top ``k`` and the result is 1.0
    whatever the model did: it measures nothing, and callers should not report it (bench reports None).
    A ``k`` above the number of classes is a ValueError rather than silently fewer than ``k``.
    """
    scores = np.asarray(scores).reshape(len(labels), -1)
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"top-{k} accuracy of scores with {scores.shape[1]} classes")
    top = np.argpartition(-scores, kth=k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def per_sample(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both outputs as (samples, values) float64 rows; ValueError when their shapes differ."""
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    out = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    if ref.shape != out.shape:
        raise ValueError(f"output shapes differ: {ref.shape} vs {out.shape}")
    return ref, out


def cosine_per_sample(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row pair (rows from ``per_sample``)."""
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    dots = np.sum(ref * out, axis=1)
    # Two identical rows agree (all-zero ones too); one zero row against a non-zero one has no direction in common.
    both_zero = norms == 0
    return np.where(both_zero, np.where(np.all(ref == out, axis=1), 1.0, 0.0), dots / np.where(both_zero, 1, norms))


def nmse(ref: np.ndarray, out: np.ndarray) -> float:
    """Squared error over the reference's power (0 is exact; an all-zero reference gives 0 or 1)."""
    power = float(np.sum(ref**2))
    return float(np.sum((out - ref) ** 2) / power) if power > 0 else float(np.sum(out**2) > 0)


def agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """How closely ``candidate`` outputs follow ``reference``: top-1 agreement, mean cosine, max |error|."""
    ref, out = per_sample(reference, candidate)
    return {
        "top1_agreement": float(np.mean(np.argmax(ref, axis=1) == np.argmax(out, axis=1))),
        "cosine_similarity": float(np.mean(cosine_per_sample(ref, out))),
        "max_abs_error": float(np.max(np.abs(ref - out))) if ref.size else 0.0,
    }


def output_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Agreement of one output of any kind (scores, embeddings, boxes): cosine mean and min over samples, NMSE
    and max |error|. Top-1 agreement is left to the scores output, where it means something."""
    ref, out = per_sample(reference, candidate)
    cosine = cosine_per_sample(ref, out)
    return {"cosine_mean": float(np.mean(cosine)), "cosine_min": float(np.min(cosine)) if len(cosine) else 1.0,
            "nmse": nmse(ref, out), "max_abs_error": float(np.max(np.abs(ref - out))) if ref.size else 0.0}


def matched_outputs(artifact_names: list[str], source_outputs: list[str], source_names: dict[str, str]) -> dict[int, int]:
    """Artifact output index -> source output index, by the source name each artifact output records (a
    converter may reorder or rename outputs); by position when no name matches and the counts agree."""
    by_name = {name: i for i, name in enumerate(source_outputs)}
    matched = {i: by_name[source_names.get(name, name)] for i, name in enumerate(artifact_names)
               if source_names.get(name, name) in by_name}
    if not matched and len(artifact_names) == len(source_outputs):
        matched = {i: i for i in range(len(artifact_names))}
    return matched


def by_source_name(outputs: list[np.ndarray], artifact_names: list[str], source_outputs: list[str],
                   source_names: dict[str, str]) -> dict[str, np.ndarray]:
    """The artifact's outputs keyed by the source output each one is (``matched_outputs``)."""
    return {source_outputs[source_index]: outputs[artifact_index] for artifact_index, source_index
            in matched_outputs(artifact_names, source_outputs, source_names).items()}


def per_output_agreement(references: list[np.ndarray], source_outputs: list[str], outputs: list[np.ndarray],
                         artifact_names: list[str], source_names: dict[str, str]) -> dict[str, dict[str, float]]:
    """Each artifact output that has a source counterpart, compared with it: source output name -> agreement.
    An output whose shape differs from its counterpart's is left out (it cannot be compared)."""
    compared = {}
    for artifact_index, source_index in matched_outputs(artifact_names, source_outputs, source_names).items():
        reference, candidate = references[source_index], outputs[artifact_index]
        if np.shape(reference) == np.shape(candidate):
            compared[source_outputs[source_index]] = output_agreement(reference, candidate)
    return compared
