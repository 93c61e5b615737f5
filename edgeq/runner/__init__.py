"""The on-device runner. ``edgeq_runner.py`` is shipped as one self-contained file inside each release."""

from pathlib import Path

# The runner's file name, here and in every release directory on a device.
RUNNER_NAME = "edgeq_runner.py"
RUNNER_PATH = Path(__file__).with_name(RUNNER_NAME)
