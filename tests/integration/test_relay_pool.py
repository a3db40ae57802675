"""The relay's runner connections: reused while that cannot fail, never a request sent twice.

The runner here is a small HTTP server on a Unix socket that records which connection carried
each request, so the tests can see reuse, expiry and closing as a runner sees them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dmr_cli.server import relay


class Runner:
    """Answers each request with its body, `Connection: close` when the body asks for it;
    closes a connection that stays idle for `idle_close` seconds, as llama-server does."""

    def __init__(self, idle_close: float = 60.0) -> None:
        self.idle_close = idle_close
        self.received: list[tuple[int, bytes]] = []  # (connection number, body)
        self.connections = 0
        self.open = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        number = self.connections
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_close)
                except (asyncio.TimeoutError, asyncio.IncompleteReadError):
                    return
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                self.received.append((number, body))
                close = body == b"close"
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%b\r\n%b"
                    % (len(body), b"Connection: close\r\n" if close else b"", body)
                )
                await writer.drain()
                if close:
                    return
        finally:
            self.open -= 1
            writer.close()


async def call(socket: Path, body: bytes) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    status = await relay.relay(socket, "POST", "/v1/x", {}, body, send, receive, lambda _: None)
    assert sent[-1]["more_body"] is False
    return status, b"".join(m.get("body", b"") for m in sent[1:])


def run(runner: Runner, tmp_path: Path, scenario: Any) -> None:
    async def main() -> None:
        socket = tmp_path / "runner.sock"
        server = await asyncio.start_unix_server(runner.handle, str(socket))
        try:
            await scenario(socket)
        finally:
            server.close()
            relay._idle.clear()
            for sweep in relay._sweeps.values():
                sweep.cancel()
            relay._sweeps.clear()
            relay._spares.clear()

    asyncio.run(main())


def test_sequential_requests_share_one_connection(tmp_path: Path) -> None:
    runner = Runner()

    async def scenario(socket: Path) -> None:
        for i in range(20):
            assert await call(socket, b"%d" % i) == (200, b"%d" % i)

    run(runner, tmp_path, scenario)
    assert runner.connections == 1
    assert [body for _, body in runner.received] == [b"%d" % i for i in range(20)]


def test_an_answer_saying_close_is_not_reused(tmp_path: Path) -> None:
    runner = Runner()

    async def scenario(socket: Path) -> None:
        for body in (b"a", b"close", b"b"):
            assert await call(socket, body) == (200, body)

    run(runner, tmp_path, scenario)
    assert [n for n, _ in runner.received] == [1, 1, 2]


def test_a_closed_connection_is_replaced_before_the_next_request(tmp_path: Path) -> None:
    """llama-server closes after each stream: the next one must not wait for a connect."""
    runner = Runner()

    async def scenario(socket: Path) -> None:
        assert await call(socket, b"close") == (200, b"close")
        await asyncio.sleep(0.05)
        assert (runner.connections, runner.open) == (2, 1)  # opened, nothing sent on it
        assert await call(socket, b"next") == (200, b"next")

    run(runner, tmp_path, scenario)
    assert runner.received == [(1, b"close"), (2, b"next")]


def test_idle_connections_close_after_the_reuse_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closed by dmr well before the runner's own idle timeout, so a request never meets a
    connection the runner is closing; the next request opens a new one."""
    monkeypatch.setattr(relay, "REUSE_WINDOW", 0.2)
    runner = Runner(idle_close=0.6)

    async def scenario(socket: Path) -> None:
        await call(socket, b"first")
        await asyncio.sleep(0.4)
        assert runner.open == 0  # the sweep closed it
        assert await call(socket, b"second") == (200, b"second")

    run(runner, tmp_path, scenario)
    assert runner.received == [(1, b"first"), (2, b"second")]


def test_concurrent_requests_each_arrive_once(tmp_path: Path) -> None:
    runner = Runner()

    async def scenario(socket: Path) -> None:
        for _ in range(3):
            bodies = [b"%d" % i for i in range(16)]
            results = await asyncio.gather(*(call(socket, b) for b in bodies))
            assert results == [(200, b) for b in bodies]
            await asyncio.sleep(0.05)
            assert runner.open <= relay.IDLE_PER_RUNNER  # the rest closed once answered

    run(runner, tmp_path, scenario)
    bodies = sorted(body for _, body in runner.received)
    assert bodies == sorted([b"%d" % i for i in range(16)] * 3)
