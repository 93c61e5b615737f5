"""Samples a power source on a thread and integrates energy over marked windows."""

import threading
import time

from .base import PowerUnavailable


class PowerSampler(object):
    """Samples a PowerSource on a thread every ``interval_s``; ``mark()`` takes a synchronous sample
    so measurement windows start and end exactly on a reading."""

    def __init__(self, source, interval_s):
        self.source = source
        self.interval_s = max(float(interval_s), 0.001)
        self.samples = []  # (monotonic seconds, watts or None, cumulative joules or None, from_thread)
        self.errors = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgeq-power", daemon=True)

    def _sample(self, from_thread):
        with self._lock:
            before = time.monotonic()
            try:
                watts, joules = self.source.read()
            except PowerUnavailable as exc:
                self.errors.append(str(exc))
                return None
            after = time.monotonic()
            stamp = (before + after) / 2.0
            self.samples.append((stamp, watts, joules, from_thread))
            return stamp

    def _loop(self):
        next_at = time.monotonic()
        while not self._stop.is_set():
            self._sample(True)
            next_at += self.interval_s
            now = time.monotonic()
            if next_at < now:  # a slow read: skip the missed ticks rather than bursting
                next_at = now + self.interval_s
            self._stop.wait(next_at - now)

    def start(self):
        self._thread.start()
        return self

    def mark(self):
        stamp = self._sample(False)
        if stamp is None:
            raise PowerUnavailable("power sensor read failed: %s" % self.errors[-1])
        return stamp

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def window(self, start, end):
        """Energy and statistics between two marks: counter delta where the source counts energy,
        else the trapezoid rule over the power readings."""
        with self._lock:
            inside = [s for s in self.samples if start <= s[0] <= end]
        duration = end - start
        out = {"duration_s": duration, "samples": sum(1 for s in inside if s[3]),
               "readings": len(inside)}
        counters = [(s[0], s[2]) for s in inside if s[2] is not None]
        powers = [(s[0], s[1]) for s in inside if s[1] is not None]
        integrated = None
        if len(powers) >= 2:
            integrated = 0.0
            for (t0, p0), (t1, p1) in zip(powers, powers[1:]):
                integrated += (t1 - t0) * (p0 + p1) / 2.0
        if len(counters) >= 2:
            out["energy_j"] = counters[-1][1] - counters[0][1]
            out["method"] = "counter"
            if integrated is not None:
                out["integrated_energy_j"] = integrated
        elif integrated is not None:
            out["energy_j"] = integrated
            out["method"] = "trapezoid"
        else:
            out["energy_j"] = None
            out["method"] = None
        if powers:
            values = [p for _, p in powers]
            out["min_w"], out["max_w"] = min(values), max(values)
        out["avg_w"] = out["energy_j"] / duration if out["energy_j"] is not None and duration > 0 else None
        return out


def summarize_power(sensor, source, sampler, idle, timed, inferences):
    """The result's ``power`` block and the energy per inference (J) from the idle and timed windows."""
    power = {"available": True, "sensor": sensor, "interval_ms": sampler.interval_s * 1000.0,
             "method": timed["method"], "idle_w": idle["avg_w"] if idle else None, "avg_w": timed["avg_w"],
             "active_w": None, "min_w": timed.get("min_w"), "max_w": timed.get("max_w"),
             "samples": timed["samples"], "idle_samples": idle["samples"] if idle else 0,
             "sample_rate_hz": timed["samples"] / timed["duration_s"] if timed["duration_s"] > 0 else None,
             "window_s": timed["duration_s"], "idle_window_s": idle["duration_s"] if idle else 0.0,
             "energy_j": timed["energy_j"], "active_energy_j_per_inference": None,
             "read_errors": len(sampler.errors)}
    power.update(source.describe())
    if "integrated_energy_j" in timed:
        power["integrated_energy_j"] = timed["integrated_energy_j"]
    if power["idle_w"] is not None and power["avg_w"] is not None:
        power["active_w"] = power["avg_w"] - power["idle_w"]
        power["active_energy_j_per_inference"] = power["active_w"] * timed["duration_s"] / inferences
    warnings = []
    if timed["samples"] < 10:
        warnings.append("only %d power samples in the timed window; raise --min-seconds for a steadier energy "
                        "figure" % timed["samples"])
    if sampler.errors:
        warnings.append("%d sensor reads failed, last: %s" % (len(sampler.errors), sampler.errors[-1]))
    if warnings:
        power["warnings"] = warnings
    energy = timed["energy_j"] / inferences if timed["energy_j"] is not None and inferences else None
    return power, energy
