"""Resident memory of the run: now, and its peak."""

import sys


def _proc_status_kb(field):
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_mb():
    """Resident set size now (MiB), from /proc/self/status; None where unavailable."""
    kb = _proc_status_kb("VmRSS")
    return kb / 1024.0 if kb is not None else None


def peak_rss_mb():
    """Peak resident set size (MiB): VmHWM where present, else getrusage's ru_maxrss."""
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb / 1024.0
    try:
        import resource
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):  # pragma: no cover - non-Unix
        return None
    # ru_maxrss is KiB on Linux and bytes on macOS.
    return maxrss / (1024.0 * 1024.0) if sys.platform == "darwin" else maxrss / 1024.0
