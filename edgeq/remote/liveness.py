"""Liveness of an SSH connection while a command is silent: a frozen device is reported within a bound."""

from __future__ import annotations

import os
import threading
import time

import paramiko

from edgeq.errors import ConnectError

# A silent command's connection is probed after ALIVE_INTERVAL s; no reply for ALIVE_INTERVAL * ALIVE_COUNT s
# more is a frozen peer, reported 60 s after the last sign of life (EDGEQ_ALIVE_INTERVAL, EDGEQ_ALIVE_COUNT).
ALIVE_INTERVAL = 15.0
ALIVE_COUNT = 3


def frozen_after_s() -> float:
    """Seconds after the last sign of life at which a silent device is reported frozen: one interval before
    the first probe, then ``count`` intervals of unanswered probing (``Liveness.check``)."""
    return float(os.environ.get("EDGEQ_ALIVE_INTERVAL", ALIVE_INTERVAL)) * \
        (int(os.environ.get("EDGEQ_ALIVE_COUNT", ALIVE_COUNT)) + 1)


class Liveness:
    """ServerAliveInterval / ServerAliveCountMax for a connection waiting on a silent command.

    paramiko's own keepalive is sent without waiting for the reply, so a frozen device (sshd stopped, kernel
    hung, link gone without a reset) holds a command for its whole time limit. Here, after ``interval`` s of
    silence a keepalive request that wants a reply goes out from a helper thread (paramiko's wait=True has no
    timeout of its own); no reply within ``interval * count`` s means the peer is frozen: the connection is
    closed, which also ends the helper.
    """

    def __init__(self, transport: paramiko.Transport, label: str):
        self.transport = transport
        self.label = label
        self.interval = float(os.environ.get("EDGEQ_ALIVE_INTERVAL", ALIVE_INTERVAL))
        self.count = int(os.environ.get("EDGEQ_ALIVE_COUNT", ALIVE_COUNT))
        self.heard = time.monotonic()  # the last sign of life: data, or a reply to a probe
        self._probe: threading.Thread | None = None
        self._probe_sent = 0.0

    def heard_from(self) -> None:
        self.heard = time.monotonic()

    def _ask(self) -> None:
        try:
            self.transport.global_request("keepalive@openssh.com", wait=True)
        except Exception:  # the connection closed under the request: check() reports it
            return
        self.heard = time.monotonic()

    def check(self, doing: str) -> None:
        """Raise ConnectError when the peer has not answered for ``interval * count`` s of probing."""
        now = time.monotonic()
        if self._probe is not None and self._probe.is_alive():
            if now - self._probe_sent > self.interval * self.count:
                self.transport.close()
                raise ConnectError(f"{self.label}: no reply from the device for {now - self.heard:.0f}s while "
                                   f"{doing} (frozen, or the link is down)",
                                   hint="check the device's power and network; the command may still be running")
            return
        if now - self.heard >= self.interval:
            self._probe_sent = now
            self._probe = threading.Thread(target=self._ask, name=f"edgeq-alive-{self.label}", daemon=True)
            self._probe.start()


class UploadWatch:
    """Closes the connection when an upload moves nothing for ``frozen_after_s()`` seconds.

    An upload to a frozen device blocks in paramiko's socket write once the kernel's send buffer is full, and
    paramiko retries a timed-out socket write for as long as the transport is open: no channel timeout and no
    keepalive (which waits for the same write lock) ends it. Closing the transport does. ``moved()`` after each
    write; ``error(doing)`` is the ConnectError to raise when the watch closed the connection, else None.
    """

    def __init__(self, transport: paramiko.Transport, label: str):
        self.transport, self.label = transport, label
        self.after_s = frozen_after_s()
        self.moved_at = time.monotonic()
        self.stalled_s: float | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"edgeq-upload-{label}", daemon=True)

    def __enter__(self) -> UploadWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()

    def moved(self) -> None:
        self.moved_at = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.after_s / 4)):
            still = time.monotonic() - self.moved_at
            if still > self.after_s:
                self.stalled_s = still
                self.transport.close()
                return

    def error(self, doing: str) -> ConnectError | None:
        if self.stalled_s is None:
            return None
        return ConnectError(f"{self.label}: nothing moved for {self.stalled_s:.0f}s while {doing} (frozen, or the "
                            "link is down)", hint="check the device's power and network, then deploy again")
