"""The reference point the inference goals were set against: a plain asyncio relay that
forwards each request's bytes to a runner socket and the answer's bytes back, with no HTTP
handling beyond finding the end of the request. benches/inference.py starts one per runner
so that dmr's added latency can be read against what any relay process costs on the same
machine in the same run.

    python benches/plain_relay.py LISTEN_SOCKET RUNNER_SOCKET
"""

from __future__ import annotations

import asyncio
import sys


class Requests(asyncio.Protocol):
    """A server connection that hands on each whole request: `request(raw, head, body)`,
    with the head lowercased. Only what the benches send: Content-Length bodies."""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            at = head.find(b"content-length:")
            size = end + 4 + (int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0)
            if len(self.buffer) < size:
                return
            raw, self.buffer = self.buffer[:size], self.buffer[size:]
            self.request(raw, head, raw[end + 4 :])

    def request(self, raw: bytes, head: bytes, body: bytes) -> None:
        raise NotImplementedError


class _Upstream(asyncio.Protocol):
    def __init__(self, client: _Client) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        assert self.client.transport is not None
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client.transport is not None:
            self.client.transport.close()


class _Client(Requests):
    def __init__(self, runner: str) -> None:
        super().__init__()
        self.runner = runner

    def request(self, raw: bytes, head: bytes, body: bytes) -> None:
        asyncio.get_running_loop().create_task(self._forward(raw))

    async def _forward(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        upstream, _ = await loop.create_unix_connection(lambda: _Upstream(self), self.runner)
        upstream.write(request)


async def main(listen: str, runner: str) -> None:
    await asyncio.get_running_loop().create_unix_server(lambda: _Client(runner), listen)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main(sys.argv[1], sys.argv[2]))
    except ImportError:
        asyncio.run(main(sys.argv[1], sys.argv[2]))
