"""Regression detection: one result against its baseline, per metric.

Latency is decided by a one-sided Mann-Whitney U test *against a margin*: a regression is reported when
the per-inference samples show, at significance ``alpha``, that the current run is slower than the baseline
by more than ``min_effect`` (the current samples are divided by ``1 + min_effect`` before the test), and
the median ratio itself is at least ``1 + min_effect``.

Why a margin and not a plain test plus a floor: per-inference samples are autocorrelated (caches, clocks,
thermal state drift together), and two runs of the same artifact differ by small systematic shifts. With
thousands of samples a plain test calls a 1 % shift "significant", and with a few dozen samples the median
ratio alone wanders past 5 % by chance; testing "slower by more than the margin" handles both. The test's
variance is inflated by each series' integrated autocorrelation time (estimated from the samples in
measurement order), so autocorrelated samples are not counted as independent. A run-to-run shift cannot be
seen inside one pair of runs at all: keep ``min_effect`` above about 2.5 times the device's run-to-run
jitter (benchmarks/bench_regression.py measures the resulting rates).

Accuracy (top-1, absolute drop) and energy per inference (ratio) are compared against thresholds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from edgeq.report.results import ResultRecord

VerdictStatus = Literal["regressed", "improved", "unchanged", "not-compared"]
Metric = Literal["latency", "accuracy", "energy"]


@dataclass(frozen=True)
class Thresholds:
    """What counts as a regression."""

    min_effect: float = 0.05
    """Smallest relative latency change (median ratio - 1) that is reported, e.g. 0.05 = 5 %."""
    alpha: float = 0.05
    """Significance level of the one-sided Mann-Whitney U test on latency samples."""
    max_top1_drop: float = 0.005
    """Largest acceptable top-1 drop against the baseline, absolute (0.005 = 0.5 percentage points)."""
    max_energy_increase: float = 0.10
    """Largest acceptable relative increase of energy per inference (0.10 = 10 %)."""
    min_samples: int = 5
    """Fewer latency samples than this on either side: no test, the median ratio alone decides."""


@dataclass
class Verdict:
    """The outcome of comparing one metric of one result with its baseline."""

    metric: Metric
    status: VerdictStatus
    current: float | None = None
    baseline: float | None = None
    change: float | None = None
    """Relative change for latency and energy (0.2 = +20 %), absolute for accuracy (-0.01 = -1 point)."""
    p_value: float | None = None
    detail: str = ""

    @property
    def regressed(self) -> bool:
        return self.status == "regressed"

    def as_dict(self) -> dict:
        return {"metric": self.metric, "status": self.status, "current": self.current,
                "baseline": self.baseline, "change": self.change, "p_value": self.p_value,
                "detail": self.detail}


def rank_average(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (like scipy.stats.rankdata)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average = ends - (counts - 1) / 2.0
    return average[inverse]


def integrated_autocorrelation_time(series: np.ndarray, max_lag: int | None = None) -> float:
    """tau = 1 + 2 * sum of autocorrelations of the ranks, summed while positive (>= 1).

    Ranks make it robust to the latency outliers that would dominate a plain autocorrelation.
    """
    n = len(series)
    if n < 8:
        return 1.0
    x = rank_average(series)
    x = x - x.mean()
    variance = float(np.dot(x, x))
    if variance == 0.0:
        return 1.0
    max_lag = max_lag or max(1, min(n // 4, 200))
    tau = 1.0
    for lag in range(1, max_lag + 1):
        rho = float(np.dot(x[:-lag], x[lag:])) / variance
        if rho <= 0.0:
            break
        tau += 2.0 * rho
    return min(tau, float(n))


def mann_whitney_greater(x: np.ndarray, y: np.ndarray, tau_x: float = 1.0, tau_y: float = 1.0) -> float:
    """One-sided p-value that ``x`` tends to be larger than ``y`` (Mann-Whitney U, normal approximation).

    Tie-corrected, with continuity correction. ``tau_x``/``tau_y`` inflate the variance for autocorrelated
    samples: by the Hoeffding projection, Var(U) ~ n1*n2/12 * (n2*tau_x + n1*tau_y) instead of
    n1*n2/12 * (n1 + n2).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        return 1.0
    n = n1 + n2
    ranks = rank_average(np.concatenate([x, y]))
    u = float(ranks[:n1].sum()) - n1 * (n1 + 1) / 2.0
    _, counts = np.unique(np.concatenate([x, y]), return_counts=True)
    tie_term = float(np.sum(counts.astype(np.float64) ** 3 - counts))
    tie_factor = 1.0 - tie_term / (n**3 - n) if n > 1 else 1.0
    inflation = (n2 * max(tau_x, 1.0) + n1 * max(tau_y, 1.0)) / n
    variance = n1 * n2 * (n + 1) / 12.0 * tie_factor * inflation
    if variance <= 0.0:
        return 1.0 if u <= n1 * n2 / 2.0 else 0.0
    z = (u - n1 * n2 / 2.0 - 0.5) / math.sqrt(variance)
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def compare_latency_samples(current: np.ndarray, baseline: np.ndarray, thresholds: Thresholds) -> Verdict:
    """Latency verdict from two sets of per-inference samples (in measurement order)."""
    cur_median = float(np.median(current))
    base_median = float(np.median(baseline))
    ratio = cur_median / base_median if base_median > 0 else math.inf
    change = ratio - 1.0
    slower_floor = 1.0 + thresholds.min_effect
    faster_floor = 1.0 / slower_floor
    if min(len(current), len(baseline)) < thresholds.min_samples:
        regressed, improved = ratio >= slower_floor, ratio <= faster_floor
        status = "regressed" if regressed else "improved" if improved else "unchanged"
        return Verdict("latency", status, cur_median, base_median, change, None,
                       f"p50 {change:+.1%} (too few samples for a test: median ratio only)")
    tau_cur = integrated_autocorrelation_time(current)
    tau_base = integrated_autocorrelation_time(baseline)
    # H1: current / (1 + m) is still slower than baseline, i.e. slower by more than the margin.
    p_slower = mann_whitney_greater(current / slower_floor, baseline, tau_cur, tau_base)
    p_faster = mann_whitney_greater(baseline / slower_floor, current, tau_base, tau_cur)
    if ratio >= slower_floor and p_slower < thresholds.alpha:
        status, p_value = "regressed", p_slower
    elif ratio <= faster_floor and p_faster < thresholds.alpha:
        status, p_value = "improved", p_faster
    else:
        status, p_value = "unchanged", min(p_slower, p_faster)
    detail = (f"p50 {base_median:.4g} -> {cur_median:.4g} ms ({change:+.1%}, one-sided Mann-Whitney "
              f"p={p_value:.2g} against a {thresholds.min_effect:.0%} margin, n={len(current)}/{len(baseline)})")
    return Verdict("latency", status, cur_median, base_median, change, p_value, detail)


def _compare_latency(current: ResultRecord, baseline: ResultRecord, thresholds: Thresholds) -> Verdict:
    cur, base = current.latency_samples(), baseline.latency_samples()
    if len(cur) and len(base):
        return compare_latency_samples(cur, base, thresholds)
    # A result without samples (e.g. written by a trimmed bench): medians only, no test.
    cur_lat, base_lat = current.result.latency_ms, baseline.result.latency_ms
    if cur_lat is None or base_lat is None or base_lat.p50 <= 0:
        return Verdict("latency", "not-compared", detail="no latency on one side")
    ratio = cur_lat.p50 / base_lat.p50
    slower = ratio >= 1.0 + thresholds.min_effect
    faster = ratio <= 1.0 / (1.0 + thresholds.min_effect)
    status = "regressed" if slower else "improved" if faster else "unchanged"
    return Verdict("latency", status, cur_lat.p50, base_lat.p50, ratio - 1.0, None,
                   f"p50 {ratio - 1.0:+.1%} (no samples: median ratio only)")


def _compare_accuracy(current: ResultRecord, baseline: ResultRecord, thresholds: Thresholds) -> Verdict:
    cur_acc, base_acc = current.result.accuracy, baseline.result.accuracy
    if cur_acc is None or base_acc is None or cur_acc.top1 is None or base_acc.top1 is None:
        return Verdict("accuracy", "not-compared", detail="no top-1 accuracy on one side")
    delta = cur_acc.top1 - base_acc.top1
    if -delta > thresholds.max_top1_drop:
        status = "regressed"
    elif delta > thresholds.max_top1_drop:
        status = "improved"
    else:
        status = "unchanged"
    return Verdict("accuracy", status, cur_acc.top1, base_acc.top1, delta, None,
                   f"top-1 {base_acc.top1:.2%} -> {cur_acc.top1:.2%} ({delta * 100:+.2f} points, "
                   f"limit -{thresholds.max_top1_drop * 100:.2g})")


def _compare_energy(current: ResultRecord, baseline: ResultRecord, thresholds: Thresholds) -> Verdict:
    cur, base = current.result.energy_j_per_inference, baseline.result.energy_j_per_inference
    if cur is None or base is None or base <= 0:
        return Verdict("energy", "not-compared", detail="no energy measurement on one side")
    change = cur / base - 1.0
    if change > thresholds.max_energy_increase:
        status = "regressed"
    elif change < -thresholds.max_energy_increase:
        status = "improved"
    else:
        status = "unchanged"
    return Verdict("energy", status, cur, base, change, None,
                   f"energy/inference {base * 1e3:.4g} -> {cur * 1e3:.4g} mJ ({change:+.1%}, "
                   f"limit +{thresholds.max_energy_increase:.0%})")


def compare_results(current: ResultRecord, baseline: ResultRecord, thresholds: Thresholds) -> list[Verdict]:
    """Latency, accuracy and energy verdicts of ``current`` against ``baseline`` (both must be ok runs)."""
    if not (current.ok and baseline.ok):
        reason = "this run failed" if not current.ok else "the baseline run failed"
        return [Verdict(metric, "not-compared", detail=reason) for metric in ("latency", "accuracy", "energy")]
    if current.emulated or baseline.emulated:
        # Timing and power under qemu-user say nothing about the device: never fail a build on them.
        reason = "emulated: latency and energy under emulation are not comparable"
        return [Verdict("latency", "not-compared", detail=reason),
                _compare_accuracy(current, baseline, thresholds),
                Verdict("energy", "not-compared", detail=reason)]
    return [_compare_latency(current, baseline, thresholds),
            _compare_accuracy(current, baseline, thresholds),
            _compare_energy(current, baseline, thresholds)]


def match_baselines(records: list[ResultRecord], baselines: list[ResultRecord]
                    ) -> tuple[list[ResultRecord | None], list[ResultRecord]]:
    """For each record its baseline: same (target, artifact id), else same (target, model, format, precision).

    Returns the matches (None where nothing matched) and the baseline records nobody matched. Among several
    candidates the latest by ``started_at`` wins; ok runs win over failed ones.
    """
    def preference(record: ResultRecord) -> tuple:
        return (record.ok, record.result.started_at or "")

    by_artifact: dict[tuple, ResultRecord] = {}
    by_build: dict[tuple, ResultRecord] = {}
    for base in sorted(baselines, key=preference):
        if base.result.artifact.id is not None:
            by_artifact[base.artifact_key] = base
        by_build[base.build_key] = base
    matches: list[ResultRecord | None] = []
    for record in records:
        match = None
        if record.result.artifact.id is not None:
            match = by_artifact.get(record.artifact_key)
        if match is None:
            match = by_build.get(record.build_key)
        matches.append(match)
    matched_builds = {match.build_key for match in matches if match is not None}
    unmatched = [base for key, base in by_build.items() if key not in matched_builds]
    return matches, unmatched
