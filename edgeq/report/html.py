"""The HTML report: one self-contained file (inline CSS and SVG, no script, no network).

The output is well-formed XML as well as HTML5, so it can be checked with any XML parser. Every string that
comes from a result file goes through ``esc``.
"""

from __future__ import annotations

from edgeq.report.model import Report, Row
from edgeq.report.svg import accuracy_latency_chart, energy_chart, esc, latency_chart, target_colors

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1b1b1b; }
h1 { font-size: 22px; margin: 0 0 4px 0; } h2 { font-size: 17px; margin: 28px 0 8px 0; }
.meta { color: #555; font-size: 12px; }
.banner { padding: 10px 14px; border-radius: 6px; margin: 12px 0; font-weight: 600; }
.banner.pass { background: #e6f4ea; border: 1px solid #34a853; }
.banner.fail { background: #fde8e8; border: 1px solid #d93025; }
.banner.emulated { background: #fff4d6; border: 1px solid #e3a008; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f3f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fde8e8; } tr.gate td { background: #fff0e0; } tr.regressed td { background: #fdeaea; }
.mark { font-weight: 700; white-space: nowrap; }
.mark.fail, .bad { color: #b3261e; } .mark.pass, .good { color: #1e7e34; } .warn { color: #9a6700; }
ul.problems li { margin: 2px 0; }
.chart { display: block; margin: 6px 0 18px 0; font-size: 11px; }
.chart .axis { stroke: #333; } .chart .grid { stroke: #e5e5e5; }
.chart .tick, .chart .value { fill: #444; } .chart .row-label { fill: #222; }
.chart .axis-label { fill: #222; font-size: 12px; }
.chart .baseline-marker { fill: none; stroke: #000; stroke-width: 1.3; }
.chart .latency-box.regressed .row-label, .chart .latency-box.regressed .value { fill: #b3261e; font-weight: 700; }
.chart .pareto-front { fill: none; stroke: #111; stroke-width: 1.5; stroke-dasharray: 5 3; }
.chart .point { stroke: #fff; stroke-width: 1; } .chart .point.pareto { stroke: #000; stroke-width: 2; }
.chart .point-label { fill: #111; font-size: 10px; }
.chart .no-sensor { fill: #777; font-style: italic; }
.chart .energy-bar.regressed { stroke: #b3261e; stroke-width: 2; }
.legend span { display: inline-block; margin-right: 14px; font-size: 12px; }
.legend i { display: inline-block; width: 11px; height: 11px; margin-right: 4px; vertical-align: -1px; }
details { margin: 4px 0; } code { font-size: 12px; }
"""


def _num(value, fmt: str, suffix: str = "") -> str:
    return "–" if value is None else f"{format(value, fmt)}{suffix}"


def _size(size: int | None) -> str:
    if size is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def _row_class(row: Row) -> str:
    if row.status != "ok":
        return "failed"
    if row.regressions:
        return "regressed"
    if row.gate_failed:
        return "gate"
    return ""


_MARKS = {"unreadable": ("fail", "✗ unreadable"), "failed": ("fail", "✗ failed"),
          "regressed": ("fail", "▲ regressed"), "gate": ("fail", "✗ gate"), "emulated": ("warn", "⚠ emulated")}


def _mark(row: Row) -> str:
    spans = [f'<span class="mark {_MARKS[m][0]}">{_MARKS[m][1]}</span>' for m in row.marks]
    return " ".join(spans) or '<span class="mark pass">✓</span>'


def _vs_baseline(row: Row) -> str:
    if row.record is None or not row.verdicts:
        return "–" if row.baseline is None else "not compared"
    parts = []
    for verdict in row.verdicts:
        if verdict.status == "not-compared" or verdict.change is None:
            continue
        if verdict.metric == "accuracy":
            change = f"top-1 {verdict.change * 100:+.2f} pt"
        else:
            change = f"{'lat' if verdict.metric == 'latency' else 'energy'} {verdict.change:+.1%}"
        css = {"regressed": "bad", "improved": "good"}.get(verdict.status, "")
        label = f" {verdict.status}" if verdict.status in ("regressed", "improved") else ""
        parts.append(f'<span class="{css}" title="{esc(verdict.detail)}">{esc(change)}{label}</span>')
    return "<br/>".join(parts) or "not compared"


def _device(row: Row) -> str:
    if row.record is None:
        return "–"
    env = row.record.result.env
    bits = [str(env[key]) for key in ("cpu_model", "arch") if env.get(key)]
    return esc(", ".join(bits) or "unknown")


def _summary_table(report: Report) -> list[str]:
    head = ["", "target", "device", "model", "format", "precision", "ran", "size", "p50 ms", "p99 ms",
            "inferences/s", "top-1", "drop vs FP32", "energy / inference", "inferences / J", "peak RSS", "vs baseline"]
    out = ['<table class="summary"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for row in report.rows:
        flat = row.flat()
        cells = [_mark(row), esc(row.target), _device(row)]
        if row.record is None:
            tds = "".join(f"<td>{c}</td>" for c in cells)
            out.append(f'<tr class="result failed">{tds}<td colspan="{len(head) - 3}" class="bad">'
                       f"{esc(row.broken)}</td></tr>")
            continue
        energy = (_num(flat["energy_mj"], ".4g", " mJ") if flat["energy_mj"] is not None
                  else f'<span class="warn">{esc(row.energy_note())}</span>')
        drop = flat["top1_drop"]
        cells += [
            esc(flat["model"]), esc(flat["format"]), esc(flat["precision"]), esc(flat["ran"] or "not recorded"),
            _size(flat["size_bytes"]),
            _num(flat["p50_ms"], ".4g"), _num(flat["p99_ms"], ".4g"), _num(flat["throughput_ips"], ".4g"),
            _num(None if flat["top1"] is None else flat["top1"] * 100, ".2f", " %"),
            _num(None if drop is None else drop * 100, ".2f", " pt"),
            energy, _num(flat["inferences_per_j"], ".4g"), _num(flat["peak_rss_mb"], ".1f", " MB"),
            _vs_baseline(row),
        ]
        numeric = {7, 8, 9, 10, 11, 12, 14, 15}
        tds = "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(cells))
        out.append(f'<tr class="result {_row_class(row)}">{tds}</tr>')
    out.append("</tbody></table>")
    return out


def _environment(report: Report) -> list[str]:
    out = []
    for target in report.targets():
        envs = [row.record.result.env for row in report.rows if row.target == target and row.record is not None]
        if not envs:
            continue
        env = envs[0]
        emulated = any(e.get("emulated") for e in envs)
        warn = (' <span class="mark warn">⚠ emulated: latency under emulation is meaningless</span>'
                if emulated else "")
        out.append(f'<details class="env" open="open"><summary><b>{esc(target)}</b>{warn}</summary>'
                   '<table class="env"><tbody>')
        for key, value in env.items():
            out.append(f"<tr><th>{esc(key)}</th><td><code>{esc(value)}</code></td></tr>")
        out.append("</tbody></table></details>")
    return out or ["<p>no environment recorded</p>"]


def _verdict_table(report: Report) -> list[str]:
    rows = [(row, v) for row in report.rows for v in row.verdicts]
    if not rows:
        return ["<p>no result matched a baseline result</p>"]
    out = ['<table class="verdicts"><thead><tr><th>target</th><th>artifact</th><th>metric</th><th>verdict</th>'
           "<th>detail</th></tr></thead><tbody>"]
    for row, verdict in rows:
        css = {"regressed": "bad", "improved": "good"}.get(verdict.status, "")
        out.append(f'<tr class="verdict {esc(verdict.status)}"><td>{esc(row.target)}</td><td>{esc(row.label)}</td>'
                   f'<td>{esc(verdict.metric)}</td><td class="{css}">{esc(verdict.status)}</td>'
                   f"<td>{esc(verdict.detail)}</td></tr>")
    out.append("</tbody></table>")
    return out


def render_html(report: Report) -> str:
    """The whole report as one HTML document."""
    colors = target_colors(report.targets())
    counts = report.counts()
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"/>',
             '<meta name="viewport" content="width=device-width, initial-scale=1"/>',
             f"<title>{esc(report.title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{esc(report.title)}</h1>",
             f'<p class="meta">generated {esc(report.generated_at)} from {esc(", ".join(report.inputs) or "-")}'
             + (f"; baseline {esc(', '.join(report.baseline_inputs))}" if report.baseline_given else "; no baseline")
             + f"; regression thresholds: latency margin {report.thresholds.min_effect:.0%} "
               f"(alpha {report.thresholds.alpha:g}), top-1 drop {report.thresholds.max_top1_drop * 100:.2g} pt, "
               f"energy +{report.thresholds.max_energy_increase:.0%}</p>",
             f'<div class="banner {"pass" if report.passed else "fail"}" id="verdict">{esc(report.headline())}</div>']
    if counts["emulated"]:
        parts.append('<div class="banner emulated" id="emulated">⚠ '
                     f"{counts['emulated']} result(s) ran under emulation (env.emulated: true): "
                     "latency under emulation is meaningless; use them for correctness only.</div>")
    problems = report.problem_lines()
    if problems:
        parts.append('<h2>Problems</h2><ul class="problems">'
                     + "".join(f'<li class="bad">{esc(line)}</li>' for line in problems) + "</ul>")
    if report.baseline_broken:
        parts.append('<p class="warn">unreadable baseline file(s), ignored: '
                     + esc("; ".join(str(b) for b in report.baseline_broken)) + "</p>")
    parts.append("<h2>Summary</h2>")
    parts += _summary_table(report)
    legend = "".join(f'<span><i style="background:{color}"></i>{esc(target)}</span>' for target, color in colors.items())
    parts.append(f'<h2>Latency distribution</h2><p class="meta">box: quartiles; thick line: median; whiskers: '
                 f'1st to 99th percentile; hollow diamond: baseline median</p><div class="legend">{legend}</div>')
    parts.append(latency_chart(report.rows, colors))
    parts.append('<h2>Accuracy against latency</h2><p class="meta">larger black-ringed points and the dashed '
                 "staircase: the Pareto front (no other result is both faster and more accurate)</p>")
    parts.append(accuracy_latency_chart(report.rows, colors))
    parts.append("<h2>Energy per inference</h2>")
    parts.append(energy_chart(report.rows, colors))
    if report.baseline_given:
        parts.append("<h2>Against the baseline</h2>")
        parts += _verdict_table(report)
        if report.unmatched_baseline:
            parts.append('<p class="warn">in the baseline but not in this run: '
                         + esc(", ".join(f"{b.target} {b.label}" for b in report.unmatched_baseline)) + "</p>")
    parts.append("<h2>Environment per target</h2>")
    parts += _environment(report)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
