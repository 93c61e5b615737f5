"""Regression detection: the statistics on synthetic samples with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeq.report.regression import (
    Thresholds,
    compare_latency_samples,
    compare_results,
    integrated_autocorrelation_time,
    mann_whitney_greater,
    match_baselines,
    rank_average,
)
from edgeq.report.results import ResultRecord
from edgeq.report.synthetic import flag_rate, synthetic_latency_run, synthetic_result
from edgeq.result import BenchResult

TRIALS = 200


def record(path: str = "r.json", **kwargs) -> ResultRecord:
    return ResultRecord(path=path, result=BenchResult.model_validate(synthetic_result(**kwargs)))


def test_rank_average_gives_ties_their_mean_rank():
    assert rank_average(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_mann_whitney_matches_the_textbook_normal_approximation():
    # U = 25 of 25 pairs; mu = 12.5, sigma = sqrt(5*5*11/12); z = (25 - 12.5 - 0.5) / sigma.
    x, y = np.arange(6.0, 11.0), np.arange(1.0, 6.0)
    expected = 0.5 * math.erfc((12.0 / math.sqrt(25 * 11 / 12)) / math.sqrt(2))
    assert mann_whitney_greater(x, y) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.00609, abs=1e-4)
    assert mann_whitney_greater(y, x) > 0.99


def test_mann_whitney_with_only_ties_says_nothing():
    same = np.full(20, 2.0)
    assert mann_whitney_greater(same, same) >= 0.5


def test_autocorrelation_time_is_near_one_for_independent_samples_and_larger_for_ar1():
    rng = np.random.default_rng(3)
    iid = rng.normal(size=4000)
    assert integrated_autocorrelation_time(iid) < 1.3
    ar = synthetic_latency_run(rng, 4000, autocorrelation=0.6, spike_rate=0.0, run_jitter=0.0)
    assert 2.5 < integrated_autocorrelation_time(ar) < 5.5  # (1 + 0.6) / (1 - 0.6) = 4


def _flag_rate(slowdown: float, n: int, run_jitter: float, seed: int) -> float:
    return flag_rate(lambda current, baseline, thresholds:
                     compare_latency_samples(current, baseline, thresholds).status == "regressed",
                     n=n, run_jitter=run_jitter, slowdown=slowdown, trials=TRIALS, seed=seed)


@pytest.mark.parametrize("n, run_jitter", [(200, 0.01), (200, 0.02), (1000, 0.015), (30, 0.015)])
def test_two_runs_of_the_same_artifact_flag_nothing_at_least_95_percent_of_the_time(n, run_jitter):
    assert _flag_rate(0.0, n, run_jitter, seed=11) <= 0.05


@pytest.mark.parametrize("n, run_jitter, min_rate",
                         [(200, 0.01, 0.95), (200, 0.02, 0.95), (1000, 0.015, 0.95), (30, 0.015, 0.90)])
def test_a_20_percent_slowdown_is_flagged(n, run_jitter, min_rate):
    assert _flag_rate(0.20, n, run_jitter, seed=12) >= min_rate


def test_a_plain_test_would_flag_a_1_percent_shift_but_the_margin_does_not():
    rng = np.random.default_rng(5)
    baseline = synthetic_latency_run(rng, 5000, run_jitter=0.0)
    current = synthetic_latency_run(rng, 5000, run_jitter=0.0, slowdown=0.01)
    assert mann_whitney_greater(current, baseline) < 1e-3  # "significant", but 1 % does not matter
    assert compare_latency_samples(current, baseline, Thresholds()).status == "unchanged"


def test_a_speedup_is_reported_as_an_improvement_not_a_regression():
    rng = np.random.default_rng(6)
    baseline = synthetic_latency_run(rng, 300)
    current = synthetic_latency_run(rng, 300, slowdown=-0.3)
    verdict = compare_latency_samples(current, baseline, Thresholds())
    assert verdict.status == "improved" and verdict.change < -0.2


def test_accuracy_and_energy_thresholds():
    samples = np.full(50, 2.0)
    base = record(samples=samples, top1=0.950, energy_j=0.010)
    verdicts = {v.metric: v for v in compare_results(
        record(samples=samples, top1=0.940, energy_j=0.0115), base, Thresholds())}
    assert verdicts["accuracy"].status == "regressed"
    assert verdicts["accuracy"].change == pytest.approx(-0.01)
    assert verdicts["energy"].status == "regressed"
    assert verdicts["latency"].status == "unchanged"
    verdicts = {v.metric: v for v in compare_results(
        record(samples=samples, top1=0.947, energy_j=0.0105), base, Thresholds())}
    assert verdicts["accuracy"].status == "unchanged"  # 0.3 points < 0.5
    assert verdicts["energy"].status == "unchanged"  # 5 % < 10 %


def test_missing_energy_is_not_compared_rather_than_treated_as_zero():
    samples = np.full(50, 2.0)
    verdicts = {v.metric: v for v in compare_results(
        record(samples=samples, energy_j=None), record(samples=samples, energy_j=0.01), Thresholds())}
    assert verdicts["energy"].status == "not-compared"


def test_emulated_latency_and_energy_are_never_compared_but_accuracy_is():
    rng = np.random.default_rng(7)
    baseline = record(samples=synthetic_latency_run(rng, 300), top1=0.95, energy_j=0.010, emulated=True)
    slower = record(samples=synthetic_latency_run(rng, 300, slowdown=0.5), top1=0.90, energy_j=0.020,
                    emulated=True)
    verdicts = {v.metric: v for v in compare_results(slower, baseline, Thresholds())}
    assert verdicts["latency"].status == "not-compared" and "emulat" in verdicts["latency"].detail
    assert verdicts["energy"].status == "not-compared"
    assert verdicts["accuracy"].status == "regressed"


def test_baselines_match_by_artifact_id_then_by_model_format_precision():
    current = [record("a", artifact_id="aaaa"), record("b", artifact_id="new-id", fmt="onnx"),
               record("c", target="other", artifact_id="cccc")]
    base_same_id = record("base-a", artifact_id="aaaa")
    base_rebuilt = record("base-b", artifact_id="old-id", fmt="onnx")
    base_gone = record("base-gone", model="retired")
    matches, unmatched = match_baselines(current, [base_same_id, base_rebuilt, base_gone])
    assert matches == [base_same_id, base_rebuilt, None]
    assert unmatched == [base_gone]
