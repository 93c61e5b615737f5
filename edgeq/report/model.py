"""The report as data: one row per target x artifact, with baseline verdicts and problems.

Every renderer (HTML, Markdown, CSV, JSON, JUnit) reads this and nothing else, so they agree.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

from edgeq.report.regression import Thresholds, Verdict, compare_results, match_baselines
from edgeq.report.results import BrokenInput, LoadedResults, ResultRecord

#: Exit status of ``edgeq report`` / ``edgeq lab run`` when the report was written but something regressed
#: or failed (1 is an error that stopped edgeq, 2 a usage error).
EXIT_REGRESSION = 3

# Columns of the flat row (CSV, JSON), in order.
COLUMNS = [
    "target", "status", "failure_kind", "verdict", "problems", "model", "format", "precision", "profile", "artifact_id",
    "size_bytes", "validation_status", "device", "arch", "emulated", "runtime", "ran", "p50_ms", "p90_ms", "p99_ms",
    "mean_ms", "cv", "samples", "throughput_ips", "top1", "top1_reference", "top1_drop", "energy_mj",
    "inferences_per_j", "power_sensor", "power_note", "peak_rss_mb", "model_load_delta_mb", "started_at",
    "duration_s", "baseline_file", "latency_verdict", "latency_change", "latency_p", "accuracy_verdict",
    "accuracy_change", "energy_verdict", "energy_change", "error", "file",
]


@dataclass
class Row:
    """One target x artifact: a result (or an unreadable result file), its baseline and its verdicts."""

    record: ResultRecord | None
    broken: BrokenInput | None = None
    baseline: ResultRecord | None = None
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def target(self) -> str:
        if self.record is not None:
            return self.record.target
        # Bench names its files <target>__<artifact-id>.json: the best guess for an unreadable one.
        stem = self.broken.path.stem if self.broken else "?"
        return stem.split("__")[0] if "__" in stem else "(unreadable)"

    @property
    def label(self) -> str:
        if self.record is not None:
            return self.record.label
        return self.broken.path.name if self.broken else "?"

    @property
    def status(self) -> str:
        """ok, failed (the run failed) or broken (the result file could not be read)."""
        if self.record is None:
            return "broken"
        return self.record.result.status

    @property
    def regressions(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.regressed]

    @property
    def gate_failed(self) -> bool:
        return self.record is not None and self.record.gate_failed

    @property
    def emulated(self) -> bool:
        return self.record is not None and self.record.emulated

    @property
    def marks(self) -> list[str]:
        """What a reader must notice, most serious first: ``unreadable`` or ``failed`` alone, else any of
        ``regressed``, ``gate`` and ``emulated``; empty when all is well. Renderers pick the symbols."""
        if self.status == "broken":
            return ["unreadable"]
        if self.status == "failed":
            return ["failed"]
        return [mark for mark, on in (("regressed", bool(self.regressions)), ("gate", self.gate_failed),
                                      ("emulated", self.emulated)) if on]

    def problems(self) -> list[str]:
        """Why this row fails the report, one short line each (empty when it passes)."""
        if self.broken is not None:
            return [f"unreadable result {self.broken.path}: {self.broken.error}"]
        problems = []
        result = self.record.result
        if result.status == "failed":
            kind = f" ({result.failure.kind})" if result.failure else ""
            problems.append(f"run failed{kind}: {result.error or 'no error message'}")
        if self.gate_failed:
            problems.append("accuracy gate failed at conversion")
        problems.extend(f"{v.metric} regressed: {v.detail}" for v in self.regressions)
        return problems

    @property
    def passed(self) -> bool:
        return not self.problems()

    def verdict(self, metric: str) -> Verdict | None:
        return next((v for v in self.verdicts if v.metric == metric), None)

    def flat(self) -> dict[str, Any]:
        """The row as one flat dict with the keys of COLUMNS (None where unknown)."""
        row: dict[str, Any] = dict.fromkeys(COLUMNS)
        row.update(target=self.target, status=self.status, verdict="pass" if self.passed else "fail",
                   problems="; ".join(self.problems()) or None)
        if self.broken is not None:
            row.update(error=self.broken.error, file=str(self.broken.path))
            return row
        result = self.record.result
        artifact = result.artifact
        env = result.env
        row.update(
            model=artifact.display_name, format=artifact.format, precision=artifact.precision,
            profile=artifact.profile, artifact_id=artifact.id, size_bytes=artifact.size_bytes,
            validation_status=artifact.validation_status, device=env.get("cpu_model"), arch=env.get("arch"),
            emulated=bool(env.get("emulated")) if "emulated" in env else None,
            runtime=_runtime(result), ran=what_ran(result.runtime.execution if result.runtime else None),
            started_at=result.started_at, duration_s=result.duration_s,
            error=result.error, file=str(self.record.path), throughput_ips=result.throughput_ips,
            failure_kind=result.failure.kind if result.failure else None,
        )
        if result.latency_ms is not None:
            lat = result.latency_ms
            row.update(p50_ms=lat.p50, p90_ms=lat.p90, p99_ms=lat.p99, mean_ms=lat.mean, cv=lat.cv,
                       samples=lat.count if lat.count is not None else len(lat.samples) or None)
        if result.accuracy is not None:
            row.update(top1=result.accuracy.top1, top1_reference=result.accuracy.top1_reference,
                       top1_drop=result.accuracy.top1_drop)
        energy = result.energy_j_per_inference
        if energy is not None:
            row.update(energy_mj=energy * 1e3, inferences_per_j=(1.0 / energy) if energy > 0 else None)
        if result.power is not None:
            row.update(power_sensor=result.power.sensor,
                       power_note=None if result.power.available else (result.power.reason or "no reason given"))
        if result.memory_mb is not None:
            row.update(peak_rss_mb=result.memory_mb.peak_rss, model_load_delta_mb=result.memory_mb.model_load_delta)
        if self.baseline is not None:
            row["baseline_file"] = str(self.baseline.path)
        for verdict in self.verdicts:
            row[f"{verdict.metric}_verdict"] = verdict.status
            row[f"{verdict.metric}_change"] = verdict.change
            if verdict.metric == "latency":
                row["latency_p"] = verdict.p_value
        return row

    def energy_note(self) -> str:
        """Why there is no energy number ("no sensor: <reason>"), or "" when there is one."""
        if self.record is None or self.record.result.energy_j_per_inference is not None:
            return ""
        power = self.record.result.power
        if power is None:
            return "no sensor: the result has no power section"
        if not power.available:
            return f"no sensor: {power.reason or power.sensor or 'not available'}"
        return "no energy: power was sampled but no energy was computed"


def _counts(counts: dict) -> str:
    return " ".join(f"{precision} {n}" for precision, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def what_ran(execution: Any) -> str | None:
    """One short line of what the runtime says it ran (the pinned precision read back), e.g.
    ``CPU f32 (layers f32 9 u8 4)``, ``CPUExecutionProvider``, ``xnnpack (2/9 nodes)``; None when the
    result does not say (older results, failed runs)."""
    if not isinstance(execution, dict):
        return None
    if "inference_precision" in execution or "execution_devices" in execution:  # OpenVINO
        devices = ",".join(str(d) for d in execution.get("execution_devices") or []) or str(execution.get("device"))
        text = f"{devices} {execution.get('inference_precision') or 'precision unknown'}"
        layers = execution.get("layer_precisions")
        if isinstance(layers, dict) and isinstance(layers.get("runtime"), dict):
            text += f" (layers {_counts(layers['runtime'])})"
        return text
    if "providers_used" in execution:  # ONNX Runtime
        return ",".join(str(p) for p in execution.get("providers_used") or []) or None
    delegate = execution.get("delegate")
    if isinstance(delegate, dict):  # TFLite
        name = delegate.get("name") or "delegate unknown"
        if name == "none":
            return "builtin kernels (no delegate)"
        return f"{name} ({delegate.get('delegate_nodes')}/{delegate.get('nodes')} nodes)" \
            if delegate.get("nodes") else name
    return None


def _runtime(result) -> str | None:
    if result.runtime is None:
        return result.env.get("runtime")
    parts = [p for p in (result.runtime.name, result.runtime.version) if p]
    return " ".join(parts) or None


@dataclass
class Report:
    rows: list[Row]
    thresholds: Thresholds
    baseline_given: bool
    unmatched_baseline: list[ResultRecord]
    generated_at: str
    title: str = "edgeq report"
    inputs: list[str] = field(default_factory=list)
    baseline_inputs: list[str] = field(default_factory=list)
    baseline_broken: list[BrokenInput] = field(default_factory=list)
    """Unreadable baseline files: warned about, not a failure of this run."""

    @property
    def failed_rows(self) -> list[Row]:
        return [row for row in self.rows if not row.passed]

    @property
    def passed(self) -> bool:
        return not self.failed_rows

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else EXIT_REGRESSION

    def counts(self) -> dict[str, int]:
        return {
            "results": len(self.rows),
            "failed_runs": sum(row.status == "failed" for row in self.rows),
            "unreadable": sum(row.status == "broken" for row in self.rows),
            "gate_failures": sum(row.gate_failed for row in self.rows),
            "regressions": sum(len(row.regressions) for row in self.rows),
            "improvements": sum(v.status == "improved" for row in self.rows for v in row.verdicts),
            "emulated": sum(row.emulated for row in self.rows),
        }

    def headline(self) -> str:
        """One line: PASS/FAIL and what went wrong."""
        c = self.counts()
        parts = []
        for key, word in (("regressions", "regression(s)"), ("failed_runs", "failed run(s)"),
                          ("gate_failures", "accuracy-gate failure(s)"), ("unreadable", "unreadable result(s)")):
            if c[key]:
                parts.append(f"{c[key]} {word}")
        what = ", ".join(parts) if parts else "no regressions or failures"
        baseline = "" if self.baseline_given else " (no baseline)"
        return f"{'PASS' if self.passed else 'FAIL'}: {what} in {c['results']} result(s){baseline}"

    def problem_lines(self, *, unreadable: bool = True) -> list[str]:
        """``target model-format-precision: problem`` for every problem, in row order; ``unreadable=False``
        leaves out the rows whose result file could not be read (the CLI names those on its own)."""
        return [f"{row.target} {row.label}: {problem}" for row in self.rows
                if unreadable or row.status != "broken" for problem in row.problems()]

    def targets(self) -> list[str]:
        return list(dict.fromkeys(row.target for row in self.rows))


def _sort_key(row: Row) -> tuple:
    return (row.target, row.label, row.record.result.artifact.id or "" if row.record else "")


def build_report(results: LoadedResults, baseline: LoadedResults | None = None,
                 thresholds: Thresholds | None = None, *, title: str = "edgeq report",
                 inputs: list[str] | None = None, baseline_inputs: list[str] | None = None) -> Report:
    """Compare every result with its baseline (when given) and collect the rows of the report."""
    thresholds = thresholds or Thresholds()
    records = list(results.records)
    rows: list[Row] = []
    unmatched: list[ResultRecord] = []
    if baseline is not None:
        matches, unmatched = match_baselines(records, baseline.records)
        for record, match in zip(records, matches, strict=True):
            verdicts = compare_results(record, match, thresholds) if match is not None else []
            rows.append(Row(record=record, baseline=match, verdicts=verdicts))
    else:
        rows = [Row(record=record) for record in records]
    rows.sort(key=_sort_key)
    rows.extend(Row(record=None, broken=broken) for broken in results.broken)
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    return Report(rows=rows, thresholds=thresholds, baseline_given=baseline is not None,
                  unmatched_baseline=unmatched, generated_at=now, title=title,
                  baseline_broken=list(baseline.broken) if baseline is not None else [],
                  inputs=[str(p) for p in inputs or []], baseline_inputs=[str(p) for p in baseline_inputs or []])
