"""The device's say: every candidate that met the budget is benchmarked on the target through the ordinary
bench path, the best by the objective is chosen and copied to ``DIR/chosen``, then benchmarked once more with
the eval data, so the chosen artifact's accuracy is measured on the device too."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from edgeq.bench import bench
from edgeq.manifest import verify_artifact
from edgeq.targets import Target
from edgeq.tune.candidates import Candidate

log = logging.getLogger(__name__)


def _objective_value(candidate: Candidate, objective: str) -> float | None:
    if objective == "size":
        return candidate.size_bytes
    if objective == "energy":
        return candidate.bench.get("energy_j_per_inference")
    return candidate.bench.get("p50_ms")


def _bench_one(candidate: Candidate, target: Target, output: Path, runs: int, min_seconds: float) -> None:
    run = bench(candidate.directory, target, runs=runs, min_seconds=min_seconds, output_dir=output / "bench")
    result = run.result
    candidate.bench = {"status": result.status, "result": str(run.path)}
    if run.ok and result.latency_ms is not None:
        candidate.bench.update(p50_ms=result.latency_ms.p50, p90_ms=result.latency_ms.p90,
                               energy_j_per_inference=result.energy_j_per_inference,
                               emulated=bool(result.env.get("emulated")))
        if result.power is not None and not result.power.available:
            candidate.bench["no_energy_because"] = f"{result.power.sensor}: {result.power.reason}"
    elif result.failure is not None:
        candidate.bench["error"] = result.failure.message
        candidate.bench["failure_kind"] = result.failure.kind


def choose(result, target: Target, eval_path: Path, *, runs: int, min_seconds: float, progress) -> None:
    """Benchmark the passing candidates on ``target`` and fill in ``result.chosen``, ``chosen_dir``, ``reason``."""
    passing = [c for c in result.candidates if c.passed]
    progress.stage(f"device: bench on {target.name}", total=len(passing))
    for candidate in passing:
        progress.step(candidate.id)
        _bench_one(candidate, target, result.output, runs, min_seconds)
    no_energy = next((c.bench["no_energy_because"] for c in passing if c.bench.get("no_energy_because")), None)
    if no_energy:
        result.notes.append(f"no energy figures from {target.name}: {no_energy}")
    measured = [c for c in passing if _objective_value(c, result.objective) is not None]
    objective = result.objective
    if not measured and objective == "energy":
        result.notes.append("no energy figure from the device's sensor: chose by p50 latency instead")
        objective = "latency"
        measured = [c for c in passing if _objective_value(c, objective) is not None]
    if not measured:
        failed = [c.bench.get("error") for c in passing if c.bench.get("error")]
        result.reason = ("no candidate could be measured on the device" + (f": {failed[0]}" if failed else "")
                         if passing else "no candidate met the budget, not even fp32 (see the table)")
        return
    best = min(measured, key=lambda c: (_objective_value(c, objective), c.size_bytes or 0))
    best.chosen = True
    result.chosen = best
    result.reason = _reason(best, result, objective)
    chosen_dir = result.output / "chosen"
    shutil.copytree(best.directory, chosen_dir)
    verify_artifact(chosen_dir)  # the copy is the artifact it was, file for file
    result.chosen_dir = chosen_dir
    progress.stage("device: accuracy of the chosen artifact", total=1)
    progress.step(best.id)
    # The budget's metrics too (a gate's metric, --metric), computed from the device's outputs.
    run = bench(chosen_dir, target, eval_path=eval_path, runs=runs, min_seconds=min_seconds,
                output_dir=result.output / "bench-chosen", metrics=list(result.budget.metrics))
    if run.ok and run.result.accuracy is not None:
        result.device_accuracy = run.result.accuracy.model_dump(mode="json")
    elif not run.ok:
        result.notes.append(f"accuracy on the device not measured: {run.result.error}")


def _reason(best: Candidate, result, objective: str) -> str:
    unit = {"latency": f"p50 {best.bench.get('p50_ms'):.4f} ms", "size": f"{best.size_bytes} bytes",
            "energy": f"{best.bench.get('energy_j_per_inference')} J/inference"}[objective]
    text = f"{best.id}: best {objective} ({unit}) among {sum(c.passed for c in result.candidates)} " \
           f"candidates that met the budget ({result.budget.describe()})"
    quantized = [c for c in result.candidates if c.quantized and c.measured is not None]
    if not best.quantized and quantized and not any(c.passed for c in quantized):
        closest = max(quantized, key=lambda c: c.measured.metric())
        text += f"; no quantized candidate met it (closest: {closest.id}, {closest.measured.summary()})"
        # Post-training quantization lost too much: training can win it back (unless tune --train tried it).
        if result.source_kind in ("keras", "pytorch") and not any(c.scheme == "qat" for c in result.candidates):
            text += "; `edgeq qat` (or tune --train) fine-tunes the model with simulated int8 rounding to recover it"
    return text


def mark_pareto(candidates: list[Candidate]) -> None:
    """Flag the candidates no other one beats on both host metric (higher) and device p50 (lower)."""
    points = [c for c in candidates if c.score is not None and c.bench.get("p50_ms") is not None]
    for c in points:
        c.pareto = not any(
            o is not c and o.score.metric() >= c.score.metric() and o.bench["p50_ms"] <= c.bench["p50_ms"]
            and (o.score.metric() > c.score.metric() or o.bench["p50_ms"] < c.bench["p50_ms"]) for o in points)
