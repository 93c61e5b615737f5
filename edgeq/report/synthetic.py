"""Synthetic latency samples with known answers, for testing and measuring regression detection.

A run's samples are ``median_ms * run_shift * (1 + slowdown) * exp(noise_t)`` where ``run_shift`` is the
run-to-run jitter (lognormal, ``run_jitter`` standard deviation on the log scale, e.g. 0.02 = ~2 %),
``noise_t`` is AR(1) on the log scale (per-inference samples are autocorrelated) with a ``spread`` marginal
standard deviation, and a small share of samples are spikes (interrupts, page faults) 1.5-3x slower.
"""

from __future__ import annotations

import numpy as np

from edgeq.result import RESULT_SCHEMA_VERSION


def synthetic_latency_run(rng: np.random.Generator, n: int, *, median_ms: float = 5.0, slowdown: float = 0.0,
                          run_jitter: float = 0.015, spread: float = 0.08, autocorrelation: float = 0.6,
                          spike_rate: float = 0.01) -> np.ndarray:
    """One run of ``n`` per-inference latencies in ms, in measurement order."""
    shift = float(np.exp(rng.normal(0.0, run_jitter))) * (1.0 + slowdown)
    innovations = rng.normal(0.0, spread * np.sqrt(1.0 - autocorrelation**2), size=n)
    noise = np.empty(n)
    previous = rng.normal(0.0, spread)
    for i in range(n):
        previous = autocorrelation * previous + innovations[i]
        noise[i] = previous
    spikes = np.where(rng.random(n) < spike_rate, rng.uniform(1.5, 3.0, size=n), 1.0)
    # Timers have finite resolution: round to 1 us, which also exercises the tie correction.
    return np.round(median_ms * shift * np.exp(noise) * spikes, 3)


def flag_rate(rule, *, n: int, run_jitter: float, slowdown: float, trials: int, seed: int) -> float:
    """Share of ``trials`` seeded pairs of synthetic runs (baseline, then one ``slowdown`` slower) that
    ``rule(current, baseline, thresholds)`` flags, with the default thresholds."""
    from edgeq.report.regression import Thresholds

    rng = np.random.default_rng(seed)
    thresholds = Thresholds()
    flagged = 0
    for _ in range(trials):
        baseline = synthetic_latency_run(rng, n, run_jitter=run_jitter)
        current = synthetic_latency_run(rng, n, run_jitter=run_jitter, slowdown=slowdown)
        flagged += bool(rule(current, baseline, thresholds))
    return flagged / trials


def synthetic_result(target: str = "local", *, model: str = "digits", fmt: str = "tflite", precision: str = "int8",
                     artifact_id: str = "0123456789abcdef", samples: np.ndarray | list[float] | None = None,
                     top1: float | None = 0.95, top1_reference: float | None = 0.96,
                     energy_j: float | None = None, status: str = "ok", error: str | None = None,
                     validation_status: str = "passed", emulated: bool = False, failure_kind: str = "remote",
                     started_at: str = "2024-01-01T02:00:00+00:00") -> dict:
    """A result file (as a dict, current schema) with the given properties; statistics computed from
    ``samples``. A failed one fails with ``failure_kind``."""
    failure = ({"kind": failure_kind, "message": error or "no error message", "host": target}
               if status != "ok" else None)
    result: dict = {
        "schema_version": RESULT_SCHEMA_VERSION, "target": target, "status": status, "error": error,
        "failure": failure, "started_at": started_at, "duration_s": 1.5,
        "artifact": {"id": artifact_id, "name": model, "source_path": f"models/{model}.keras", "format": fmt,
                     "precision": precision,
                     "profile": "x86-avx2", "size_bytes": 24_576, "source_sha256": "ab" * 32,
                     "validation_status": validation_status},
        "env": {"arch": "x86_64", "cpu_model": "Synthetic CPU", "cpu_count": 2, "governor": "performance",
                "freq_mhz": 2400, "temperatures_c": {}, "throttling": None, "os": "Debian 12",
                "kernel": "6.1", "python": "3.11", "runtime": "litert", "runtime_version": "2.3",
                "emulated": emulated},
        "runtime": {"name": "litert", "version": "2.3", "execution": {"threads": 2}},
        "settings": {"warmup": 5, "runs": 100, "min_seconds": 0, "threads": 2, "power": "auto"},
        "load_ms": None, "first_inference_ms": None, "latency_ms": None, "throughput_ips": None,
        "accuracy": None, "memory_mb": None, "power": {"available": False, "sensor": "none",
                                                       "reason": "profile has no power sensor"},
        "energy_j_per_inference": None,
    }
    if status != "ok":
        return result
    values = np.asarray(samples if samples is not None else np.full(50, 2.0), dtype=np.float64)
    p50, p90, p95, p99 = (float(v) for v in np.percentile(values, [50, 90, 95, 99]))
    mean, std = float(values.mean()), float(values.std())
    result.update(
        load_ms=12.0, first_inference_ms=3.0,
        latency_ms={"p50": p50, "p90": p90, "p95": p95, "p99": p99, "mean": mean, "std": std,
                    "cv": std / mean if mean else None, "min": float(values.min()), "max": float(values.max()),
                    "count": int(len(values)), "samples": [float(v) for v in values]},
        throughput_ips=1000.0 / mean if mean else None,
        memory_mb={"baseline_rss": 40.0, "after_load_rss": 45.0, "peak_rss": 47.5, "model_load_delta": 5.0},
    )
    if top1 is not None:
        result["accuracy"] = {"samples": 450, "top1": top1, "top5": 1.0, "top1_reference": top1_reference,
                              "top1_drop": None if top1_reference is None else top1_reference - top1,
                              "agreement": {"top1_agreement": 0.99, "cosine_similarity": 0.999,
                                            "max_abs_error": 0.01}}
    if energy_j is not None:
        result["power"] = {"available": True, "sensor": "rapl", "idle_w": 3.0, "avg_w": 9.0, "active_w": 6.0,
                           "samples": 200, "sample_rate_hz": 50.0}
        result["energy_j_per_inference"] = energy_j
    return result
