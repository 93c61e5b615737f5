"""Reports from bench results: loading, regression detection against a baseline, and renderers.

Typical use::

    from edgeq.report import create_report, write_reports
    report = create_report(["results/"], baseline=["history/2024-01-01T02-00-00/results"])
    write_reports(report, html="report.html", junit="junit.xml")
    sys.exit(report.exit_code)   # 0, or EXIT_REGRESSION (3) when anything regressed or failed
"""

from __future__ import annotations

from pathlib import Path

from edgeq.errors import ReportError
from edgeq.files import write_text_atomic
from edgeq.report.model import COLUMNS, EXIT_REGRESSION, Report, Row, build_report
from edgeq.report.regression import Thresholds, Verdict, compare_latency_samples, compare_results
from edgeq.report.results import BrokenInput, LoadedResults, ResultRecord, load_results
from edgeq.result import BenchResult

__all__ = [
    "COLUMNS", "EXIT_REGRESSION", "BrokenInput", "LoadedResults", "BenchResult", "Report", "ResultRecord", "Row",
    "Thresholds", "Verdict", "build_report", "compare_latency_samples", "compare_results", "create_report",
    "load_results", "render", "write_reports",
]

FORMATS = ("html", "markdown", "csv", "json", "junit")


def create_report(results: list[Path | str], baseline: list[Path | str] | None = None,
                  thresholds: Thresholds | None = None, *, title: str = "edgeq report") -> Report:
    """Load results (and a baseline, when given) and compare them; see ``edgeq.report.results`` for bad input."""
    loaded = load_results(list(results))
    baseline_loaded = load_results(list(baseline)) if baseline else None
    return build_report(loaded, baseline_loaded, thresholds, title=title, inputs=list(results),
                        baseline_inputs=list(baseline or []))


def render(report: Report, fmt: str) -> str:
    """The report in one format: html, markdown, csv, json or junit."""
    if fmt == "html":
        from edgeq.report.html import render_html
        return render_html(report)
    if fmt == "markdown":
        from edgeq.report.markdown import render_markdown
        return render_markdown(report)
    if fmt == "csv":
        from edgeq.report.tables import render_csv
        return render_csv(report)
    if fmt == "json":
        from edgeq.report.tables import render_json
        return render_json(report)
    if fmt == "junit":
        from edgeq.report.junit import render_junit
        return render_junit(report)
    raise ValueError(f"unknown report format {fmt!r} (one of {', '.join(FORMATS)})")


def write_reports(report: Report, **outputs: Path | str | None) -> dict[str, Path]:
    """Write the report in each requested format, e.g. ``write_reports(r, html="r.html", junit="j.xml")``.

    Files are written atomically (a reader never sees half a report). Returns format -> path written.
    """
    written: dict[str, Path] = {}
    for fmt, target in outputs.items():
        if fmt not in FORMATS:
            raise ValueError(f"unknown report format {fmt!r} (one of {', '.join(FORMATS)})")
        if target is None:
            continue
        path = Path(target)
        try:
            write_text_atomic(path, render(report, fmt))
        except OSError as exc:
            raise ReportError(f"{path}: cannot write the {fmt} report ({exc.strerror or exc})") from exc
        written[fmt] = path
    return written
