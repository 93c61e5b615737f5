"""Liveness of an SSH connection while a command is silent: a frozen device is reported within a bound."""

from __future__ import annotations

import os
import threading
import time

import paramiko

from edgeq.errors import ConnectError

# A silent command's connection is probed after ALIVE_INTERVAL s; no reply for ALIVE_INTERVAL * ALIVE_COUNT s
# (45 s) is a frozen peer (EDGEQ_ALIVE_INTERVAL, EDGEQ_ALIVE_COUNT).
ALIVE_INTERVAL = 15.0
ALIVE_COUNT = 3


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
