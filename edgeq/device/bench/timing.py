"""The timed loop (only the call between two clock reads) and its latency statistics."""

import time

import numpy as np

from ..errors import RunnerError

# The samples sent back are thinned to at most this many (every k-th, in time order), so that a fast model
# timed for long (8 s of a 10 us model is 800k samples) stays a result of a few hundred KiB that the
# controller downloads, not 17 MB it refuses. The statistics are computed over every sample before thinning.
MAX_SAMPLES_SENT = 20_000


def latency_stats(samples_ns):
    """Statistics (milliseconds) over per-inference samples in nanoseconds; percentiles interpolate linearly."""
    values = np.asarray(samples_ns, dtype=np.float64) / 1e6
    if values.size == 0:
        raise RunnerError("no timed inferences to summarize")
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    p50, p90, p95, p99 = (float(v) for v in np.percentile(values, [50, 90, 95, 99]))
    every = -(-values.size // MAX_SAMPLES_SENT)  # ceil: 1 up to MAX_SAMPLES_SENT samples
    return {"p50": p50, "p90": p90, "p95": p95, "p99": p99, "mean": mean, "std": std,
            "cv": std / mean if mean > 0 else None, "min": float(values.min()), "max": float(values.max()),
            "count": int(values.size), "samples_every": every,
            "samples": [round(float(v), 6) for v in values[::every]]}


def timed_loop(call, runs, min_seconds):
    """Run ``call`` until both ``runs`` calls and ``min_seconds`` of wall time are done.

    Only the call itself sits between the two clock reads; returns (samples in ns, wall ns of the loop).
    """
    clock = time.perf_counter_ns
    min_ns = int(float(min_seconds) * 1e9)
    runs = max(int(runs), 1)
    samples = []
    append = samples.append
    loop_start = clock()
    while True:
        t0 = clock()
        call()
        t1 = clock()
        append(t1 - t0)
        if len(samples) >= runs and t1 - loop_start >= min_ns:
            return samples, t1 - loop_start
