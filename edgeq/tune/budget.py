"""The accuracy budget a tuned artifact must meet, and how a candidate's outputs are scored against it.

With labels the budget is the top-1 drop against FP32 on the same samples, with a paired 95% interval (the
per-sample differences of correct/incorrect), so a 1-point budget on a few hundred samples is read
honestly. Without labels it is output agreement: cosine (mean and min over samples) and NMSE.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from edgeq.errors import DataError, TuneError
from edgeq.metrics import cosine_per_sample, nmse, per_sample

Z_95 = 1.959964  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Budget:
    """Exactly one of ``max_accuracy_drop`` (top-1 points as a fraction, needs labels) and ``min_cosine``."""

    max_accuracy_drop: float | None = None
    min_cosine: float | None = None

    def __post_init__(self) -> None:
        if (self.max_accuracy_drop is None) == (self.min_cosine is None):
            raise TuneError("give one accuracy budget: --max-accuracy-drop or --min-cosine")
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop < 1:
            raise TuneError(f"--max-accuracy-drop must be in [0, 1), got {self.max_accuracy_drop}")
        if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
            raise TuneError(f"--min-cosine must be in [-1, 1], got {self.min_cosine}")

    @property
    def needs_labels(self) -> bool:
        return self.max_accuracy_drop is not None

    def describe(self) -> str:
        if self.max_accuracy_drop is not None:
            return f"top-1 drop <= {self.max_accuracy_drop * 100:.2f} points"
        return f"output cosine mean >= {self.min_cosine}"


@dataclass
class Score:
    """A candidate's agreement with FP32 on the eval samples, and whether it meets the budget."""

    samples: int
    passed: bool
    cosine_mean: float
    cosine_min: float
    nmse: float
    top1_reference: float | None = None
    top1: float | None = None
    top1_drop: float | None = None
    top1_drop_ci95: tuple[float, float] | None = None
    cosine_mean_ci95: tuple[float, float] | None = None

    def clearly_fails(self, budget: Budget) -> bool:
        """True when even the favourable end of the 95% interval misses the budget (a screening verdict)."""
        if budget.max_accuracy_drop is not None:
            return self.top1_drop_ci95 is not None and self.top1_drop_ci95[0] > budget.max_accuracy_drop
        return self.cosine_mean_ci95 is not None and self.cosine_mean_ci95[1] < budget.min_cosine

    def metric(self) -> float:
        """The budget's own number, higher-is-better (for the Pareto front): -drop or cosine mean."""
        return -self.top1_drop if self.top1_drop is not None else self.cosine_mean

    def summary(self) -> str:
        if self.top1_drop is not None and self.top1_drop_ci95 is not None:
            low, high = self.top1_drop_ci95
            return f"drop {self.top1_drop * 100:+.2f} [{low * 100:+.2f},{high * 100:+.2f}] pt"
        return f"cos {self.cosine_mean:.4f} (min {self.cosine_min:.4f})"

    def to_json(self) -> dict:
        data = asdict(self)
        for key in ("top1_drop_ci95", "cosine_mean_ci95"):
            if data[key] is not None:  # an interval over one sample is unbounded: no interval
                data[key] = list(data[key]) if all(math.isfinite(v) for v in data[key]) else None
        return data


def check_eval_for_budget(budget: Budget, labels: np.ndarray | None, eval_path) -> None:
    if budget.needs_labels and labels is None:
        raise DataError(f"{eval_path}: --max-accuracy-drop needs labels, and this eval file has no 'labels' array",
                        hint="add labels to the eval file, or give --min-cosine for an output-agreement budget")


def _half_width(values: np.ndarray) -> float:
    """Half-width of the normal 95% interval of the mean of ``values`` (infinite for one sample)."""
    if len(values) < 2:
        return math.inf
    return Z_95 * float(np.std(values, ddof=1)) / math.sqrt(len(values))


def score(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None, budget: Budget) -> Score:
    """Score ``candidate`` outputs against FP32 ``reference`` outputs (first axis: samples)."""
    try:
        ref, cand = per_sample(reference, candidate)
    except ValueError:
        raise TuneError(f"candidate output shape {candidate.shape} differs from the fp32 {reference.shape}") from None
    cosine = cosine_per_sample(ref, cand)
    result = Score(samples=len(ref), passed=False, cosine_mean=float(np.mean(cosine)),
                   cosine_min=float(np.min(cosine)), nmse=nmse(ref, cand))
    half = _half_width(cosine)
    result.cosine_mean_ci95 = (result.cosine_mean - half, result.cosine_mean + half)
    if labels is not None:
        ref_correct = (np.argmax(ref, axis=1) == labels).astype(np.float64)
        cand_correct = (np.argmax(cand, axis=1) == labels).astype(np.float64)
        diff = ref_correct - cand_correct  # paired: the same samples through both models
        drop = float(np.mean(diff))
        half = _half_width(diff)
        result.top1_reference, result.top1 = float(np.mean(ref_correct)), float(np.mean(cand_correct))
        result.top1_drop, result.top1_drop_ci95 = drop, (drop - half, drop + half)
    if budget.max_accuracy_drop is not None:
        result.passed = result.top1_drop is not None and result.top1_drop <= budget.max_accuracy_drop + 1e-12
    else:
        result.passed = result.cosine_mean >= budget.min_cosine
    return result
