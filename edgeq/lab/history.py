"""The lab's history: one time-stamped folder per run, the previous run's results as the default baseline,
and pruning that never deletes a pinned baseline."""

from __future__ import annotations

import datetime as _dt
import re
import shutil
from pathlib import Path

HISTORY_STAMP = "%Y-%m-%dT%H-%M-%S"
_STAMP_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(-\d+)?$")
RESULTS_SUBDIR = "results"
REPORT_FILES = {"html": "report.html", "markdown": "report.md", "csv": "report.csv", "json": "report.json",
                "junit": "junit.xml"}


def stamp_dir(history: Path, now: _dt.datetime) -> Path:
    base = now.strftime(HISTORY_STAMP)
    candidate, n = history / base, 2
    while candidate.exists():
        candidate, n = history / f"{base}-{n}", n + 1
    return candidate


def history_runs(history: Path) -> list[Path]:
    """Run folders in the history, oldest first."""
    if not history.is_dir():
        return []
    return sorted((p for p in history.iterdir() if p.is_dir() and _STAMP_RE.match(p.name)),
                  key=lambda p: (p.name[:19], int(p.name[20:] or 0) if len(p.name) > 19 else 0))


def previous_results(history: Path, before: Path) -> Path | None:
    """The newest earlier run's results folder that holds at least one result file."""
    runs = [p for p in history_runs(history) if p != before]
    for run in reversed(runs):
        results = run / RESULTS_SUBDIR
        if results.is_dir() and any(results.glob("*.json")):
            return results
    return None


def prune_history(history: Path, keep: int, protect: list[Path] | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` runs, never a run holding one of ``protect`` (a pinned baseline);
    return what was deleted."""
    protected = [Path(p).resolve() for p in protect or []]

    def holds_protected(run: Path) -> bool:
        run = run.resolve()
        return any(p == run or run in p.parents for p in protected)

    runs = history_runs(history)
    doomed = [run for run in (runs[:-keep] if len(runs) > keep else []) if not holds_protected(run)]
    for run in doomed:
        shutil.rmtree(run, ignore_errors=True)
    return doomed
