"""CSV and JSON for other tools: the flat rows (and, in JSON, the full verdicts)."""

from __future__ import annotations

import csv
import io
import json
import math

from edgeq.report.model import COLUMNS, Report

REPORT_KIND = "edgeq-report"
REPORT_SCHEMA_VERSION = 1


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


def render_csv(report: Report) -> str:
    """One line per target x artifact with the columns of ``edgeq.report.model.COLUMNS``; empty = unknown."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in report.rows:
        flat = row.flat()
        writer.writerow([_csv_value(flat[column]) for column in COLUMNS])
    return buffer.getvalue()


def _finite(value):
    # JSON has no Infinity/NaN; a ratio against a zero baseline becomes null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def report_dict(report: Report) -> dict:
    """The report as plain data (what ``render_json`` writes)."""
    rows = []
    for row in report.rows:
        flat = {key: _finite(value) for key, value in row.flat().items()}
        flat["verdicts"] = [{k: _finite(v) for k, v in verdict.as_dict().items()} for verdict in row.verdicts]
        rows.append(flat)
    t = report.thresholds
    return {
        "kind": REPORT_KIND,
        "schema_version": REPORT_SCHEMA_VERSION,
        "title": report.title,
        "generated_at": report.generated_at,
        "status": "pass" if report.passed else "fail",
        "headline": report.headline(),
        "counts": report.counts(),
        "thresholds": {"min_effect": t.min_effect, "alpha": t.alpha, "max_top1_drop": t.max_top1_drop,
                       "max_energy_increase": t.max_energy_increase, "min_samples": t.min_samples},
        "inputs": report.inputs,
        "baseline": report.baseline_inputs if report.baseline_given else None,
        "problems": report.problem_lines(),
        "rows": rows,
        "unmatched_baseline": [{"target": b.target, "label": b.label, "artifact_id": b.result.artifact.id,
                                "file": str(b.path)} for b in report.unmatched_baseline],
    }


def render_json(report: Report) -> str:
    return json.dumps(report_dict(report), indent=2, allow_nan=False) + "\n"
