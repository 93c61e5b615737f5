"""What every power sensor shares: the reading interface, and reads that fail with a reason."""

import re
import subprocess

from ..util import read_text


class PowerUnavailable(Exception):
    """The configured sensor cannot be read here; the message is the reason shown in the result."""


def read_number(path):
    try:
        return float(read_text(path))
    except PermissionError:
        raise PowerUnavailable("permission denied reading %s (needs root or a udev rule granting read access)"
                               % path) from None
    except (OSError, ValueError) as exc:
        raise PowerUnavailable("cannot read %s: %s" % (path, exc)) from exc


class PowerSource(object):
    """Base class: ``read()`` -> (watts or None, cumulative joules or None)."""

    sensor = ""

    def read(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def describe(self):
        return {}

    def close(self):
        pass


def run_command(argv, timeout=10.0):
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    except OSError as exc:
        raise PowerUnavailable("cannot run %s: %s" % (argv[0], exc)) from exc
    except subprocess.TimeoutExpired:
        raise PowerUnavailable("%s did not answer within %.0f s" % (" ".join(argv), timeout)) from None
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        raise PowerUnavailable("%s exited with %d %s" % (" ".join(argv), proc.returncode, tail[0]))
    return proc.stdout.decode("utf-8", "replace")


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
