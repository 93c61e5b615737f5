"""Connections to devices: one small ``Transport`` interface, on SSH (paramiko) or on this machine.

``open_transport(target)`` connects (SSH) or not (the built-in ``local`` target) and returns a transport
to use as a context manager::

    with open_transport(target) as t:
        t.run(["uname", "-m"], timeout=10).stdout
"""

from __future__ import annotations

from edgeq.remote.base import CommandResult, RunningCommand, Transport, shell_join
from edgeq.targets import Target

__all__ = ["CommandResult", "RunningCommand", "Transport", "open_transport", "shell_join"]


def open_transport(target: Target, connect_timeout: float | None = None) -> Transport:
    """A connected transport for ``target``; raises ConnectError naming the host when it cannot connect."""
    if target.local:
        from edgeq.remote.local import LocalTransport

        return LocalTransport(target)
    from edgeq.remote.ssh import CONNECT_TIMEOUT, SSHTransport

    return SSHTransport(target, connect_timeout=connect_timeout or CONNECT_TIMEOUT)
