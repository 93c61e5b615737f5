"""A TCP relay that holds each direction's bytes for a fixed delay: a round-trip time where ``tc netem`` is
missing (kernels built without sch_netem, as some VM kernels are).

    with DelayRelay(("10.200.1.2", 22), one_way_ms=25, jitter_ms=5) as relay:
        relay.port                       # connect to 127.0.0.1:relay.port for a 50 ms RTT to the device

Each chunk read from one side is written to the other ``one_way_ms`` (+- jitter) later, in order. Bandwidth is
not limited, and the relay reads as fast as the sender writes, so what bounds the bytes in flight is the
application's own window (SSH channel and SFTP request windows): that is what a long fat link exposes, and
what this is for. TCP's own congestion control sees two short loopback hops instead of one long one, unlike
netem; results are labelled with it.
"""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import threading
import time

CHUNK = 64 * 1024


class DelayRelay:
    def __init__(self, upstream: tuple[str, int], one_way_ms: float, jitter_ms: float = 0.0, seed: int = 0):
        self.upstream = upstream
        self.delay_s, self.jitter_s = one_way_ms / 1000.0, jitter_ms / 1000.0
        self._random = random.Random(seed)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = threading.Event()

    def __enter__(self) -> DelayRelay:
        threading.Thread(target=self._accept, name="delay-relay", daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                self._pipe(source, sink)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        held: collections.deque[tuple[float, bytes]] = collections.deque()
        ready = threading.Condition()

        def read() -> None:
            last_due = 0.0
            while True:
                try:
                    data = source.recv(CHUNK)
                except OSError:
                    data = b""
                jitter = self._random.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0
                due = max(last_due, time.monotonic() + self.delay_s + jitter)  # jitter never reorders
                last_due = due
                with ready:
                    held.append((due, data))
                    ready.notify()
                if not data:
                    return

        def write() -> None:
            while True:
                with ready:
                    while not held:
                        ready.wait()
                    due, data = held.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    if not data:
                        sink.shutdown(socket.SHUT_WR)
                        return
                    sink.sendall(data)
                except OSError:
                    with contextlib.suppress(OSError):
                        source.shutdown(socket.SHUT_RD)
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()


def main() -> None:
    """``python -m tests.lab.delay_relay HOST PORT ONE_WAY_MS [JITTER_MS]``: relay until killed, printing the
    local port first. A benchmark runs the relay in a process of its own, so that its threads do not share
    an interpreter lock with the transfer being measured."""
    import sys

    host, port, one_way_ms = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    jitter_ms = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    relay = DelayRelay((host, port), one_way_ms, jitter_ms)
    print(relay.port, flush=True)
    relay._accept()


if __name__ == "__main__":
    main()
