"""The ``run`` operation: read a request file, measure, and always write a result file (also on failure)."""

import argparse
import json
import os
import signal
import threading
import time
import traceback

from .. import DEVICE_VERSION
from ..errors import RunnerError, RuntimeMissing

# The result format this runner writes (the controller's edgeq.bench.result reads it).
RESULT_VERSION = 1


class _Terminated(Exception):
    pass


# A stop comes as a burst of SIGTERMs (the watchdog signals the group, ``timeout`` passes it on to the
# runner and to its group again): only the first one interrupts the run; the others must not interrupt
# the writing of the result.
_stopping = {"now": False}


def _on_sigterm(signum, frame):
    if _stopping["now"]:
        return
    _stopping["now"] = True
    raise _Terminated("terminated by signal %d (time limit reached or connection lost)" % signum)


def _write_json(path, data):
    if os.path.exists(path) and not os.path.isfile(path):
        # --result /dev/stdout: write through the node; a rename would replace the node itself.
        with open(path, "w") as handle:
            json.dump(data, handle, indent=1, allow_nan=False, default=str)
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1, allow_nan=False, default=str)
    os.replace(tmp, path)


def _json_safe(value):
    """NaN/inf become None so the result stays strict JSON."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return dict((k, _json_safe(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def main(argv=None):
    """``run --request req.json --result res.json``; the result is written also on failure."""
    parser = argparse.ArgumentParser(prog="edgeq-device run", description="edgeq on-device bench run")
    parser.add_argument("--request", required=True, help="request JSON written by the controller")
    parser.add_argument("--result", required=True, help="where to write the result JSON")
    args = parser.parse_args(argv)
    started = time.monotonic()  # not time.time(): a device without an RTC may have its clock set mid-run
    result = {"result_version": RESULT_VERSION, "runner_version": DEVICE_VERSION, "status": "failed",
              "error": None, "error_kind": None, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "pid": os.getpid()}
    watchdog = None
    previous = None
    in_main_thread = threading.current_thread() is threading.main_thread()
    _stopping["now"] = False
    if in_main_thread:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        try:  # numpy (and then the runtime) load here only: a device without its setup gets a result
            import numpy  # noqa: F401
        except ImportError as exc:
            raise RuntimeMissing("numpy is not installed on this device (import failed: %s)" % exc) from exc
        from ..watchdog import OrphanWatchdog
        from .run import run_request
        try:
            with open(args.request) as handle:
                request = json.load(handle)
        except (OSError, ValueError) as exc:
            raise RunnerError("cannot read request %s: %s" % (args.request, exc)) from exc
        if request.get("stop_when_orphaned"):
            watchdog = OrphanWatchdog().start()
        result.update(run_request(request, os.path.dirname(os.path.abspath(args.request))))
        result["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 - everything ends up in the result file
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        kind = "runtime_missing" if isinstance(exc, RuntimeMissing) else \
            "terminated" if isinstance(exc, (_Terminated, KeyboardInterrupt)) else \
            "runner" if isinstance(exc, RunnerError) else "exception"
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        result["error"] = message if isinstance(exc, RunnerError) else "%s: %s" % (type(exc).__name__, message)
        result["error_kind"] = kind
        result["traceback"] = traceback.format_exc().splitlines()[-15:]
    finally:
        _stopping["now"] = True  # from here on a SIGTERM waits for the result to be written
        if watchdog:
            watchdog.stop()
        result["duration_s"] = time.monotonic() - started
        try:
            _write_json(args.result, _json_safe(result))
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)
    return 0 if result["status"] == "ok" else 1
