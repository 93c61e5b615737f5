"""``edgeq lab run LAB.yaml``: convert, deploy, bench and report a whole matrix, with history."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.group()
def lab() -> None:
    """The device lab: run a LAB.yaml matrix every night and keep its history."""


@lab.command("run")
@click.argument("lab_file", metavar="LAB.yaml", type=click.Path(path_type=Path))
@click.option("-i", "--inventory", type=click.Path(path_type=Path),
              help="Targets inventory (default: $EDGEQ_INVENTORY, else targets/*.yaml).")
@click.option("--history", type=click.Path(path_type=Path), help="History folder (overrides history.dir).")
@click.option("--baseline", "baselines", multiple=True, type=click.Path(path_type=Path),
              help="Pinned baseline results (repeatable; default: the previous run in the history).")
@click.option("--runs", type=click.IntRange(min=1), help="Override run.runs.")
@click.option("--warmup", type=click.IntRange(min=0), help="Override run.warmup.")
@click.option("--min-seconds", type=click.FloatRange(min=0), help="Override run.min_seconds.")
@click.option("--idle-seconds", type=click.FloatRange(min=0), help="Override the power sensor's idle sampling.")
def run_command(lab_file, inventory, history, baselines, runs, warmup, min_seconds, idle_seconds) -> None:
    """Convert (or reuse), deploy and bench every artifact of LAB.yaml, then report.

    Results and reports go to HISTORY/<YYYY-mm-ddTHH-MM-SS>/. Exit status: 0 when everything passed, 3 when
    anything failed or regressed (the results and the report are still written), 1 when the run could not
    start (bad LAB.yaml, unknown target, ...).
    """
    from rich.console import Console

    from edgeq.lab import load_lab, run_lab

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    config = load_lab(lab_file)
    for name, value in (("runs", runs), ("warmup", warmup), ("min_seconds", min_seconds),
                        ("idle_seconds", idle_seconds)):
        if value is not None:
            setattr(config.run, name, value)
    styles = {"ok": "green", "reused": "cyan", "failed": "bold red", "skipped": "yellow", "info": "dim",
              "start": ""}
    marks = {"ok": "✓", "reused": "↺", "failed": "✗", "skipped": "–", "info": "·", "start": "…"}

    def progress(event) -> None:
        style = styles[event.status]
        text = f"{marks[event.status]} {event.step:<7} {event.message}"
        console.print(text, style=style or None, markup=False, highlight=False)

    outcome = run_lab(config, inventory=inventory, baseline=list(baselines) or None, history=history,
                      progress=progress)
    for fmt, path in outcome.report_files.items():
        console.print(f"wrote {fmt} report: {path}", markup=False)
    for line in outcome.report.problem_lines():
        console.print(f"  {line}", style="red", markup=False)
    console.print(outcome.report.headline(), style="bold green" if outcome.report.passed else "bold red",
                  markup=False)
    sys.exit(outcome.exit_code)
