"""Relay one HTTP exchange to a runner over its Unix socket, streaming the answer through.

Plain asyncio instead of an HTTP client library: the body goes out unchanged, every chunk
the runner writes is handed to the client as soon as it is read (no buffering, so no added
gap between tokens), and a client that hangs up closes the runner connection, which makes
llama-server stop generating. The runner connection is a bare protocol whose bytes land in
one buffer that the relay parses in place: every request passes here, and asyncio's stream
classes cost several times more per exchange.

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

from starlette.types import Receive, Send

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
HIGH_WATER = 1 << 20  # stop reading from a runner whose client is slower than it
HEAD_LIMIT = 64 * 1024
REUSE_WINDOW = 1.0  # seconds an idle runner connection is kept for reuse
IDLE_PER_RUNNER = 2
RUNNER_DIED_EVENT = (
    b'data: {"error":{"message":"the runner exited unexpectedly","type":"server_error",'
    b'"code":500}}\n\n'
)

# How a server tells the relay that the client went away, without a task per request
# watching `receive()`: `on_hang_up(callback)` arms it, `on_hang_up(None)` disarms it.
HangUpHook = Callable[[Callable[[], None] | None], None]


class UpstreamError(Exception):
    """The runner closed the connection or could not be reached."""


class _Connection(asyncio.Protocol):
    """A connection to a runner: what arrives is appended to `buffer`."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.closed = False
        self.paused = False
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.idle_since = 0.0  # event-loop clock, while in the pool

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > HIGH_WATER and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def more(self) -> None:
        """Wait until more bytes arrived; UpstreamError when the runner closed instead."""
        if self.closed:
            raise UpstreamError("the runner closed the connection mid-answer")
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter

    def take(self, size: int) -> bytes:
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


_idle: dict[Path, list[_Connection]] = {}
_sweeps: dict[Path, asyncio.TimerHandle] = {}  # one timer a pool, not one a request
_spares: dict[Path, asyncio.Task[None]] = {}  # connections being opened ahead of need


async def _connect(socket: Path) -> _Connection:
    pool = _idle.get(socket)
    now = asyncio.get_running_loop().time()
    while pool:
        conn = pool.pop()
        fresh = not conn.closed and now - conn.idle_since < REUSE_WINDOW
        if fresh and conn.transport is not None and not conn.transport.is_closing():
            return conn
        conn.close()
    try:
        _, conn = await asyncio.get_running_loop().create_unix_connection(_Connection, str(socket))
    except OSError as exc:
        raise UpstreamError(f"runner socket unavailable: {exc.strerror or exc}") from exc
    return conn


def _keep(socket: Path, conn: _Connection) -> None:
    pool = _idle.setdefault(socket, [])
    if len(pool) >= IDLE_PER_RUNNER or conn.buffer:
        conn.close()
        return
    loop = asyncio.get_running_loop()
    conn.idle_since = loop.time()
    pool.append(conn)
    if socket not in _sweeps:
        _sweeps[socket] = loop.call_later(REUSE_WINDOW, _sweep, socket)


def _open_spare(socket: Path) -> None:
    """Open the next request's connection now. llama-server closes its connection after
    every streamed answer, and connecting first would delay the next stream's first token.
    A connection that never carried a request is as safe to use as a new one."""
    if socket in _spares or _idle.get(socket):
        return

    async def spare() -> None:
        try:
            _, conn = await asyncio.get_running_loop().create_unix_connection(
                _Connection, str(socket)
            )
        except OSError:
            return  # the runner is gone; the next request reports it
        finally:
            del _spares[socket]
        _keep(socket, conn)

    _spares[socket] = asyncio.get_running_loop().create_task(spare())


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
    send: Send,
    receive: Receive,
    on_hang_up: HangUpHook | None = None,
) -> int:
    """Send the request to the runner and stream its response to the ASGI `send`.

    Returns the runner's status (499 when the client went away). Raises UpstreamError when
    nothing was sent to the client yet; after the response started, a failure just ends the
    body early.
    """
    # The daemon parsed the body as JSON already; saying so spares runners that check the
    # header (llama-cpp-python does) from clients that send none (`curl -d`).
    head = [f"{method} {path} HTTP/1.1", "Host: localhost", "Content-Type: application/json"]
    head += [f"{name}: {headers[name]}" for name in FORWARDED if name in headers]
    head.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    conn = await _connect(socket)
    relaying = asyncio.current_task()
    assert relaying is not None
    hung_up = active = False

    def hang_up() -> None:
        nonlocal hung_up
        if active and not hung_up:
            hung_up = True
            relaying.cancel()  # closes the runner connection below: llama-server stops

    active = True
    watcher = None
    if on_hang_up is not None:
        on_hang_up(hang_up)
    else:  # no hook (in-process calls): a task watches `receive()` instead
        watcher = asyncio.get_running_loop().create_task(_wait_disconnect(receive))
        watcher.add_done_callback(lambda task: None if task.cancelled() else hang_up())
    reusable = answered = False
    try:
        assert conn.transport is not None
        conn.transport.write(request)
        status, passed, fields = await _read_head(conn)
        await send({"type": "http.response.start", "status": status, "headers": passed})
        reusable = await _pump(conn, fields, send)
        answered = True
        return status
    except asyncio.CancelledError:
        if hung_up:
            return 499
        raise
    finally:
        active = False
        if on_hang_up is not None:
            on_hang_up(None)
        if watcher is not None:
            watcher.cancel()
        if reusable:
            _keep(socket, conn)
        else:
            conn.close()
            if answered:
                _open_spare(socket)


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _read_head(
    conn: _Connection,
) -> tuple[int, list[tuple[bytes, bytes]], dict[bytes, bytes]]:
    """The status, the headers the client gets, and the framing fields the relay reads."""
    buffer = conn.buffer
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > HEAD_LIMIT:
            raise UpstreamError("bad answer from the runner: the response head is too large")
        if conn.closed:
            if buffer:
                raise UpstreamError("the runner closed the connection mid-answer")
            raise UpstreamError("the runner closed the connection without answering")
        await conn.more()
    status_line, *lines = conn.take(end + 4)[:-4].split(b"\r\n")
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
    return status, passed, fields


async def _pump(conn: _Connection, fields: dict[bytes, bytes], send: Send) -> bool:
    """Relay the body; True when the connection may carry another request."""
    reusable = False
    try:
        if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
            await _pump_chunked(conn, send)
        elif b"content-length" in fields:
            remaining = int(fields[b"content-length"])
            keep = fields.get(b"connection", b"").lower() != b"close"
            while remaining > 0:
                if not conn.buffer:
                    await conn.more()
                    continue
                data = conn.take(remaining)
                remaining -= len(data)
                # The last piece ends the response: one message less for most answers.
                await send({"type": "http.response.body", "body": data, "more_body": remaining > 0})
                if not remaining:
                    return keep
            reusable = keep  # an empty body
        else:
            while True:
                if conn.buffer:
                    data = conn.take(len(conn.buffer))
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                if conn.closed:
                    break
                await conn.more()
    except (OSError, ValueError, UpstreamError):
        # The runner died mid-answer. The status is already sent; an event stream at least
        # gets an error event, so clients report a failure instead of a short answer.
        if fields.get(b"content-type", b"").startswith(b"text/event-stream"):
            await send({"type": "http.response.body", "body": RUNNER_DIED_EVENT, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return reusable


async def _pump_chunked(conn: _Connection, send: Send) -> None:
    """Unframe chunks as they arrive; all complete chunks at hand go out in one piece."""
    buffer = conn.buffer
    while True:
        pieces: list[bytes] = []
        at = 0
        while (eol := buffer.find(b"\r\n", at)) >= 0:
            size = int(bytes(buffer[at:eol]).split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                if pieces:
                    await send(
                        {"type": "http.response.body", "body": b"".join(pieces), "more_body": True}
                    )
                del buffer[:at]
                return  # the last chunk (trailers, if any, are dropped with the connection)
            if len(buffer) < eol + 2 + size + 2:
                break
            pieces.append(bytes(buffer[eol + 2 : eol + 2 + size]))
            at = eol + 2 + size + 2
        if pieces:
            del buffer[:at]
            await send({"type": "http.response.body", "body": b"".join(pieces), "more_body": True})
        await conn.more()
