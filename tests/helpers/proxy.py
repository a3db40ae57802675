"""A TCP relay that counts the bytes it forwards: measures what really crossed the wire."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class CountingProxy:
    def __init__(self, target_host: str, target_port: int, rate: float | None = None) -> None:
        """`rate` caps the total server → client bytes per second (a slow link)."""
        self.target = (target_host, target_port)
        self.rate = rate
        self._started: float | None = None  # pacing starts with the first byte
        self.downstream_bytes = 0  # server → client
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
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(1 << 16 if self.rate is None else 1 << 14):
                dst.sendall(data)
                if count:
                    with self._lock:
                        if self._started is None:
                            self._started = time.monotonic()
                        self.downstream_bytes += len(data)
                        ahead = (
                            self.downstream_bytes / self.rate - (time.monotonic() - self._started)
                            if self.rate
                            else 0.0
                        )
                    if ahead > 0:
                        time.sleep(ahead)
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
