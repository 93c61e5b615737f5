"""The accuracy budget a tuned artifact must meet, and how a candidate's outputs are scored against it.

One of three budgets:

- ``--max-accuracy-drop`` (eval with labels): the top-1 drop against FP32 on the same samples, on the scores
  output (the source's first), with a paired 95% interval (the per-sample differences of correct/incorrect),
  so that a 1-point budget on a few hundred samples is read honestly;
- ``--min-cosine``: output agreement over every output, compared by name with the source's: the worst output's
  mean cosine (its minimum over samples and its NMSE are reported too);
- ``--gate METRIC[.FIELD]>=X`` (or ``<=``, repeatable): any ``edgeq.taskmetrics`` metric (embedding cosine, a
  user's ``module:function``) over the candidate's outputs, every gate passing. A gate has no interval, so
  gated candidates are never screened out early.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from edgeq.errors import DataError, TuneError
from edgeq.metrics import cosine_per_sample, nmse, per_sample
from edgeq.taskmetrics import Gate, MetricData, check_labels, compute_metrics, metrics_for

Z_95 = 1.959964  # two-sided 95% normal quantile
# How candidates are scored; a change makes earlier choices stale (the lab's cached tunes key on it).
# 2: --min-cosine reads every output, the worst counting (1: the first output only).
SCORING_VERSION = 2


@dataclass(frozen=True)
class Budget:
    """Exactly one of ``max_accuracy_drop`` (top-1 points as a fraction, needs labels), ``min_cosine`` and
    ``gates`` (``taskmetrics.parse_gate`` values, with the ``metrics`` they read and any others to report)."""

    max_accuracy_drop: float | None = None
    min_cosine: float | None = None
    gates: tuple[Gate, ...] = ()
    metric_specs: tuple[str, ...] = ()  # --metric: computed and reported for every candidate
    metrics: tuple = field(default=(), init=False, repr=False, compare=False)  # resolved: taskmetrics.Metric

    def __post_init__(self) -> None:
        given = sum((self.max_accuracy_drop is not None, self.min_cosine is not None, bool(self.gates)))
        if given != 1:
            raise TuneError("give one accuracy budget: --max-accuracy-drop, --min-cosine or --gate"
                            + (" (gates are one budget together)" if given > 1 and self.gates else ""))
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop < 1:
            raise TuneError(f"--max-accuracy-drop must be in [0, 1), got {self.max_accuracy_drop}")
        if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
            raise TuneError(f"--min-cosine must be in [-1, 1], got {self.min_cosine}")
        # Resolved now: a user metric module that does not import fails before any work.
        object.__setattr__(self, "metrics", tuple(metrics_for(list(self.metric_specs), list(self.gates))))

    @property
    def needs_labels(self) -> bool:
        return self.max_accuracy_drop is not None

    def describe(self) -> str:
        if self.max_accuracy_drop is not None:
            return f"top-1 drop <= {self.max_accuracy_drop * 100:.2f} points"
        if self.gates:
            return " and ".join(gate.spec for gate in self.gates)
        return f"output cosine mean >= {self.min_cosine} (every output)"

    def to_json(self) -> dict:
        return {"max_accuracy_drop": self.max_accuracy_drop, "min_cosine": self.min_cosine,
                "gates": [gate.spec for gate in self.gates] or None, "metrics": list(self.metric_specs) or None}


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
    worst_output: str | None = None  # the output whose mean cosine is cosine_mean
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)  # per output: cosine mean/min, nmse
    metrics: dict[str, dict[str, float]] | None = None  # --metric and --gate metrics
    gate_value: float | None = None  # the first gate's measured number

    def clearly_fails(self, budget: Budget) -> bool:
        """True when even the favourable end of the 95% interval misses the budget (a screening verdict);
        never for gates, which have no interval."""
        if budget.max_accuracy_drop is not None:
            return self.top1_drop_ci95 is not None and self.top1_drop_ci95[0] > budget.max_accuracy_drop
        if budget.gates:
            return False
        return self.cosine_mean_ci95 is not None and self.cosine_mean_ci95[1] < budget.min_cosine

    def metric(self) -> float:
        """The budget's own number, higher-is-better (for the Pareto front and choosing between settings):
        -drop, the first gate's number (negated for a <= gate), or the worst output's cosine mean."""
        if self.gate_value is not None:
            return self.gate_value
        if self.top1_drop is not None:
            return -self.top1_drop
        return self.cosine_mean

    def summary(self) -> str:
        if self.gate_value is not None and self.metrics:
            return "; ".join(f"{name} " + ", ".join(f"{k} {v:.4g}" for k, v in fields.items())
                             for name, fields in self.metrics.items())
        if self.top1_drop is not None and self.top1_drop_ci95 is not None:
            low, high = self.top1_drop_ci95
            return f"drop {self.top1_drop * 100:+.2f} [{low * 100:+.2f},{high * 100:+.2f}] pt"
        where = f" on {self.worst_output}" if len(self.outputs) > 1 and self.worst_output else ""
        return f"cos {self.cosine_mean:.4f} (min {self.cosine_min:.4f}){where}"

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
    check_labels(list(budget.metrics), labels is not None, eval_path)


def _half_width(values: np.ndarray) -> float:
    """Half-width of the normal 95% interval of the mean of ``values`` (infinite for one sample)."""
    if len(values) < 2:
        return math.inf
    return Z_95 * float(np.std(values, ddof=1)) / math.sqrt(len(values))


def score(references: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], labels: np.ndarray | None,
          budget: Budget, inputs: Mapping[str, np.ndarray] | None = None) -> Score:
    """Score a candidate's ``outputs`` against the FP32 ``references`` (both keyed by source output name, the
    scores output first; first axis: samples). ``inputs`` (the eval inputs by source name) are for metrics."""
    compared = [name for name in references if name in outputs]
    if not compared:
        raise TuneError(f"the candidate gives none of the fp32 outputs {list(references)} (it gives "
                        f"{list(outputs)})")
    per_output, cosines = {}, {}
    for name in compared:
        try:
            ref, cand = per_sample(references[name], outputs[name])
        except ValueError:
            raise TuneError(f"candidate output '{name}' has shape {list(np.shape(outputs[name]))}, the fp32 "
                            f"{list(np.shape(references[name]))}") from None
        cosines[name] = cosine_per_sample(ref, cand)
        per_output[name] = {"cosine_mean": float(np.mean(cosines[name])), "cosine_min": float(np.min(cosines[name])),
                            "nmse": nmse(ref, cand)}
    worst = min(compared, key=lambda name: per_output[name]["cosine_mean"])
    result = Score(samples=len(cosines[worst]), passed=False, cosine_mean=per_output[worst]["cosine_mean"],
                   cosine_min=min(o["cosine_min"] for o in per_output.values()),
                   nmse=max(o["nmse"] for o in per_output.values()), worst_output=worst, outputs=per_output)
    half = _half_width(cosines[worst])
    result.cosine_mean_ci95 = (result.cosine_mean - half, result.cosine_mean + half)
    scores = compared[0]
    if labels is not None and scores == next(iter(references)):
        ref, cand = per_sample(references[scores], outputs[scores])
        ref_correct = (np.argmax(ref, axis=1) == labels).astype(np.float64)
        cand_correct = (np.argmax(cand, axis=1) == labels).astype(np.float64)
        diff = ref_correct - cand_correct  # paired: the same samples through both models
        drop = float(np.mean(diff))
        half = _half_width(diff)
        result.top1_reference, result.top1 = float(np.mean(ref_correct)), float(np.mean(cand_correct))
        result.top1_drop, result.top1_drop_ci95 = drop, (drop - half, drop + half)
    if budget.metrics:
        result.metrics = compute_metrics(list(budget.metrics), MetricData(
            references=references, outputs=outputs, inputs=inputs or {}, labels=labels, scores=scores))
    if budget.max_accuracy_drop is not None:
        result.passed = result.top1_drop is not None and result.top1_drop <= budget.max_accuracy_drop + 1e-12
    elif budget.gates:
        values = [gate.read(result.metrics or {}) for gate in budget.gates]
        result.passed = all(gate.passes(value) for gate, (_, value) in zip(budget.gates, values, strict=True))
        first_value = values[0][1]
        result.gate_value = first_value if budget.gates[0].op == ">=" else -first_value
    else:
        result.passed = result.cosine_mean >= budget.min_cosine
    return result
