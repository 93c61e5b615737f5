"""Bench runs on the device: ``bench`` supervises one run under a time limit, ``clean_runs`` removes the
directories of runs a dropped connection left behind.

A run is live while its directory's ``.live`` file is flocked: ``bench`` takes the flock before it starts
the run and the run inherits it, so the kernel drops it only when both are gone. ``clean_runs`` removes
the directories whose flock it can take, and never looks at clocks: a Pi has no RTC, and a clock that
jumps two days (NTP at last reachable) made the old age rule delete a live run.

``bench`` starts ``run`` (bench/runner.py) in a session of its own and stops that whole session, SIGTERM
then SIGKILL, when the time limit passes or when whatever started ``bench`` is gone (the SSH session of a
dropped connection, or a killed controller), so no run goes on unattended. The run itself watches
``bench`` the same way (``stop_when_orphaned``), for when ``bench`` is killed outright.
"""

import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time

from ..watchdog import _ancestors, _gone
from .steps import signal_group

POLL_S = 0.25
LIVE = ".live"


def _lock_live(path):
    """An fd holding the flock on ``path`` (created if missing), or None when a live run holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    return fd


def op_bench(params, self_argv):
    """Run ``run --request R --result S`` with a time limit; answers how it ended (the result is the file)."""
    argv = list(self_argv) + ["run", "--request", params["request"], "--result", params["result"]]
    limit_s = float(params["limit_s"])
    kill_after_s = float(params.get("kill_after_s", 10.0))
    watched = _ancestors()
    live = _lock_live(os.path.join(os.path.dirname(params["result"]), LIVE))
    if live is None:
        raise OSError(errno.EBUSY, "another run uses this run directory", os.path.dirname(params["result"]))
    # The run's stdout goes to our stderr: our stdout carries one JSON line only. It inherits the live flock.
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(), start_new_session=True,
                             pass_fds=(live,))
    os.close(live)  # the run holds it now; ours would outlive a run we could not stop
    deadline = time.monotonic() + limit_s
    stopped, stopped_at = None, None
    while True:
        try:
            exit_code = child.wait(timeout=POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if stopped is None:
            if now > deadline:
                stopped = "time limit"
            elif any(_gone(pid, ppid, started) for pid, ppid, started in watched):
                stopped = "controller gone"
            if stopped:
                stopped_at = now
                signal_group(child, signal.SIGTERM)
        elif now - stopped_at > kill_after_s:
            signal_group(child, signal.SIGKILL)
    return {"ok": True, "exit_code": exit_code, "timed_out": stopped == "time limit", "stopped": stopped}


def op_clean_runs(params):
    """Remove the run directories in ``runs_dir`` that no live run holds (see the module's docstring). It runs
    under the bench lock, so no other bench is between making its directory and starting its run."""
    runs, removed = params["runs_dir"], 0
    for name in sorted(os.listdir(runs) if os.path.isdir(runs) else []):
        path = os.path.join(runs, name)
        try:
            if os.path.islink(path) or not os.path.isdir(path):
                os.unlink(path)
                removed += 1
                continue
            fd = _lock_live(os.path.join(path, LIVE))
            if fd is None:
                continue  # a run still holds it
            try:
                shutil.rmtree(path)
            finally:
                os.close(fd)
            removed += 1
        except OSError:
            pass
    return {"ok": True, "removed": removed}
