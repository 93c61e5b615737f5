"""Bench runs on the device: ``bench`` supervises one run under a time limit, ``clean_runs`` removes the
directories of runs a dropped connection left behind.

``bench`` starts ``run`` (bench/runner.py) in a session of its own and stops that whole session, SIGTERM
then SIGKILL, when the time limit passes or when whatever started ``bench`` is gone (the SSH session of a
dropped connection, or a killed controller), so no run goes on unattended. The run itself watches
``bench`` the same way (``stop_when_orphaned``), for when ``bench`` is killed outright.
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from ..watchdog import _ancestors, _gone

POLL_S = 0.25


def _signal_session(child, sig):
    with contextlib.suppress(OSError):  # the run leads its own session and group (start_new_session)
        os.killpg(child.pid, sig)


def op_bench(params, self_argv):
    """Run ``run --request R --result S`` with a time limit; answers how it ended (the result is the file)."""
    argv = list(self_argv) + ["run", "--request", params["request"], "--result", params["result"]]
    limit_s = float(params["limit_s"])
    kill_after_s = float(params.get("kill_after_s", 10.0))
    watched = _ancestors()
    # The run's stdout goes to our stderr: our stdout carries one JSON line only.
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(), start_new_session=True)
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
                _signal_session(child, signal.SIGTERM)
        elif now - stopped_at > kill_after_s:
            _signal_session(child, signal.SIGKILL)
    return {"ok": True, "exit_code": exit_code, "timed_out": stopped == "time limit", "stopped": stopped}


def op_clean_runs(params):
    """Remove run directories older than twice their own time limit (the name carries it, "...-L<seconds>");
    names without one are kept ``default_age_s``."""
    runs, default_age, removed = params["runs_dir"], float(params["default_age_s"]), 0
    for name in (os.listdir(runs) if os.path.isdir(runs) else []):
        path, limit = os.path.join(runs, name), re.search(r"-L([0-9]+)$", name)
        try:
            if time.time() - os.lstat(path).st_mtime > (2 * int(limit.group(1)) if limit else default_age):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed += 1
        except OSError:
            pass
    return {"ok": True, "removed": removed}
