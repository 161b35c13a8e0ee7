"""A TCP proxy in front of a test peer (Samba, the vCenter simulator) that shapes what
comes back from the server: a rate shared by every connection, and connections cut
mid-transfer. Every byte still comes from the peer."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Throttle:
    """What the proxy does to the traffic: bytes per second from the server over
    all connections together (0: as fast as it goes), and cutting every open connection
    once `cut_after` more bytes have gone through."""

    rate: float = 0.0
    next_free: float = 0.0
    cut_after: int | None = None
    cuts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    open: set[socket.socket] = field(default_factory=set)

    def pace(self, count: int) -> None:
        """Hold `count` bytes from the server until the rate, shared by every connection,
        lets them through."""
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            self.next_free = max(now, self.next_free) + count / self.rate
            wait = self.next_free - now
        time.sleep(wait)

    def passed(self, count: int) -> bool:
        """Count bytes from the server; True when the connections are to be cut now."""
        with self.lock:
            if self.cut_after is None:
                return False
            self.cut_after -= count
            if self.cut_after > 0:
                return False
            self.cut_after = None
            self.cuts += 1
            return True

    def cut(self) -> None:
        with self.lock:
            sockets = list(self.open)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def start_proxy(upstream: int, throttle: Throttle) -> int:
    """A TCP proxy to 127.0.0.1:`upstream` on a free port, shaped by `throttle`."""
    listener = socket.create_server(("127.0.0.1", 0))

    def pump(source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        try:
            while data := source.recv(256 << 10):
                if from_server:
                    throttle.pace(len(data))
                    if throttle.passed(len(data)):
                        throttle.cut()
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with throttle.lock:
                    throttle.open.discard(sock)

    def serve() -> None:
        while True:
            client, _ = listener.accept()
            server = socket.create_connection(("127.0.0.1", upstream))
            with throttle.lock:
                throttle.open |= {client, server}
            threading.Thread(target=pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=pump, args=(server, client, True), daemon=True).start()

    threading.Thread(target=serve, daemon=True, name="tcp-proxy").start()
    return int(listener.getsockname()[1])
