"""Shared fixtures: a tiny real Keras model trained on scikit-learn's digits, with calibration/eval data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> dict:
    """A trained tiny digits CNN: {'model': .keras path, 'calib': npz, 'eval': npz, 'accuracy': float}."""
    from examples.digits.train import train

    return train(tmp_path_factory.mktemp("digits"), epochs=8, filters=8)

# Fixture modules owned by each area; listed here so every test can use them.
pytest_plugins = ["tests.convert_fixtures", "tests.sshd_fixtures", "tests.tune_fixtures", "tests.stateful_fixtures"]
