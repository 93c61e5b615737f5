"""Orphan watchdog: stop when whatever started us is gone (an SSH session that dropped)."""

import os
import signal
import sys
import threading


def _proc_stat(pid):
    """(state, ppid, session id, start time in clock ticks) of ``pid`` from /proc, or None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            text = handle.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[3]), int(fields[19])


def _ancestors():
    """[(pid, ppid or None, start time)]: the processes whose exit means the run lost its controller.

    Only the processes that started this run are watched, not everything up to init: the parents inside
    the runner's own session (the ``timeout`` wrapper), then the first process outside it, where the walk
    stops; an unrelated far ancestor exiting (the shell that started the controller with ``&`` and logged
    out, an sshd listener restarted) must not stop a healthy run. When that first outside process leads a
    session of its own while the runner does not (``setsid -w`` exec'd by the shell sshd made for the
    command), it is only the launcher, so its parent (the SSH connection's process) is watched too. A
    ppid is recorded (re-parenting = gone) only inside the runner's session; outside it only exit counts.
    """
    try:
        own_sid = os.getsid(0)
    except OSError:
        own_sid = None
    chain = []
    pid = os.getppid()
    while pid > 1 and len(chain) < 64:
        stat = _proc_stat(pid)
        if stat is None:
            break
        _, ppid, sid, started = stat
        if sid == own_sid:
            chain.append((pid, ppid, started))
            pid = ppid
            continue
        chain.append((pid, None, started))
        if sid == pid and own_sid != os.getpid() and ppid > 1:
            launcher_parent = _proc_stat(ppid)
            if launcher_parent is not None:
                chain.append((ppid, None, launcher_parent[3]))
        break
    return chain


def _gone(pid, ppid, started):
    """True when ``pid`` exited (also as an unreaped zombie: containers' init may never reap it), was
    replaced, or (when ``ppid`` is given) lost its parent (re-parented to init or a subreaper)."""
    stat = _proc_stat(pid)
    return (stat is None or stat[0] in ("Z", "X") or stat[3] != started
            or (ppid is not None and stat[1] != ppid))


class OrphanWatchdog(object):
    """Kills the runner's process group once a process that started it (``_ancestors``) has exited.

    A dropped SSH connection ends sshd's session process but not what it started; this makes the runner
    (and the ``timeout`` wrapping it) exit within a poll period instead of running on unattended.
    """

    def __init__(self, poll_s=0.5):
        self.chain = _ancestors()
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgeq-watchdog", daemon=True)

    def start(self):
        if self.chain:
            self._thread.start()
        return self

    def stop(self):
        self._stop.set()

    def _loop(self):
        while not self._stop.wait(self.poll_s):
            for pid, ppid, started in self.chain:
                if _gone(pid, ppid, started):
                    try:  # stderr may be the dropped connection itself: a write can fail with EPIPE
                        sys.stderr.write("edgeq-device: parent process %d is gone (connection lost); stopping\n"
                                         % pid)
                        sys.stderr.flush()
                    except (OSError, ValueError):
                        pass
                    try:
                        if _own_group():
                            os.killpg(os.getpgrp(), signal.SIGTERM)
                        else:
                            os.kill(os.getpid(), signal.SIGTERM)
                    except OSError:
                        os._exit(3)
                    return


def _own_group():
    """True when the runner leads-or-shares a session made for this run (setsid, or sshd's per-command
    session), so the whole group (the ``timeout`` wrapper included) may be stopped together."""
    try:
        return os.getpgrp() == os.getsid(0)
    except OSError:
        return False
