"""Device steps run by the lock holder, so they cannot outlive it (issue 14 a).

While the ``lock`` op holds its flock it reads step requests on stdin, one JSON line each:
``{"argv": [...], "input": "...", "timeout_s": T}`` (a device op's input is its JSON params; a plain
command, say pip, has none). It runs each step in a session of its own with the input on its stdin, and
answers one JSON line: ``{"exit_code", "stdout", "stderr"}``, or
``{"timed_out": true, ...}`` when the step ran past ``timeout_s``. The holder stops the step's whole
process group (SIGTERM, then SIGKILL) when

- the step runs past its time limit (the controller has stopped waiting for it);
- stdin closes: the controller ended, died, or closed the lock on an error of its own;
- the holder gets SIGTERM or SIGHUP (``edgeq targets unlock``, or sshd hanging up);

and only then lets the flock go. So no step swaps ``current`` after the controller reported the deploy
failed, and a retry that gets the lock never runs beside a step of the one before.

A request may carry ``start_by``, a time on the holder's monotonic clock (the lock's answer told the
controller that clock): a request that arrives later is not started. A device frozen while the request
was in flight (SIGSTOP, a hung kernel) would otherwise run it on waking, after the controller had given
up on it; the closed connection's EOF may reach the holder only just after the request does.

A request may carry ``heartbeat_s``: while its step runs, the holder writes ``{"heartbeat": seconds}`` lines
that often, so the controller tells a long step from a holder that stopped (SIGSTOP, starved by swapping)
while the device's sshd still answers keepalives.
"""

import contextlib
import json
import os
import select
import signal
import subprocess
import threading
import time

POLL_S = 0.25
KILL_AFTER_S = 5.0
MAX_STDOUT = 8 << 20  # a step answers one JSON line; a release listing is the largest
MAX_STDERR_TAIL = 16 << 10


def signal_group(process, sig):
    """Send ``sig`` to the process group ``process`` leads (it was started with start_new_session)."""
    with contextlib.suppress(OSError):
        os.killpg(process.pid, sig)


def stop_group(process, kill_after_s=KILL_AFTER_S):
    """SIGTERM the group, SIGKILL it after ``kill_after_s``; returns once the leader has exited."""
    signal_group(process, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=kill_after_s)
    signal_group(process, signal.SIGKILL)  # also any member that outlived the leader
    process.wait()


class _Stop(object):
    """Set by SIGTERM/SIGHUP: the holder is asked to end (break_lock, or sshd hanging up)."""

    def __init__(self):
        self.signal = None

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal = signum


class _Controller(object):
    """The holder's stdin: request lines from the controller, EOF when it is gone."""

    def __init__(self):
        self.buffer = b""
        self.closed = False

    def poll(self, timeout):
        """Read what is there within ``timeout`` seconds; sets ``closed`` at EOF."""
        if self.closed:
            time.sleep(timeout)
            return
        try:
            ready, _, _ = select.select([0], [], [], timeout)
        except InterruptedError:  # a signal arrived: the caller looks at it
            return
        if ready:
            data = os.read(0, 65536)
            if data:
                self.buffer += data
            else:
                self.closed = True

    def next_line(self):
        if b"\n" not in self.buffer:
            return None
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line


def serve_steps(emit):
    """Run the controller's step requests until it goes (EOF) or the holder is told to stop."""
    stop, controller = _Stop(), _Controller()
    stop.install()
    while stop.signal is None:
        line = controller.next_line()
        if line is None:
            if controller.closed:
                return
            controller.poll(POLL_S)
            continue
        try:
            request = json.loads(line.decode("utf-8"))
            argv, data = [str(arg) for arg in request["argv"]], request.get("input", "").encode("utf-8")
            timeout_s = float(request["timeout_s"])
            start_by = request.get("start_by")
            start_by = None if start_by is None else float(start_by)
            heartbeat_s = request.get("heartbeat_s")
            heartbeat_s = None if heartbeat_s is None else max(0.1, float(heartbeat_s))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            emit({"ok": False, "error": "usage", "message": "lock: a step request is malformed: %s" % exc})
            continue
        if start_by is not None and time.monotonic() > start_by:
            emit({"expired": True, "late_s": round(time.monotonic() - start_by, 3)})
            continue
        answer = _run_step(argv, data, timeout_s, stop, controller, _Heartbeat(emit, heartbeat_s))
        if answer is None:  # the controller is gone or the holder was told to stop: the step was stopped
            return
        emit(answer)


class _Heartbeat(object):
    """Writes ``{"heartbeat": seconds since the step started}`` every ``every_s`` (never when None)."""

    def __init__(self, emit, every_s):
        self.emit, self.every_s = emit, every_s
        self.started = self.next_at = time.monotonic()
        if every_s:
            self.next_at += every_s

    def tick(self):
        now = time.monotonic()
        if self.every_s and now >= self.next_at:
            self.emit({"heartbeat": round(now - self.started, 1)})
            self.next_at = now + self.every_s


def _run_step(argv, data, timeout_s, stop, controller, heartbeat):
    """One step under the holder; its answer, or None when it was stopped because the holder must end."""
    try:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True)
    except OSError as exc:
        return {"exit_code": 127, "stdout": "", "stderr": "%s: %s" % (argv[0], exc.strerror or exc)}
    feeder = threading.Thread(target=_feed, args=(process.stdin, data), daemon=True)
    feeder.start()
    out, err = _Capture(MAX_STDOUT, keep="head"), _Capture(MAX_STDERR_TAIL, keep="tail")
    streams = {process.stdout.fileno(): out, process.stderr.fileno(): err}
    deadline = time.monotonic() + timeout_s
    try:
        while streams:
            if stop.signal is not None or controller.closed:
                stop_group(process)
                return None
            if time.monotonic() > deadline:
                stop_group(process)
                return {"timed_out": True, "exit_code": None, "stdout": out.text(), "stderr": err.text()}
            heartbeat.tick()
            try:
                ready, _, _ = select.select(list(streams) + ([] if controller.closed else [0]), [], [], POLL_S)
            except InterruptedError:
                continue
            for fd in ready:
                if fd == 0:
                    controller.poll(0)  # a request early, or EOF: the loop's first check sees it
                    continue
                data = os.read(fd, 65536)
                if data:
                    streams[fd].add(data)
                else:
                    del streams[fd]
        while process.poll() is None:  # output closed; the leader is exiting
            if stop.signal is not None or controller.closed or time.monotonic() > deadline:
                stop_group(process)
                return None if stop.signal is not None or controller.closed else \
                    {"timed_out": True, "exit_code": None, "stdout": out.text(), "stderr": err.text()}
            heartbeat.tick()
            time.sleep(0.01)
        return {"exit_code": process.returncode, "stdout": out.text(), "stderr": err.text()}
    finally:
        for pipe in (process.stdout, process.stderr):
            pipe.close()


def _feed(pipe, data):
    with contextlib.suppress(OSError):  # the step may exit (or be stopped) before reading it all
        pipe.write(data)
    with contextlib.suppress(OSError):
        pipe.close()


class _Capture(object):
    """What a step wrote, bounded: the head of stdout (its JSON answer), the tail of stderr."""

    def __init__(self, limit, keep):
        self.limit, self.keep, self.data = limit, keep, b""

    def add(self, chunk):
        if self.keep == "head":
            self.data += chunk[:max(0, self.limit - len(self.data))]
        else:
            self.data = (self.data + chunk)[-self.limit:]

    def text(self):
        return self.data.decode("utf-8", "replace")
