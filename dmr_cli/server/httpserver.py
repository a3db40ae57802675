"""A lean HTTP/1.1 server for the daemon's ASGI app.

uvicorn costs about 0.25 ms per request on this class of machine before the app runs; the
inference goal is 0.2 ms for all of dmr. This server does only what the daemon needs: HTTP/1.1
with keep-alive and pipelining (httptools parses), ASGI 3 http and lifespan, chunked or
length-delimited responses, back-pressure both ways, client hang-up reported as
`http.disconnect`, a graceful stop on SIGTERM/SIGINT. No websockets, no HTTP/2, no TLS (the
daemon binds loopback or a Unix socket; put a proxy in front for anything else).

The response head waits for the first body chunk of the same event-loop turn, so a small
answer leaves in one write; a head whose body comes later (a stream) is flushed at the end
of the turn.

Two extensions in the scope serve the inference relay: `dmr.sink`, the exchange itself, whose
synchronous `start`/`body`/`paused` write a response without ASGI messages (relay.Sink), and
whose `extra_headers` every response of the exchange carries; and `dmr.hang_up`, which
reports a client going away to a callback instead of to a task waiting on `receive()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools
from starlette.types import ASGIApp, Message, Scope

from dmr_cli.errors import DmrError

log = logging.getLogger("dmr")

HIGH_WATER = 64 * 1024  # pause reading a request body the app has not consumed yet
IDLE_TIMEOUT = 75.0  # an idle keep-alive connection closes after this (nginx's default)
DRAIN_TIMEOUT = 5.0  # time to send the rest of a body that was answered early
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_NO_BODY_STATUS = {204, 304}
_ASGI = {"version": "3.0", "spec_version": "2.3"}
_DISCONNECT: Message = {"type": "http.disconnect"}
_INERT_PARSER = httptools.HttpRequestParser(None)  # calls nothing back


class _Date:
    """The Date header, formatted once a second."""

    second = 0
    value = b""

    @classmethod
    def header(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.value = b"date: " + email.utils.formatdate(now, usegmt=True).encode() + b"\r\n"
        return cls.value


class Cycle:
    """One request and its response."""

    __slots__ = (
        "chunked",
        "complete",
        "conn",
        "delivered",
        "disconnected",
        "ended",
        "expect_continue",
        "extra_headers",
        "hang_up",
        "head",
        "head_only",
        "keep_alive",
        "received",
        "scope",
        "started",
        "waiter",
    )

    def __init__(self, conn: Connection, scope: Scope, keep_alive: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.received: deque[bytes] = deque()  # request body not yet delivered
        self.complete = False  # the whole request body has arrived
        self.delivered = False  # ... and was handed to the app
        self.disconnected = False
        self.started = False
        self.ended = False
        self.chunked = False
        self.head_only = scope["method"] == "HEAD"
        self.head: bytes | None = None  # written with the first body chunk
        self.waiter: asyncio.Future[None] | None = None
        self.expect_continue = False
        self.hang_up: Callable[[], None] | None = None
        # Headers every response of this exchange carries (the CORS answer to its Origin).
        self.extra_headers: tuple[tuple[bytes, bytes], ...] = ()

    def on_hang_up(self, callback: Callable[[], None] | None) -> None:
        """The `dmr.hang_up` extension: CALLBACK runs when the client goes away, at once
        if it is gone already; None disarms it."""
        self.hang_up = callback
        if callback is not None and self.disconnected:
            callback()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def receive(self) -> Message:
        if not self.delivered:
            while not (self.received or self.complete or self.disconnected or self.ended):
                if self.expect_continue:
                    self.expect_continue = False
                    self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.conn.resume_reading()
                await self._wait()
            if not (self.disconnected or self.ended):
                received = self.received
                chunk = received.popleft() if len(received) == 1 else b"".join(received)
                received.clear()
                more = not self.complete
                if more:
                    self.conn.resume_reading()
                else:
                    self.delivered = True
                return {"type": "http.request", "body": chunk, "more_body": more}
        # The body is delivered: a later receive() returns when the client goes away (or
        # the response ended, as ASGI servers do).
        while not (self.disconnected or self.ended):
            await self._wait()
        return _DISCONNECT

    def _wait(self) -> asyncio.Future[None]:
        self.waiter = self.conn.loop.create_future()
        return self.waiter

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            self.body(message.get("body", b""), message.get("more_body", False))
            if not self.ended and (paused := self.conn.write_paused) is not None:
                await paused
        elif kind == "http.response.start":
            self.start(message["status"], message.get("headers", ()))
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    # -- the `dmr.sink` extension: the response written without ASGI messages (relay.Sink) --

    def start(self, status: int, headers: Any) -> None:
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self.head = self._head(status, headers)
        self.conn.loop.call_soon(self._flush_head)

    def body(self, data: bytes, more: bool) -> None:
        if not self.started or self.ended:
            raise RuntimeError("response body outside a started response")
        if self.disconnected:
            return
        out = []
        if self.head is not None:
            out.append(self.head)
            self.head = None
        if data and not self.head_only:
            out.append(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        if not more:
            if self.chunked and not self.head_only:
                out.append(b"0\r\n\r\n")
            self.ended = True
        if out:
            self.conn.write(out[0] if len(out) == 1 else b"".join(out))
        if self.ended:
            self.wake()
            self.conn.cycle_done(self)

    def paused(self) -> asyncio.Future[None] | None:
        return self.conn.write_paused

    def _head(self, status: int, headers: Any) -> bytes:
        lines = [b"HTTP/1.1 %d %b\r\n" % (status, _REASONS.get(status, b""))]
        has_length = False
        if self.extra_headers:
            headers = [*headers, *self.extra_headers]
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"content-length":
                has_length = True
            elif lowered == b"connection" and value.lower() == b"close":
                self.keep_alive = False
                continue
            elif lowered == b"transfer-encoding":
                continue  # framing is ours to choose
            lines.append(b"%b: %b\r\n" % (name, value))
        if not has_length and status not in _NO_BODY_STATUS and not self.head_only:
            self.chunked = True
            lines.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive:
            lines.append(b"connection: close\r\n")
        lines.append(_Date.header())
        lines.append(b"\r\n")
        return b"".join(lines)

    def _flush_head(self) -> None:
        if self.head is not None and not self.disconnected:
            self.conn.write(self.head)
            self.head = None


class Connection(asyncio.Protocol):
    """One client connection: parses requests and runs one cycle at a time."""

    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop  # passed in: `asyncio.get_running_loop()` costs a syscall on 3.11
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self.parsing: Cycle | None = None  # the request being parsed
        self.cycle: Cycle | None = None  # the request being answered
        self.pipeline: deque[Cycle] = deque()
        self.write_paused: asyncio.Future[None] | None = None
        self.reading_paused = False
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.idle: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        if not self.server.unix:  # addresses mean nothing on a Unix socket, and cost 40 µs
            peer, local = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
            self.client = tuple(peer[:2]) if isinstance(peer, tuple) else None
            self.local = tuple(local[:2]) if isinstance(local, tuple) else None
        self.server.connections.add(self)
        self.idle = self.loop.call_later(IDLE_TIMEOUT, self.close_if_idle)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, b"upgrades are not supported")
        except httptools.HttpParserError:
            self._refuse(400, b"malformed request")

    def connection_lost(self, exc: Exception | None) -> None:
        # The parser's callbacks and the transport refer back to this connection: dropped,
        # refcounting frees it and the garbage collector never has to stop the daemon.
        self.parser = _INERT_PARSER
        self.transport = None
        self.server.connections.discard(self)
        if self.idle is not None:
            self.idle.cancel()
        for cycle in (self.cycle, self.parsing, *self.pipeline):
            if cycle is not None:
                cycle.disconnected = True
                cycle.wake()
                if cycle.hang_up is not None:
                    cycle.hang_up()
        if self.write_paused is not None and not self.write_paused.done():
            self.write_paused.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.write_paused is not None and not self.write_paused.done():
            self.write_paused.set_result(None)
        self.write_paused = None

    # -- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parsed = httptools.parse_url(self.url)
        raw_path = parsed.path
        method = self.parser.get_method().decode("ascii")
        scope: Scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": self.parser.get_http_version(),
            "server": self.local,
            "client": self.client,
            "scheme": "http",
            "method": method,
            "root_path": "",
            "path": unquote(raw_path.decode("ascii", "replace")),
            "raw_path": raw_path,
            "query_string": parsed.query or b"",
            "headers": self.headers,
            "state": {},
        }
        cycle = Cycle(self, scope, self.parser.should_keep_alive())
        scope["extensions"] = {"dmr.hang_up": cycle.on_hang_up, "dmr.sink": cycle}
        cycle.expect_continue = (b"expect", b"100-continue") in self.headers
        self.parsing = cycle
        if self.cycle is None:
            self._start(cycle)
        else:
            self.pipeline.append(cycle)
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        cycle = self.parsing
        if cycle is None or cycle.disconnected or cycle.ended:
            return
        cycle.received.append(body)
        cycle.expect_continue = False
        if sum(map(len, cycle.received)) > HIGH_WATER:
            self.pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        cycle = self.parsing
        self.parsing = None
        if cycle is not None:
            cycle.complete = True
            cycle.wake()
            if cycle.ended and cycle is self.cycle:  # a drained body ended: go on
                if self.idle is not None:
                    self.idle.cancel()
                    self.idle = None
                self.cycle_done(cycle)

    # -- cycles ----------------------------------------------------------------------------

    def _start(self, cycle: Cycle) -> None:
        self.cycle = cycle
        self.server.run(cycle)

    def cycle_done(self, cycle: Cycle) -> None:
        """The response ended: go on with the next request, or close."""
        if cycle is not self.cycle or self.transport is None:
            return
        if not cycle.complete and not cycle.disconnected:
            # Answered before the body was read (a 400 for an oversized body): read the rest
            # and drop it, as Go's server does, so the client sees the answer and not a
            # reset connection.
            self.idle = self.loop.call_later(DRAIN_TIMEOUT, self.transport.close)
            if self.reading_paused:
                self.reading_paused = False
                self.transport.resume_reading()
            return
        self.cycle = None
        if not cycle.keep_alive or self.server.stopping:
            self.transport.close()
            return
        if self.pipeline:
            self._start(self.pipeline.popleft())
        else:
            self.idle = self.loop.call_later(IDLE_TIMEOUT, self.close_if_idle)
        self.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.pipeline:
            self.reading_paused = False
            self.transport.resume_reading()

    def close_if_idle(self) -> None:
        if self.cycle is None and self.parsing is None and self.transport is not None:
            self.transport.close()

    def _refuse(self, status: int, reason: bytes) -> None:
        if self.transport is None:
            return
        if self.cycle is None or not self.cycle.started:
            body = reason + b"\n"
            self.write(
                b"HTTP/1.1 %d %b\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%b"
                % (status, _REASONS[status], len(body), body)
            )
        self.transport.close()


class Server:
    """Runs the ASGI app's cycles and its lifespan; stops gracefully."""

    def __init__(self, app: ASGIApp, graceful_timeout: float = 5.0) -> None:
        self.app = app
        self.graceful_timeout = graceful_timeout
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.unix = False
        self.listening = asyncio.Event()
        self.port = 0  # the TCP port bound (useful with port 0)

    def run(self, cycle: Cycle) -> None:
        task = cycle.conn.loop.create_task(self._run(cycle))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, cycle: Cycle) -> None:
        try:
            await self.app(cycle.scope, cycle.receive, cycle.send)
        except BaseException as exc:  # the app's failure must not take the server down
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("error answering %s %s", cycle.scope["method"], cycle.scope["path"])
            if not cycle.started and not cycle.disconnected:
                cycle.keep_alive = False
                await cycle.send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                    }
                )
                await cycle.send({"type": "http.response.body", "body": b"internal error\n"})
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            if not cycle.ended:
                # The app returned without finishing its answer: the framing is broken.
                cycle.ended = True
                if cycle.conn.transport is not None:
                    cycle.conn.transport.close()
            del cycle.scope["extensions"]  # they refer to the cycle: a reference cycle

    async def serve(
        self, host: str, port: int, uds: str | None, stop: asyncio.Event | None = None
    ) -> None:
        """Serve until STOP is set (by default: until SIGTERM or SIGINT)."""
        if stop is None:
            stop = asyncio.Event()
            for signum in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        lifespan = Lifespan(self.app)
        await lifespan.startup()
        try:
            server = await self._listen(host, port, uds)
            if not uds:
                self.port = server.sockets[0].getsockname()[1]
            self.listening.set()
            await stop.wait()
            self.stopping = True
            server.close()
            for conn in list(self.connections):
                conn.close_if_idle()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain(), self.graceful_timeout)
            for task in list(self.tasks):
                task.cancel()
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.close()
        finally:
            if uds:
                with contextlib.suppress(OSError):
                    os.unlink(uds)
            await lifespan.shutdown()

    async def _listen(self, host: str, port: int, uds: str | None) -> asyncio.Server:
        loop = asyncio.get_running_loop()

        def connection() -> Connection:
            return Connection(self, loop)

        try:
            if uds:
                self.unix = True
                server = await loop.create_unix_server(connection, uds, backlog=1024)
                os.chmod(uds, 0o600)  # the socket is the daemon: only its owner may talk to it
                return server
            return await loop.create_server(
                connection, host, port, backlog=1024, reuse_address=True
            )
        except OSError as exc:
            where = uds or f"{host}:{port}"
            raise DmrError(
                f"cannot listen on {where}: {exc.strerror or exc}",
                hint="is another `dmr serve` running? `dmr status` says; or pick --port",
            ) from exc

    async def _drain(self) -> None:
        while self.tasks:
            await asyncio.wait(list(self.tasks))


class Lifespan:
    """ASGI lifespan: startup before listening, shutdown after the last request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.events: dict[str, asyncio.Event] = {}
        self.failure: str | None = None
        self.task: asyncio.Task[None] | None = None

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind.endswith(".failed"):
            self.failure = message.get("message", "") or kind
        self.events.setdefault(kind.rsplit(".", 1)[0], asyncio.Event()).set()

    async def _call(self, phase: str) -> None:
        done = self.events.setdefault(f"lifespan.{phase}", asyncio.Event())
        if self.task is None:
            scope = {"type": "lifespan", "asgi": _ASGI, "state": {}}
            self.task = asyncio.ensure_future(self.app(scope, self.queue.get, self._send))
        await self.queue.put({"type": f"lifespan.{phase}"})
        waiter = asyncio.create_task(done.wait())
        await asyncio.wait({waiter, self.task}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self.task.done() and not done.is_set():
            self.task.result()  # the app raised: let it propagate
            raise RuntimeError(f"the app ended during {phase}")
        if self.failure:
            raise RuntimeError(f"{phase} failed: {self.failure}")

    async def startup(self) -> None:
        await self._call("startup")

    async def shutdown(self) -> None:
        if self.task is not None and not self.task.done():
            await self._call("shutdown")


def run(app: ASGIApp, host: str, port: int, uds: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT, on uvloop when it is installed."""
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(Server(app).serve(host, port, uds))
