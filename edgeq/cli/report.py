"""``edgeq report``: render result files, compare them with a baseline, exit non-zero on regression."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--baseline", "baselines", multiple=True, type=click.Path(path_type=Path),
              help="Result files or directories to compare against (repeatable).")
@click.option("--html", "html_path", type=click.Path(path_type=Path), help="Write the HTML report here.")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path),
              help="Write the Markdown summary here ('-' for stdout).")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="Write the CSV rows here.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the JSON report here.")
@click.option("--junit", "junit_path", type=click.Path(path_type=Path), help="Write JUnit XML here.")
@click.option("--min-effect", type=click.FloatRange(0, 10), default=0.05, show_default=True,
              help="Latency margin: slower by more than this share (0.05 = 5 %) to count as a regression.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05,
              show_default=True, help="Significance level of the latency test.")
@click.option("--max-top1-drop", type=click.FloatRange(0, 1), default=0.005, show_default=True,
              help="Largest acceptable top-1 drop against the baseline, as a fraction (0.005 = 0.5 point), "
              "like convert's --max-accuracy-drop.")
@click.option("--max-energy-increase", type=click.FloatRange(0, 100), default=0.10, show_default=True,
              help="Largest acceptable relative increase of energy per inference (0.10 = 10 %).")
@click.option("--title", default="edgeq report", show_default=True, help="Title of the report.")
def report(results, baselines, html_path, markdown_path, csv_path, json_path, junit_path, min_effect, alpha,
           max_top1_drop, max_energy_increase, title) -> None:
    """Report on bench RESULTS (files or directories) and detect regressions against --baseline.

    Exit status: 0 when everything passed, 3 when a run failed, an artifact failed its accuracy gate, a
    result file was unreadable or anything regressed (the report files are still written), 1 on errors.
    Without any output option the Markdown summary goes to stdout.
    """
    from edgeq.report import Thresholds, create_report, render, write_reports

    thresholds = Thresholds(min_effect=min_effect, alpha=alpha, max_top1_drop=max_top1_drop,
                            max_energy_increase=max_energy_increase)
    result = create_report(list(results), list(baselines) or None, thresholds, title=title)
    to_stdout = markdown_path == Path("-") or not any((html_path, markdown_path, csv_path, json_path, junit_path))
    written = write_reports(result, html=html_path, markdown=None if markdown_path == Path("-") else markdown_path,
                            csv=csv_path, json=json_path, junit=junit_path)
    if to_stdout:
        click.echo(render(result, "markdown"), nl=False)
    for row in result.rows:
        if row.broken is not None:
            click.secho(f"error: {row.broken}", fg="red", err=True)
    for fmt, path in written.items():
        click.echo(f"wrote {fmt} report: {path}", err=True)
    for line in result.problem_lines(unreadable=False):
        click.echo(f"  {line}", err=True)
    click.secho(result.headline(), fg="green" if result.passed else "red", err=True)
    sys.exit(result.exit_code)
