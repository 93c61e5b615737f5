"""The on-device runner. ``edgeq_runner.py`` is shipped as one self-contained file inside each release."""

from pathlib import Path

RUNNER_PATH = Path(__file__).with_name("edgeq_runner.py")
