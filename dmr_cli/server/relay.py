"""Relay one HTTP exchange to a runner over its Unix socket, streaming the answer through.

Plain asyncio instead of an HTTP client library: the body goes out unchanged, every chunk
the runner writes is handed to the client as soon as it is read (no buffering, so no added
gap between tokens), and a client that hangs up closes the runner connection, which makes
llama-server stop generating. Each exchange uses a fresh connection: connecting to a Unix
socket costs microseconds, and llama-server closes connections after streamed responses, so
a pool would only add the risk of sending on a connection the runner already closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
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
_FORWARDED = ("accept", "authorization", "x-api-key", "anthropic-version")
READ_SIZE = 64 * 1024
RUNNER_DIED_EVENT = (
    b'data: {"error":{"message":"the runner exited unexpectedly","type":"server_error",'
    b'"code":500}}\n\n'
)


class UpstreamError(Exception):
    """The runner closed the connection or could not be reached."""


async def relay(
    socket: Path,
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    send: Send,
    receive: Receive,
) -> int:
    """Send the request to the runner and stream its response to the ASGI `send`.

    Returns the runner's status. Raises UpstreamError when nothing was sent to the client
    yet; after the response started, a failure just ends the body early.
    """
    # The daemon parsed the body as JSON already; saying so spares runners that check the
    # header (llama-cpp-python does) from clients that send none (`curl -d`).
    head = [
        f"{method} {path} HTTP/1.1",
        "Host: localhost",
        "Connection: close",
        "Content-Type: application/json",
    ]
    head += [f"{name}: {headers[name]}" for name in _FORWARDED if name in headers]
    head.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket), limit=1 << 20)
    except OSError as exc:
        raise UpstreamError(f"runner socket unavailable: {exc.strerror or exc}") from exc
    # One watcher per exchange: when the client hangs up it cancels the relay, which closes
    # the runner connection, and llama-server stops generating.
    relaying = asyncio.current_task()
    assert relaying is not None
    active = True

    def hang_up(watcher: asyncio.Task[None]) -> None:
        if active and not watcher.cancelled():
            relaying.cancel()

    watcher = asyncio.get_running_loop().create_task(_wait_disconnect(receive))
    watcher.add_done_callback(hang_up)
    try:
        writer.write(request)
        status, response_headers = await _read_head(reader)
        # Content-Length passes (the body is relayed byte for byte); chunked framing is
        # redone by the server; CORS is the daemon's to answer, not the runner's.
        passed = [(k, v) for k, v in response_headers if k not in _NOT_PASSED]
        await send({"type": "http.response.start", "status": status, "headers": passed})
        await _pump(reader, response_headers, send)
        return status
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            return 499  # the client went away
        raise
    finally:
        active = False
        watcher.cancel()
        writer.close()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, list[tuple[bytes, bytes]]]:
    try:
        status_line = await reader.readline()
        if not status_line:
            raise UpstreamError("the runner closed the connection without answering")
        status = int(status_line.split(b" ", 2)[1])
        headers: list[tuple[bytes, bytes]] = []
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
        raise UpstreamError(f"bad answer from the runner: {exc}") from exc
    return status, headers


async def _pump(
    reader: asyncio.StreamReader, headers: list[tuple[bytes, bytes]], send: Send
) -> None:
    fields = dict(headers)
    try:
        if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
            while True:
                size_line = await reader.readline()
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    break
                data = await reader.readexactly(size)
                await reader.readexactly(2)
                await send({"type": "http.response.body", "body": data, "more_body": True})
        elif b"content-length" in fields:
            remaining = int(fields[b"content-length"])
            while remaining > 0:
                data = await reader.read(min(remaining, READ_SIZE))
                if not data:
                    break
                remaining -= len(data)
                await send({"type": "http.response.body", "body": data, "more_body": True})
        else:
            while data := await reader.read(READ_SIZE):
                await send({"type": "http.response.body", "body": data, "more_body": True})
    except (OSError, ValueError, asyncio.IncompleteReadError):
        # The runner died mid-answer. The status is already sent; an event stream at least
        # gets an error event, so clients report a failure instead of a short answer.
        if fields.get(b"content-type", b"").startswith(b"text/event-stream"):
            await send({"type": "http.response.body", "body": RUNNER_DIED_EVENT, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
