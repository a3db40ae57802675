"""Relay one HTTP exchange to a runner over its Unix socket, streaming the answer through.

Plain asyncio instead of an HTTP client library: the body goes out unchanged, and the answer
is parsed in the runner connection's own `data_received` and written to a `Sink` (the
client's connection) from there, so each piece the runner writes reaches the client in the
callback that read it: no task switch, no buffering, no added gap between tokens. The
relaying task only waits for the end, and a client that hangs up cancels it, which closes the
runner connection and makes llama-server stop generating.

Connections are reused, which spares the runner an accept and a thread hand-off per request,
but only when reuse cannot fail: after a complete length-delimited answer that did not say
`Connection: close` (llama-server closes after streamed answers, and says so when its
per-connection request budget runs out), and within a second, well inside the 5 s after
which llama-server and uvicorn drop idle connections. A request is never sent twice: there
is nothing to retry because nothing is sent on a connection that may be closing. At most two
idle connections per runner, so they never hold many of llama-server's HTTP threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

_NOT_PASSED = {
    b"server",
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"te",
    b"trailer",
    b"upgrade",
    b"proxy-connection",
    b"access-control-allow-origin",  # the daemon decides CORS, not the runner (spec §2.1)
}
_FRAMING = frozenset({b"transfer-encoding", b"content-length", b"connection", b"content-type"})
# Client headers a runner uses. Credentials for dmr itself stay here.
FORWARDED = ("accept", "anthropic-version", "anthropic-beta")
HEAD_LIMIT = 64 * 1024
REUSE_WINDOW = 1.0  # seconds an idle runner connection is kept for reuse
IDLE_PER_RUNNER = 2
RUNNER_DIED_EVENT = (
    b'data: {"error":{"message":"the runner exited unexpectedly","type":"server_error",'
    b'"code":500}}\n\n'
)

# How a server tells the relay that the client went away, without a task per request
# watching for it: `on_hang_up(callback)` arms it, `on_hang_up(None)` disarms it.
HangUpHook = Callable[[Callable[[], None] | None], None]


class Sink(Protocol):
    """Where an answer goes. Synchronous, so that it can be written from a protocol callback."""

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...

    def body(self, data: bytes, more: bool) -> None: ...

    def paused(self) -> asyncio.Future[None] | None:
        """Done when the receiver takes more again; None while it does."""


class UpstreamError(Exception):
    """The runner closed the connection or could not be reached."""


class _Connection(asyncio.Protocol):
    """A connection to a runner; what arrives is appended to `buffer` and handed to the answer
    being relayed, if any (bytes outside an answer keep the connection from being reused)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Kept, not looked up per request: Python 3.11 asks the kernel for the pid on every
        # `asyncio.get_running_loop()`.
        self.loop = loop
        self.buffer = bytearray()
        self.closed = False
        self.transport: asyncio.Transport | None = None
        self.answer: _Answer | None = None
        self.idle_since = 0.0  # event-loop clock, while in the pool

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.answer is not None:
            self.answer.advance()

    def eof_received(self) -> bool:
        self.connection_lost(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            if self.answer is not None:
                self.answer.runner_closed()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Answer:
    """The runner's answer to one request, parsed as it arrives and written to the sink."""

    def __init__(self, conn: _Connection, sink: Sink) -> None:
        self.conn = conn
        self.sink = sink
        self.done: asyncio.Future[bool] = conn.loop.create_future()
        self.status = 0
        self.framing: str | None = None  # "length", "chunked" or "close", once the head is in
        self.remaining = 0  # of a length-delimited body
        self.keep = False  # the runner allows another request on the connection
        self.event_stream = False

    def advance(self) -> None:
        """Relay what arrived (called from the protocol: a failure goes to the relaying task)."""
        if self.done.done():
            return
        try:
            if self.framing is None and not self._head():
                return
            if self.framing == "length":
                self._length()
            elif self.framing == "chunked":
                self._chunks()
            elif self.conn.buffer:
                self.sink.body(self._take(len(self.conn.buffer)), True)
            if not self.done.done() and (paused := self.sink.paused()) is not None:
                self._pause(paused)
        except Exception as exc:
            if not self.done.done():
                self.done.set_exception(exc)

    def runner_closed(self) -> None:
        if self.done.done():
            return
        try:
            if self.framing is None:
                said = "mid-answer" if self.conn.buffer else "without answering"
                raise UpstreamError(f"the runner closed the connection {said}")
            if self.framing == "close":
                self.sink.body(b"", False)
                self.done.set_result(False)
            else:
                self._cut()
        except Exception as exc:
            self.done.set_exception(exc)

    def _cut(self) -> None:
        """The runner died mid-answer. The status is already sent; an event stream at least gets
        an error event, so clients report a failure instead of a short answer."""
        if self.event_stream:
            self.sink.body(RUNNER_DIED_EVENT, True)
        self.sink.body(b"", False)
        self.done.set_result(False)

    def _take(self, size: int) -> bytes:
        buffer = self.conn.buffer
        if size >= len(buffer):
            data = bytes(buffer)
            buffer.clear()
            return data
        data = bytes(buffer[:size])
        del buffer[:size]
        return data

    def _head(self) -> bool:
        """Parse the head, once it is all in, and start the answer; False until then."""
        buffer = self.conn.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > HEAD_LIMIT:
                raise UpstreamError("bad answer from the runner: the response head is too large")
            return False
        status_line, *lines = self._take(end + 4)[:-4].split(b"\r\n")
        try:
            status = int(status_line.split(b" ", 2)[1])
        except (ValueError, IndexError) as exc:
            raise UpstreamError(f"bad answer from the runner: {status_line!r}") from exc
        passed, fields = [], {}
        for line in lines:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            if name in _FRAMING:
                fields[name] = value
            # Content-Length passes (the body is relayed byte for byte); chunked framing is
            # redone by the server; CORS is the daemon's to answer, not the runner's.
            if name not in _NOT_PASSED:
                passed.append((name, value))
        self.event_stream = fields.get(b"content-type", b"").startswith(b"text/event-stream")
        if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
            self.framing = "chunked"
        elif b"content-length" in fields:
            try:
                self.remaining = int(fields[b"content-length"])
            except ValueError as exc:
                raise UpstreamError("bad answer from the runner: its Content-Length") from exc
            self.framing = "length"
            self.keep = fields.get(b"connection", b"").lower() != b"close"
        else:
            self.framing = "close"
        self.status = status
        self.sink.start(status, passed)
        return True

    def _length(self) -> None:
        if self.conn.buffer:
            data = self._take(self.remaining)
            self.remaining -= len(data)
            # The last piece ends the answer: one write for most answers, head included.
            self.sink.body(data, self.remaining > 0)
        elif self.remaining == 0:
            self.sink.body(b"", False)
        if self.remaining == 0:
            # Bytes after the answer mean the connection is out of step: not reused.
            self.done.set_result(self.keep and not self.conn.buffer)

    def _chunks(self) -> None:
        """Unframe the complete chunks at hand; they go on in one piece."""
        buffer = self.conn.buffer
        pieces: list[bytes] = []
        at = 0
        last = broken = False
        while (eol := buffer.find(b"\r\n", at)) >= 0:
            try:
                size = int(bytes(buffer[at:eol]).split(b";", 1)[0].strip() or b"0", 16)
            except ValueError:
                broken = True  # the answer cannot be read past here
                break
            if size == 0:
                last = True  # trailers, if any, are dropped with the connection
                break
            if len(buffer) < eol + 2 + size + 2:
                break
            pieces.append(bytes(buffer[eol + 2 : eol + 2 + size]))
            at = eol + 2 + size + 2
        del buffer[:at]
        if pieces or last:
            self.sink.body(b"".join(pieces), not last)
        if last:
            self.done.set_result(False)
        elif broken:
            self._cut()

    def _pause(self, paused: asyncio.Future[None]) -> None:
        """Stop reading from a runner whose client is slower, until the client catches up."""
        transport = self.conn.transport
        if transport is None or self.conn.closed:
            return
        transport.pause_reading()

        def resume(_: object) -> None:
            if not self.conn.closed:
                transport.resume_reading()

        paused.add_done_callback(resume)


_idle: dict[Path, list[_Connection]] = {}
_sweeps: dict[Path, asyncio.TimerHandle] = {}  # one timer a pool, not one a request
_spares: dict[Path, asyncio.Task[None]] = {}  # connections being opened ahead of need


async def _connect(socket: Path) -> _Connection:
    pool = _idle.get(socket)
    while pool:
        conn = pool.pop()
        age = conn.loop.time() - conn.idle_since
        fresh = not conn.closed and not conn.buffer and age < REUSE_WINDOW
        if fresh and conn.transport is not None and not conn.transport.is_closing():
            return conn
        conn.close()
    return await _open(socket, asyncio.get_running_loop())


async def _open(socket: Path, loop: asyncio.AbstractEventLoop) -> _Connection:
    try:
        _, conn = await loop.create_unix_connection(lambda: _Connection(loop), str(socket))
    except OSError as exc:
        raise UpstreamError(f"runner socket unavailable: {exc.strerror or exc}") from exc
    return conn


def _keep(socket: Path, conn: _Connection) -> None:
    pool = _idle.setdefault(socket, [])
    if len(pool) >= IDLE_PER_RUNNER or conn.buffer:
        conn.close()
        return
    loop = conn.loop
    conn.idle_since = loop.time()
    pool.append(conn)
    if socket not in _sweeps:
        _sweeps[socket] = loop.call_later(REUSE_WINDOW, _sweep, socket)


def _open_spare(socket: Path, loop: asyncio.AbstractEventLoop) -> None:
    """Open the next request's connection now. llama-server closes its connection after
    every streamed answer, and connecting first would delay the next stream's first token.
    A connection that never carried a request is as safe to use as a new one."""
    if socket in _spares or _idle.get(socket):
        return

    async def spare() -> None:
        try:
            conn = await _open(socket, loop)
        except UpstreamError:
            return  # the runner is gone; the next request reports it
        finally:
            del _spares[socket]
        _keep(socket, conn)

    _spares[socket] = loop.create_task(spare())


def _sweep(socket: Path) -> None:
    """Close the connections idle for the whole reuse window; come back for the others."""
    del _sweeps[socket]
    loop = asyncio.get_running_loop()
    now = loop.time()
    pool = _idle.get(socket, [])
    for conn in [c for c in pool if now - c.idle_since >= REUSE_WINDOW]:
        pool.remove(conn)
        conn.close()
    if pool:
        oldest = min(c.idle_since for c in pool)
        _sweeps[socket] = loop.call_later(oldest + REUSE_WINDOW - now, _sweep, socket)
    else:
        _idle.pop(socket, None)


async def relay(
    socket: Path,
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    sink: Sink,
    on_hang_up: HangUpHook,
) -> int:
    """Send the request to the runner and relay its answer to SINK.

    Returns the runner's status (499 when the client went away). Raises UpstreamError when
    nothing was sent to the sink yet; after the answer started, a failure just ends it early.
    """
    # The daemon parsed the body as JSON already; saying so spares runners that check the
    # header (llama-cpp-python does) from clients that send none (`curl -d`).
    head = [f"{method} {path} HTTP/1.1", "Host: localhost", "Content-Type: application/json"]
    head += [f"{name}: {headers[name]}" for name in FORWARDED if name in headers]
    head.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    conn = await _connect(socket)
    answer = conn.answer = _Answer(conn, sink)
    relaying = asyncio.current_task(conn.loop)
    assert relaying is not None and conn.transport is not None
    hung_up = False

    def hang_up() -> None:
        nonlocal hung_up
        if not hung_up and not answer.done.done():
            hung_up = True
            relaying.cancel()  # closes the runner connection below: llama-server stops

    on_hang_up(hang_up)
    reusable = answered = False
    try:
        conn.transport.write(request)
        reusable = await answer.done
        answered = True
        return answer.status
    except asyncio.CancelledError:
        if hung_up:
            return 499
        raise
    finally:
        on_hang_up(None)
        conn.answer = None
        if reusable:
            _keep(socket, conn)
        else:
            conn.close()
            if answered:
                _open_spare(socket, conn.loop)
