"""Shared helpers for strict YAML configs: load a file, validate it, name the file and field on error."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict
from pydantic import ValidationError as PydanticValidationError

from edgeq.errors import EdgeqError

ModelT = TypeVar("ModelT", bound=BaseModel)

# Limits on YAML config files (profiles, inventories, lab files): all far beyond any real one.
MAX_YAML_BYTES = 16 * 2**20
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 1_000_000


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def format_validation_error(exc: PydanticValidationError, source: str) -> str:
    """Render a pydantic error as ``source: field.path: message`` (first problem, plus a count of others)."""
    problems = []
    for err in exc.errors():
        location = ".".join(str(part) for part in err["loc"]) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append(f"{location}: {message}")
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    return f"{source}: {problems[0]}{more}"


def load_yaml_file(path: Path, error_cls: type[EdgeqError]) -> Any:
    """Read a YAML file, raising ``error_cls`` naming the file when it is missing, malformed or hostile.

    The file may hold at most ``MAX_YAML_BYTES`` of UTF-8 text, nest at most ``MAX_YAML_DEPTH`` levels and
    expand (aliases included) to at most ``MAX_YAML_NODES`` values: these are checked on the parser's
    events, which are produced without recursion, before anything is composed.
    """
    text = _read_text(path, error_cls)
    try:
        _check_shape(path, text, error_cls)
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise error_cls(f"{path}: not valid YAML{where}: {problem}") from exc
    except (ValueError, OverflowError) as exc:  # e.g. an integer of more than 4300 digits
        raise error_cls(f"{path}: not valid YAML: {' '.join(str(exc).split())[:200]}") from exc
    except (RecursionError, MemoryError) as exc:  # last resort: the checks above should make these impossible
        raise error_cls(f"{path}: YAML too deeply nested or too large to load") from exc


def _read_text(path: Path, error_cls: type[EdgeqError]) -> str:
    try:
        with path.open("rb") as handle:  # bounded read: also safe on /dev/zero or a FIFO that never ends
            data = handle.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError as exc:
        raise error_cls(f"{path}: file not found") from exc
    except OSError as exc:
        raise error_cls(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if len(data) > MAX_YAML_BYTES:
        raise error_cls(f"{path}: larger than {MAX_YAML_BYTES // 2**20} MiB, too big for a YAML config file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error_cls(f"{path}: not UTF-8 text (line {line}: {exc.reason})") from exc


def _check_shape(path: Path, text: str, error_cls: type[EdgeqError]) -> None:
    """Refuse deep nesting, recursive aliases and alias expansion ("billion laughs") from the event stream."""
    expanded: dict[str, int] = {}  # anchor -> number of values its node expands to
    open_frames: list[list] = []  # [values so far, anchor] of each collection being read
    total = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        if isinstance(event, yaml.CollectionStartEvent):
            if len(open_frames) >= MAX_YAML_DEPTH:
                raise error_cls(f"{path}: line {line}: nested more than {MAX_YAML_DEPTH} levels deep")
            open_frames.append([1, event.anchor])
            size = 1
        elif isinstance(event, yaml.CollectionEndEvent):
            size, anchor = open_frames.pop()
            if anchor is not None:
                expanded[anchor] = size
            if open_frames:
                open_frames[-1][0] += size
            continue  # its values were counted as they came
        elif isinstance(event, yaml.AliasEvent):
            if any(frame[1] == event.anchor for frame in open_frames):
                raise error_cls(f"{path}: line {line}: alias *{event.anchor} refers to a node that contains it")
            size = expanded.get(event.anchor, 1)
        elif isinstance(event, yaml.ScalarEvent):
            size = 1
            if event.anchor is not None:
                expanded[event.anchor] = 1
        else:
            continue
        total += size
        if total > MAX_YAML_NODES:
            raise error_cls(f"{path}: line {line}: expands to more than {MAX_YAML_NODES} values "
                            "(aliases included), too many for a YAML config file")
        if open_frames and not isinstance(event, yaml.CollectionStartEvent):
            open_frames[-1][0] += size


def validate_model(model_cls: type[ModelT], data: Any, source: str, error_cls: type[EdgeqError]) -> ModelT:
    """Validate ``data`` into ``model_cls`` or raise ``error_cls`` naming ``source`` and the field."""
    if not isinstance(data, dict):
        raise error_cls(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model_cls.model_validate(data)
    except PydanticValidationError as exc:
        raise error_cls(format_validation_error(exc, source)) from exc


def suggest(name: str, choices: list[str]) -> str | None:
    """A 'did you mean' hint for an unknown name, or None."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return None
