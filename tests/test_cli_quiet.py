"""Backend info chatter (TensorFlow, absl, LiteRT) stays off the terminal unless -vv; real messages pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EDGEQ = str(Path(sys.executable).with_name("edgeq"))
NOISY = ("oneDNN custom operations are on", "absl::InitializeLog", "Created TensorFlow Lite XNNPACK delegate")


def test_filter_drops_native_noise_and_keeps_the_rest(tmp_path):
    """Lines written by native code straight to fd 2 (here: a child process inheriting it)."""
    script = (
        "import subprocess, sys\n"
        "from edgeq.quiet import filtered_stderr\n"
        "with filtered_stderr():\n"
        "    subprocess.run(['sh', '-c', 'echo \"WARNING: All log messages before absl::InitializeLog() is called "
        "are written to STDERR\" >&2; echo \"I0000 00:00:1796.5  7310 port.cc:153] oneDNN custom operations are "
        "on. You may see...\" >&2; echo \"a real warning\" >&2'])\n"
        "    print('python stderr line', file=sys.stderr)\n"
        "print('after', file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["a real warning", "python stderr line", "after"]


@pytest.mark.slow
def test_convert_prints_no_backend_chatter(digits, tmp_path):
    argv = [EDGEQ, "convert", str(digits["model"]), "--profile", "rpi4", "--calibration", str(digits["calib"]),
            "--calibration-samples", "50", "--output", str(tmp_path / "quiet")]
    quiet = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert not [line for line in quiet.stderr.splitlines() if any(n in line for n in NOISY)], quiet.stderr
    assert "only 50 calibration samples" in quiet.stderr  # edgeq's own warning still shows
    loud = subprocess.run([EDGEQ, "-vv", *argv[1:-1], str(tmp_path / "loud")], capture_output=True, text=True,
                          timeout=300)
    # -vv lets everything through: edgeq's debug log, and the backends' own lines where this CPU prints them.
    assert loud.returncode == 0 and "DEBUG edgeq." in loud.stderr, loud.stderr
