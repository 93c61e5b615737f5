"""``python -I edgeq-device-<sha12>.pyz OP``: one device operation, JSON in, one JSON line out.

Parameters come as JSON on stdin (``lock``, which holds stdin open for its lifetime, takes them as the
next argument). Every operation prints exactly one JSON object on stdout; a failure is an object with
``ok: false``, an ``error`` kind (``os``, ``usage``, ``internal``) and a one-line ``message``, and a non-zero
exit. ``run`` is the exception: it is the bench run itself, started by ``bench``, and writes its result
to the file named by ``--result``; so is ``mender STATE FILES``, the Mender update module's states
(ops/mender.py).

Operation modules are imported only when called: ``inspect`` on a device without numpy works, and a
short operation costs an interpreter start and a few stdlib imports.
"""

import hashlib
import importlib
import json
import os
import platform
import sys

from . import DEVICE_VERSION

PACKAGE = __name__.rsplit(".", 1)[0]  # "edgeq_device" inside the zipapp, "edgeq.device" in a checkout

# op -> (module, function). Functions take the params dict and return the answer dict.
OPS = {
    "selfcheck": (None, "op_selfcheck"),
    "lock": ("ops.locks", "op_lock"),
    "break_lock": ("ops.locks", "op_break_lock"),
    "inspect": ("ops.releases", "op_inspect"),
    "prepare": ("ops.releases", "op_prepare"),
    "cleanup": ("ops.releases", "op_cleanup"),
    "activate": ("ops.releases", "op_activate"),
    "rollback": ("ops.releases", "op_rollback"),
    "record_python": ("ops.venv", "op_record_python"),
    "read_python": ("ops.venv", "op_read_python"),
    "venv_prepare": ("ops.venv", "op_venv_prepare"),
    "venv_switch": ("ops.venv", "op_venv_switch"),
    "venv_discard": ("ops.venv", "op_venv_discard"),
    "facts": ("ops.facts", "op_facts"),
    "clean_runs": ("ops.runs", "op_clean_runs"),
    "bench": ("ops.runs", "op_bench"),
}


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def archive_path():
    """The zipapp this code runs from, or None when it runs from a source tree."""
    here = os.path.abspath(__file__)
    while here and not os.path.exists(here):
        here = os.path.dirname(here)
    return here if os.path.isfile(here) else None


def self_argv():
    """How to start this package again (for ``bench`` starting ``run``), isolated like every device step."""
    archive = archive_path()
    return [sys.executable, "-I", archive] if archive else [sys.executable, "-I", "-m", PACKAGE]


def op_selfcheck(params):
    """The archive's sha256 against the one the controller built; the interpreter that runs it."""
    archive = archive_path()
    actual = None
    if archive:
        digest = hashlib.sha256()
        with open(archive, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        actual = digest.hexdigest()
    expected = params.get("sha256")
    return {"ok": expected is None or actual == expected, "sha256": actual, "version": DEVICE_VERSION,
            "python": platform.python_version(), "executable": sys.executable}


def _fail(kind, message, code):
    emit({"ok": False, "error": kind, "message": message})
    return code


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2:
        return _fail("usage", "usage: edgeq-device OP (one of: run, mender, %s)" % ", ".join(sorted(OPS)), 2)
    op = argv[1]
    if op == "run":
        from .bench.runner import main as run_main
        return run_main(argv[2:])
    if op == "mender":  # the edgeq-release update module's states (Mender's argv, not JSON)
        from .ops.mender import main as mender_main
        return mender_main(argv[2:])
    if op not in OPS:
        return _fail("usage", "unknown operation %r (this device package is version %s)" % (op, DEVICE_VERSION), 2)
    try:
        params = json.loads(argv[2]) if len(argv) > 2 else json.loads(sys.stdin.read() or "{}")
    except ValueError as exc:
        return _fail("usage", "%s: parameters are not JSON: %s" % (op, exc), 2)
    module_name, function_name = OPS[op]
    try:
        module = importlib.import_module("." + module_name, PACKAGE) if module_name else sys.modules[__name__]
        function = getattr(module, function_name)
        if op == "lock":
            function(params, emit)
            return 0
        answer = function(params, self_argv()) if op == "bench" else function(params)
    except OSError as exc:
        emit({"ok": False, "error": "os", "message": "%s: %s" % (exc.filename or op, exc.strerror or exc),
              "errno": exc.errno})
        return 3
    except Exception as exc:  # a bug here must still answer in one JSON line
        return _fail("internal", "%s: %s: %s" % (op, type(exc).__name__, exc), 4)
    emit(answer)
    return 0
