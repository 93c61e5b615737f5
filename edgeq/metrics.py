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


def agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """How closely ``candidate`` outputs follow ``reference``: top-1 agreement, mean cosine, max |error|."""
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    out = np.asarray(candidate, dtype=np.float64).reshape(len(candidate), -1)
    if ref.shape != out.shape:
        raise ValueError(f"output shapes differ: {ref.shape} vs {out.shape}")
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    dots = np.sum(ref * out, axis=1)
    # Two all-zero rows are identical; one zero row against a non-zero one has no direction in common.
    both_zero = norms == 0
    cosine = np.where(both_zero, np.where(np.all(ref == out, axis=1), 1.0, 0.0), dots / np.where(both_zero, 1, norms))
    return {
        "top1_agreement": float(np.mean(np.argmax(ref, axis=1) == np.argmax(out, axis=1))),
        "cosine_similarity": float(np.mean(cosine)),
        "max_abs_error": float(np.max(np.abs(ref - out))) if ref.size else 0.0,
    }
