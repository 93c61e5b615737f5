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
    """Read a YAML file, raising ``error_cls`` naming the file when it is missing or malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise error_cls(f"{path}: file not found") from exc
    except OSError as exc:
        raise error_cls(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise error_cls(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc


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
