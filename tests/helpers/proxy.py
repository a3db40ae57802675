"""A TCP relay that counts the bytes it forwards and can play a slow link.

It measures what really crossed the wire (resume tests) and caps throughput in total or per
connection, the way a CDN or a busy registry limits each stream (pull benchmarks).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class Pacer:
    """Sleeps just enough to keep the bytes it is told about under `rate` per second."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._started: float | None = None  # pacing starts with the first byte
        self._sent = 0
        self._lock = threading.Lock()

    def account(self, n: int) -> None:
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            if self._started is None:
                self._started = now
            # An idle link saves up no credit beyond a tenth of a second's worth.
            behind = (now - self._started) - self._sent / self.rate
            if behind > 0.1:
                self._started += behind - 0.1
            self._sent += n
            ahead = self._sent / self.rate - (now - self._started)
        if ahead > 0:
            time.sleep(ahead)


class CountingProxy:
    def __init__(
        self,
        target_host: str,
        target_port: int,
        rate: float | None = None,
        connection_rate: float | None = None,
    ) -> None:
        """`rate` caps all server → client bytes per second, `connection_rate` each stream."""
        self.target = (target_host, target_port)
        self._total = Pacer(rate)
        self._connection_rate = connection_rate
        self._slow = bool(rate or connection_rate)
        self.downstream_bytes = 0  # server → client
        self.marks: list[tuple[float, int]] = []  # (time, downstream bytes so far)
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            pacer = Pacer(self._connection_rate)
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, pacer), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, pacer: Pacer | None) -> None:
        size = 1 << 14 if self._slow else 1 << 16
        try:
            while data := src.recv(size):
                dst.sendall(data)
                if pacer is not None:
                    with self._lock:
                        self.downstream_bytes += len(data)
                        self.marks.append((time.monotonic(), self.downstream_bytes))
                    self._total.account(len(data))
                    pacer.account(len(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._closed = True
        self._server.close()
