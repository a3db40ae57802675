"""The relay: runner connections reused while that cannot fail, never a request sent twice;
answers passed on as they arrive, held back by a slow client, cut with an error event when
the runner dies.

The runners here are small HTTP servers on a Unix socket. `Runner` records which connection
carried each request, so the tests can see reuse, expiry and closing as a runner sees them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
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


class Sink:
    """What the relay wrote, as a client would have received it; `gate`, while pending,
    says the client takes nothing more."""

    def __init__(self) -> None:
        self.status = 0
        self.pieces: list[bytes] = []
        self.ended = False
        self.gate: asyncio.Future[None] | None = None

    @property
    def received(self) -> bytes:
        return b"".join(self.pieces)

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status

    def body(self, data: bytes, more: bool) -> None:
        assert self.status and not self.ended
        if data:
            self.pieces.append(data)
        self.ended = not more

    def paused(self) -> asyncio.Future[None] | None:
        return None if self.gate is None or self.gate.done() else self.gate


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    return await reader.readexactly(
        int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    )


async def call(socket: Path, body: bytes) -> tuple[int, bytes]:
    sink = Sink()
    status = await relay.relay(socket, "POST", "/v1/x", {}, body, sink, lambda _: None)
    assert sink.ended and status == sink.status
    return status, sink.received


def run(runner: Handler, tmp_path: Path, scenario: Any) -> None:
    async def main() -> None:
        socket = tmp_path / "runner.sock"
        server = await asyncio.start_unix_server(runner, str(socket))
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

    run(runner.handle, tmp_path, scenario)
    assert runner.connections == 1
    assert [body for _, body in runner.received] == [b"%d" % i for i in range(20)]


def test_an_answer_saying_close_is_not_reused(tmp_path: Path) -> None:
    runner = Runner()

    async def scenario(socket: Path) -> None:
        for body in (b"a", b"close", b"b"):
            assert await call(socket, body) == (200, body)

    run(runner.handle, tmp_path, scenario)
    assert [n for n, _ in runner.received] == [1, 1, 2]


def test_a_closed_connection_is_replaced_before_the_next_request(tmp_path: Path) -> None:
    """llama-server closes after each stream: the next one must not wait for a connect."""
    runner = Runner()

    async def scenario(socket: Path) -> None:
        assert await call(socket, b"close") == (200, b"close")
        await asyncio.sleep(0.05)
        assert (runner.connections, runner.open) == (2, 1)  # opened, nothing sent on it
        assert await call(socket, b"next") == (200, b"next")

    run(runner.handle, tmp_path, scenario)
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

    run(runner.handle, tmp_path, scenario)
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

    run(runner.handle, tmp_path, scenario)
    bodies = sorted(body for _, body in runner.received)
    assert bodies == sorted([b"%d" % i for i in range(16)] * 3)


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    b"Connection: close\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_each_chunk_reaches_the_client_before_the_runner_writes_the_next(tmp_path: Path) -> None:
    sink = Sink()
    events = [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"]

    def arrived(count: int) -> Callable[[], bool]:
        return lambda: len(sink.pieces) == count

    async def runner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STREAM_HEAD)
        for i, event in enumerate(events):
            framed = chunk(event)
            if i == 1:  # a chunk split across reads arrives whole
                writer.write(framed[:5])
                await writer.drain()
                await asyncio.sleep(0.05)
                framed = framed[5:]
            writer.write(framed)
            await writer.drain()
            await until(arrived(i + 1))
        writer.write(b"0\r\n\r\n")
        writer.close()

    async def scenario(socket: Path) -> None:
        assert await relay.relay(socket, "POST", "/v1/x", {}, b"{}", sink, lambda _: None) == 200

    run(runner, tmp_path, scenario)
    assert sink.pieces == events and sink.ended


def test_a_slow_client_holds_the_runner_back_and_loses_nothing(tmp_path: Path) -> None:
    answer = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than the sockets buffer
    sink = Sink()
    drained = asyncio.Event()

    async def runner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(answer), answer))
        await writer.drain()
        drained.set()

    async def scenario(socket: Path) -> None:
        sink.gate = asyncio.get_running_loop().create_future()
        relaying = asyncio.create_task(
            relay.relay(socket, "POST", "/v1/x", {}, b"{}", sink, lambda _: None)
        )
        await until(lambda: bool(sink.pieces))
        await asyncio.sleep(0.3)
        assert not drained.is_set()  # the runner waits on the client
        assert len(sink.received) < len(answer) // 2
        sink.gate.set_result(None)
        assert await relaying == 200
        assert drained.is_set()

    run(runner, tmp_path, scenario)
    assert sink.received == answer and sink.ended


@pytest.mark.parametrize("failure", [b"", b"zz\r\nbroken"], ids=["dies", "bad framing"])
def test_a_stream_cut_short_ends_with_an_error_event(tmp_path: Path, failure: bytes) -> None:
    sink = Sink()

    async def runner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STREAM_HEAD + chunk(b"data: 1\n\n") + failure)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    async def scenario(socket: Path) -> None:
        assert await relay.relay(socket, "POST", "/v1/x", {}, b"{}", sink, lambda _: None) == 200

    run(runner, tmp_path, scenario)
    assert sink.received == b"data: 1\n\n" + relay.RUNNER_DIED_EVENT and sink.ended


def test_a_runner_closing_without_an_answer_is_an_upstream_error(tmp_path: Path) -> None:
    async def runner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.close()

    async def scenario(socket: Path) -> None:
        with pytest.raises(relay.UpstreamError, match="without answering"):
            await relay.relay(socket, "POST", "/v1/x", {}, b"{}", Sink(), lambda _: None)

    run(runner, tmp_path, scenario)
