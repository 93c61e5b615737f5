"""pytest fixtures for tests that need converted artifacts.

``make_artifact(format, precision, profile="x86-avx2")`` converts the session's ``digits``
model (tests/conftest.py) once per combination, with calibration and eval validation, into a
session temp dir, and returns the artifact directory. Calls with the same arguments share it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def make_artifact(digits, tmp_path_factory) -> Callable[..., Path]:
    """Factory: ``make_artifact("tflite", "int8") -> Path`` of a converted, validated digits artifact."""
    from edgeq.convert import convert
    from edgeq.profiles import load_profile

    root = tmp_path_factory.mktemp("artifacts")
    cache: dict[tuple[str, str, str], Path] = {}

    def make(format: str, precision: str, profile: str = "x86-avx2") -> Path:  # noqa: A002 - CLI's word
        key = (format, precision, profile)
        if key not in cache:
            output = root / f"{profile}-{format}-{precision}"
            convert(digits["model"], load_profile(profile), output, format=format, precision=precision,
                    calibration=digits["calib"] if precision == "int8" else None, eval_path=digits["eval"])
            cache[key] = output
        return cache[key]

    return make
