#!/usr/bin/env python3
"""False-positive and detection rates of edgeq's latency regression test, on synthetic samples.

Each trial draws a baseline run and a current run (see ``edgeq.report.synthetic``: lognormal latencies,
AR(1)-autocorrelated per-inference noise with an 8 % spread, 1 % spikes, and a run-to-run shift with the
given jitter) and asks ``compare_latency_samples`` for a verdict with the default thresholds (5 % margin,
alpha 0.05). "flagged" is the share of trials reported as a regression: at slowdown 0 it is the false-positive
rate, at 20 % the detection rate. A second table shows what a plain Mann-Whitney test plus the same 5 %
median floor (no margin in the test) would flag, for comparison.

Usage: python benchmarks/bench_regression.py [--trials 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeq.report.regression import (  # noqa: E402
    Thresholds,
    compare_latency_samples,
    integrated_autocorrelation_time,
    mann_whitney_greater,
)
from edgeq.report.synthetic import flag_rate  # noqa: E402

SAMPLE_COUNTS = (10, 30, 200, 1000)
JITTERS = (0.0, 0.01, 0.02, 0.03)
SLOWDOWNS = (0.0, 0.05, 0.10, 0.20)


def edgeq_rule(current, baseline, thresholds) -> bool:
    return compare_latency_samples(current, baseline, thresholds).status == "regressed"


def plain_rule(current, baseline, thresholds) -> bool:
    """A plain one-sided test (autocorrelation-aware) plus a median floor, without the margin in the test."""
    ratio = float(np.median(current) / np.median(baseline))
    p = mann_whitney_greater(current, baseline, integrated_autocorrelation_time(current),
                             integrated_autocorrelation_time(baseline))
    return ratio >= 1 + thresholds.min_effect and p < thresholds.alpha


def table(rule, title: str, trials: int, seed: int) -> None:
    print(f"\n{title}")
    header = "| samples/run | run-to-run jitter | " + " | ".join(f"slowdown {s:.0%}" for s in SLOWDOWNS) + " |"
    print(header)
    print("|" + "---|" * (2 + len(SLOWDOWNS)))
    for n in SAMPLE_COUNTS:
        for jitter in JITTERS:
            cells = [f"{flag_rate(rule, n=n, run_jitter=jitter, slowdown=s, trials=trials, seed=seed + i):.1%}" for i, s in enumerate(SLOWDOWNS)]
            print(f"| {n} | {jitter:.0%} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-plain", action="store_true", help="only the edgeq rule")
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"share of {args.trials} seeded trials flagged as a latency regression (default thresholds: "
          f"{Thresholds().min_effect:.0%} margin, alpha {Thresholds().alpha})")
    table(edgeq_rule, "edgeq: one-sided Mann-Whitney against a 5 % margin (the shipped rule)", args.trials, args.seed)
    if not args.skip_plain:
        table(plain_rule, "for comparison: plain Mann-Whitney p < 0.05 and median ratio >= 1.05",
              args.trials, args.seed)
    print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
