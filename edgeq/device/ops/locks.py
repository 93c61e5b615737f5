"""The device's locks: WORKDIR/.deploy.lock (exclusive for deploy, rollback and setup; shared for a bench, so no
release is swapped or pruned under a live run) and WORKDIR/.bench.lock (one bench at a time). Each is a flock
held by the ``lock`` op's process until its stdin (the controller's channel) closes; the file names the holder
and its device pid, so ``break_lock`` (``edgeq targets unlock``) can stop a holder whose controller is gone.
The holder also runs the steps done under its lock (ops/steps.py) and stops them before it lets go.
"""

import errno
import fcntl
import os
import signal
import time

from .steps import serve_steps

LOCK_FILES = {"deploy": ".deploy.lock", "bench": ".bench.lock"}


def op_lock(params, emit):
    """Hold a flock on WORKDIR/.deploy.lock (or .bench.lock) until stdin closes (the controller ends or dies):
    exclusive for deploy, rollback and setup; shared for a bench, so no release moves under a live run.
    Meanwhile run the controller's steps (``serve_steps``); none is left running when the flock goes."""
    workdir = params["workdir"]
    shared = bool(params.get("shared"))
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(os.path.join(workdir, LOCK_FILES[params.get("lock", "deploy")]), os.O_RDWR | os.O_CREAT, 0o644)
    # A holder writes its name just after taking the flock and empties the file just before letting go: a
    # refusal in either window reads no name. Asking again a moment later gives the name, or the lock.
    for attempt in range(_NAMELESS_RETRIES + 1):
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder, pid = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            if pid is not None or attempt == _NAMELESS_RETRIES:
                emit({"locked": False, "holder": holder, "pid": pid})
                return
            time.sleep(0.05)
    os.ftruncate(fd, 0)  # shared holders overwrite each other's line: the file names the latest
    os.pwrite(fd, ("%s\n%s%d\n" % (params.get("holder", ""), LOCK_PID, os.getpid())).encode("utf-8"), 0)
    emit({"locked": True, "pid": os.getpid(), "clock": time.monotonic(), "heartbeats": True})
    serve_steps(emit)  # until EOF (the channel closed, whatever the reason), SIGTERM or SIGHUP
    if not shared:
        os.ftruncate(fd, 0)


LOCK_PID = "device pid "
_NAMELESS_RETRIES = 20  # x 50 ms: a holder between its flock and its name (or its exit) is far quicker


def _holder(text):
    """(the holder's description, its device pid or None) from the lock file's text."""
    lines = text.strip().splitlines()
    pid = None
    if lines and lines[-1].startswith(LOCK_PID) and lines[-1][len(LOCK_PID):].isdigit():
        pid = int(lines.pop()[len(LOCK_PID):])
    return " ".join(lines), pid


def op_break_lock(params):
    """Stop the process holding the deploy lock (or the bench lock: ``lock``). A controller gone in a partition
    leaves its session and its lock process alive until TCP gives up, about 2 h. Only a process that is this
    package's ``lock`` op is stopped; it stops the step it runs, and the kernel releases the flock when it
    exits."""
    path = os.path.join(params["workdir"], LOCK_FILES[params.get("lock", "deploy")])
    if not os.path.exists(path):
        return {"ok": True, "held": False}
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return {"ok": True, "held": False}
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
        holder, pid = _holder(os.read(fd, 4096).decode("utf-8", "replace"))
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as handle:
                argv = handle.read().split(b"\0")
        except (OSError, TypeError):
            return {"ok": False, "error": "holder", "holder": holder, "message": "no lock process %s" % pid}
        if b"lock" not in argv or not any(b"edgeq" in arg for arg in argv):
            return {"ok": False, "error": "holder", "holder": holder,
                    "message": "pid %d is not an edgeq lock process; not stopping it" % pid}
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20  # the holder stops its step first
        while time.monotonic() < deadline:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return {"ok": True, "held": True, "broken": True, "holder": holder, "pid": pid}
            except OSError:
                time.sleep(0.05)
        return {"ok": False, "error": "holder", "holder": holder, "message": "pid %d did not exit" % pid}
    finally:
        os.close(fd)  # closing drops our own flock, if we took it
