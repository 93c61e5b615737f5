"""What a tune leaves in ``DIR``: ``tune.json`` (every candidate, every number), ``tune.md`` (the table) and
``tune.html`` (the table and the accuracy-vs-latency plot with the Pareto front and the chosen point)."""

from __future__ import annotations

import json

from edgeq.files import write_text_atomic
from edgeq.report.svg import PALETTE, ScatterPoint, esc, scatter_chart
from edgeq.tune.budget import SCORING_VERSION
from edgeq.tune.candidates import Candidate

TUNE_SCHEMA_VERSION = 1
COLUMNS = ("candidate", "stage", "format", "precision", "scheme", "float layers", "host metric", "pass",
           "p50 ms", "p90 ms", "mJ/inf", "size KiB", "pareto", "s")


def _cell(value, spec: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}"


def row(c: Candidate) -> list[str]:
    """One candidate as table cells (the CLI prints the same cells)."""
    if c.score is not None:
        metric = c.score.summary() + (" (held out)" if c.scored_on else "")
    elif c.rejected_by == "screen" and c.screen is not None:
        metric = f"screen: {c.screen.summary()}"
    else:
        metric = f"error: {c.error}" if c.error else "-"
    status = "chosen" if c.chosen else "yes" if c.passed else "no"
    energy = c.bench.get("energy_j_per_inference")
    return [c.id, c.stage, c.format, c.precision, c.scheme, str(len(c.float_nodes)) if c.float_nodes else "-",
            metric, status, _cell(c.bench.get("p50_ms"), ".4f"), _cell(c.bench.get("p90_ms"), ".4f"),
            _cell(energy * 1000 if energy is not None else None, ".4f"),
            _cell(c.size_bytes / 1024 if c.size_bytes is not None else None, ".1f"),
            "yes" if c.pareto else "", f"{c.seconds:.1f}"]


def to_json(result) -> dict:
    return {
        "schema_version": TUNE_SCHEMA_VERSION, "scoring_version": SCORING_VERSION, "target": result.target,
        "profile": result.profile,
        "objective": result.objective, "budget": result.budget.to_json(),
        "chosen": result.chosen.id if result.chosen else None,
        "chosen_dir": str(result.chosen_dir) if result.chosen_dir else None, "reason": result.reason,
        "device_accuracy": result.device_accuracy, "notes": result.notes,
        "fp32_reference_from_cache": result.reference_cached, "seconds": round(result.seconds, 3),
        "candidates": [c.to_json() for c in result.candidates],
    }


def markdown(result) -> str:
    lines = [f"# edgeq tune: {result.target} (profile {result.profile})", "",
             f"Budget: {result.budget.describe()}. Objective: {result.objective}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row(c)) + " |" for c in result.candidates]
    lines += ["", f"**Chosen:** {result.reason}"] + [f"- note: {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def _chart(result) -> str:
    colors = {fmt: PALETTE[i % len(PALETTE)] for i, fmt in enumerate(dict.fromkeys(c.format for c in result.candidates))}
    budget = result.budget
    scale = 100 if budget.max_accuracy_drop is not None else 1
    points = [ScatterPoint(c.id, c.bench["p50_ms"], c.score.metric() * scale, colors[c.format], c.id,
                           highlight=c.chosen)
              for c in result.candidates if c.score is not None and c.bench.get("p50_ms") is not None]
    if not points:
        return "<p>No candidate was measured on the device.</p>"
    if budget.gates:
        gate = budget.gates[0]
        label = f"{'' if gate.op == '>=' else '- '}{gate.metric}{'.' + gate.field if gate.field else ''}"
    else:
        label = "- top-1 drop (points)" if scale == 100 else "output cosine (mean, worst output)"
    return scatter_chart(points, "median latency on the device (ms)", label,
                         f"tune on {result.target}: host metric against device latency")


def html(result) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in COLUMNS)
    body = "".join("<tr" + (' class="chosen"' if c.chosen else "") + ">" + "".join(f"<td>{esc(v)}</td>" for v in row(c))
                   + "</tr>" for c in result.candidates)
    notes = "".join(f"<li>{esc(n)}</li>" for n in result.notes)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edgeq tune: {esc(result.target)}</title>
<style>body{{font:14px sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:3px 6px;text-align:left}}tr.chosen{{background:#e6f4ea;font-weight:bold}}.grid{{stroke:#eee}}
.axis{{stroke:#333}}.pareto-front{{fill:none;stroke:#111}}.tick,.point-label{{font-size:11px}}</style></head>
<body><h1>edgeq tune: {esc(result.target)} (profile {esc(result.profile)})</h1>
<p>Budget: {esc(result.budget.describe())}. Objective: {esc(result.objective)}.
Took {result.seconds:.1f} s.</p>
<p><b>Chosen:</b> {esc(result.reason)}</p><ul>{notes}</ul>
{_chart(result)}
<table><tr>{head}</tr>{body}</table>
</body></html>
"""


def write_outputs(result) -> None:
    write_text_atomic(result.output / "tune.json", json.dumps(to_json(result), indent=1, allow_nan=False) + "\n")
    write_text_atomic(result.output / "tune.md", markdown(result))
    write_text_atomic(result.output / "tune.html", html(result))
