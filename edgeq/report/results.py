"""Reading bench result files (``edgeq.result.BenchResult``, schema 1 or 2).

Paths given by the user are files or directories; directories are searched
recursively for ``*.json``. How bad input is treated:

* a path that does not exist, or that holds no result file at all, raises ``ReportError``
  (a typo on the command line must not produce an empty, green report);
* a file that is a result but cannot be used (not JSON, wrong ``schema_version``, a missing or
  mistyped field) becomes a ``BrokenInput``: it is named in one line, shown as a failed row in every
  report and makes the report fail, while the other results are still reported;
* inside a directory, JSON files that are clearly not results (no ``target`` key, e.g. a
  ``manifest.json`` or a ``report.json`` written by ``edgeq report``) are skipped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError as PydanticValidationError

from edgeq.config import format_validation_error
from edgeq.errors import ReportError
from edgeq.result import READABLE_SCHEMA_VERSIONS, BenchResult

log = logging.getLogger(__name__)

@dataclass
class ResultRecord:
    """A result file that was read and validated."""

    path: Path
    result: BenchResult

    @property
    def target(self) -> str:
        return self.result.target

    @property
    def artifact_key(self) -> tuple[str, str | None]:
        """(target, artifact id): the exact match key against a baseline."""
        return (self.result.target, self.result.artifact.id)

    @property
    def build_key(self) -> tuple[str, str, str, str]:
        """(target, model, format, precision): the fallback match key when the artifact was rebuilt."""
        a = self.result.artifact
        return (self.result.target, a.display_name, a.format, a.precision)

    @property
    def label(self) -> str:
        """``model-format-precision``, the artifact's name for people (and JUnit)."""
        a = self.result.artifact
        return f"{a.display_name}-{a.format}-{a.precision}"

    @property
    def ok(self) -> bool:
        return self.result.status == "ok"

    @property
    def gate_failed(self) -> bool:
        """The artifact failed its accuracy gate at conversion (it may still have been benchmarked)."""
        return self.result.artifact.validation_status == "failed"

    @property
    def emulated(self) -> bool:
        return bool(self.result.env.get("emulated"))

    def latency_samples(self) -> np.ndarray:
        """Per-inference latencies in ms, in measurement order (empty when the run failed)."""
        if self.result.latency_ms is None:
            return np.empty(0)
        return np.asarray(self.result.latency_ms.samples, dtype=np.float64)


@dataclass
class BrokenInput:
    """A result file that could not be used; reported as a failed row."""

    path: Path
    error: str

    def __str__(self) -> str:
        return f"{self.path}: {self.error}"


@dataclass
class LoadedResults:
    records: list[ResultRecord]
    broken: list[BrokenInput]


class _NotAResult(Exception):
    """A JSON file found in a directory that is not a bench result (skipped)."""


def _parse_result(path: Path, from_directory: bool) -> ResultRecord:
    """Read one result file; raise _NotAResult (skip) or ValueError (broken, one-line message)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise ValueError(f"cannot read ({exc.strerror})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from exc
    if from_directory and not (isinstance(data, dict) and "target" in data):
        raise _NotAResult()
    if not isinstance(data, dict):
        raise ValueError(f"not a result file (top level is {type(data).__name__}, expected an object)")
    version = data.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        readable = " and ".join(map(str, READABLE_SCHEMA_VERSIONS))
        raise ValueError(f"schema_version {version!r} is not supported (this edgeq reads {readable})")
    try:
        result = BenchResult.model_validate(data)
    except PydanticValidationError as exc:
        # format_validation_error prefixes the source; the caller adds the path itself.
        raise ValueError(format_validation_error(exc, "field")[len("field: "):]) from exc
    return ResultRecord(path=path, result=result)


def load_results(paths: list[Path | str]) -> LoadedResults:
    """Load result files and directories (recursively ``*.json``); see the module docstring for bad input."""
    if not paths:
        raise ReportError("no result files given", hint="pass result files or directories written by 'edgeq bench'")
    records: list[ResultRecord] = []
    broken: list[BrokenInput] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise ReportError(f"{path}: no such file or directory")
        if path.is_dir():
            candidates = sorted(p for p in path.rglob("*.json") if p.is_file())
            from_directory = True
        else:
            candidates = [path]
            from_directory = False
        found = 0
        for file in candidates:
            resolved = file.resolve()
            if resolved in seen:
                found += 1
                continue
            seen.add(resolved)
            try:
                records.append(_parse_result(file, from_directory))
                found += 1
            except _NotAResult:
                log.debug("%s: not a result file, skipped", file)
            except ValueError as exc:
                broken.append(BrokenInput(file, str(exc)))
                found += 1
        if found == 0 and path.is_dir():
            raise ReportError(f"{path}: no result files found (searched *.json recursively)",
                              hint="result files are written by 'edgeq bench --output DIR'")
    return LoadedResults(records=records, broken=broken)
