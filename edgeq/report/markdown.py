"""The Markdown summary: short enough for a pull-request comment."""

from __future__ import annotations

from edgeq.report.model import Report, Row

MAX_PROBLEMS = 30


def _cell(value) -> str:
    """One table cell: pipes and newlines would break the table; HTML in results must not render."""
    text = str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")
    return text.replace("<", "&lt;")


def _num(value, fmt: str, suffix: str = "") -> str:
    return "–" if value is None else f"{format(value, fmt)}{suffix}"


_MARKS = {"unreadable": "❌ unreadable", "failed": "❌ failed", "regressed": "🔺 regressed", "gate": "❌ gate",
          "emulated": "⚠️ emulated"}


def _mark(row: Row) -> str:
    return ", ".join(_MARKS[m] for m in row.marks) or "✅"


def _baseline(row: Row) -> str:
    parts = []
    for verdict in row.verdicts:
        if verdict.change is None:
            continue
        if verdict.metric == "accuracy":
            text = f"top-1 {verdict.change * 100:+.2f} pt"
        else:
            text = f"{'lat' if verdict.metric == 'latency' else 'energy'} {verdict.change:+.1%}"
        if verdict.status == "regressed":
            text = f"**{text}**"
        parts.append(text)
    return ", ".join(parts) or ("–" if row.baseline is None else "not compared")


def render_markdown(report: Report) -> str:
    """Headline, one table row per target x artifact, then the problems (capped)."""
    lines = [f"### {report.title}: {report.headline()}", ""]
    if report.counts()["emulated"]:
        lines += ["> ⚠️ Some results ran under emulation: latency under emulation is meaningless.", ""]
    header = ["", "target", "model", "format", "precision", "ran", "p50 ms", "p99 ms", "inf/s", "top-1", "mJ/inf"]
    if report.baseline_given:
        header.append("vs baseline")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in report.rows:
        flat = row.flat()
        if row.record is None:
            cells = [_mark(row), row.target, row.label] + ["–"] * (len(header) - 3)
        else:
            energy = _num(flat["energy_mj"], ".3g") if flat["energy_mj"] is not None else "n/a"
            cells = [_mark(row), row.target, flat["model"], flat["format"], flat["precision"],
                     flat["ran"] or "not recorded", _num(flat["p50_ms"], ".3g"), _num(flat["p99_ms"], ".3g"), _num(flat["throughput_ips"], ".4g"),
                     _num(None if flat["top1"] is None else flat["top1"] * 100, ".2f", "%"), energy]
            if report.baseline_given:
                cells.append(_baseline(row))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    problems = report.problem_lines()
    if problems:
        lines += ["", "**Problems**", ""]
        lines += [f"- {_cell(line)}" for line in problems[:MAX_PROBLEMS]]
        if len(problems) > MAX_PROBLEMS:
            lines.append(f"- … and {len(problems) - MAX_PROBLEMS} more (see the HTML report)")
    if any(row.energy_note() for row in report.rows if row.status == "ok"):
        lines += ["", "n/a energy: no power sensor on that target (the HTML report gives the reason)."]
    return "\n".join(lines) + "\n"
