"""Response helpers in DMR's wire conventions, and the sync ↔ async bridges routes need."""

from __future__ import annotations

import asyncio
import html
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from dmr_cli.errors import BadRequest, DmrError

BODY_LIMIT = 10 * 1024 * 1024
log = logging.getLogger("dmr")


def text_error(status: int, message: str) -> Response:
    """Go's `http.Error`: plain text, nosniff, message plus newline."""
    return PlainTextResponse(
        message + "\n",
        status_code=status,
        headers={"X-Content-Type-Options": "nosniff"},
        media_type="text/plain; charset=utf-8",
    )


def error_response(exc: DmrError) -> Response:
    return text_error(exc.status, exc.message)


def json_response(value: Any, status: int = 200) -> Response:
    return JSONResponse(value, status_code=status)


async def read_json(request: Request, *, message: str = "invalid request body") -> Any:
    body = await read_body(request)
    try:
        return json.loads(body) if body.strip() else {}
    except ValueError as exc:
        raise BadRequest(message) from exc


async def read_body(request: Request, limit: int = BODY_LIMIT) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadRequest("request too large")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest("request too large")
        chunks.append(chunk)
    return b"".join(chunks)


def query_bool(request: Request, name: str) -> bool:
    """`?force` alone means true, as Go's strconv-based handlers read it."""
    if name not in request.query_params:
        return False
    value = request.query_params[name].strip().lower()
    if value in ("", "1", "t", "true", "yes"):
        return True
    if value in ("0", "f", "false", "no"):
        return False
    raise BadRequest(f"invalid value for {name}: {value!r}")


_DONE = object()


async def progress_stream(
    request: Request,
    work: Callable[[Callable[[dict[str, Any]], None], threading.Event], Any],
    *,
    gate: asyncio.Semaphore | None = None,
) -> Response:
    """Run `work(progress, cancel)` in a thread and stream its events as NDJSON (spec §2.4).

    Errors raised before the first event keep their own status code; later ones become an
    error line. A client that hangs up sets `cancel`, so the work stops and keeps what it
    has for resume.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancel = threading.Event()

    def emit(item: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def run() -> None:
        try:
            work(emit, cancel)
            emit(_DONE)
        except BaseException as exc:
            emit(exc)

    async def runner() -> None:
        if gate is None:
            await asyncio.to_thread(run)
            return
        async with gate:
            await asyncio.to_thread(run)

    task = asyncio.create_task(runner())
    first = await queue.get()
    if isinstance(first, BaseException):
        await task
        if isinstance(first, DmrError):
            return error_response(first)
        return text_error(500, str(first) or type(first).__name__)

    raw_json = request.headers.get("accept", "") == "application/json"

    def encode(item: dict[str, Any]) -> bytes:
        line = json.dumps(item, separators=(",", ":")) + "\n"
        return (line if raw_json else html.escape(line)).encode()

    async def body() -> AsyncIterator[bytes]:
        item = first
        try:
            while item is not _DONE:
                if isinstance(item, BaseException):
                    message = item.message if isinstance(item, DmrError) else str(item)
                    yield encode({"type": "error", "message": f"Error: {message}"})
                    break
                yield encode(item)
                item = await queue.get()
        finally:
            cancel.set()

    return StreamingResponse(
        body(),
        media_type="application/json" if raw_json else "text/plain",
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


def handle_errors(
    handler: Callable[[Request], Any],
) -> Callable[[Request], Any]:
    """The daemon's error boundary: DmrError → DMR's plain-text error with its status."""

    async def wrapped(request: Request) -> Response:
        try:
            response: Response = await handler(request)
            return response
        except DmrError as exc:
            return error_response(exc)
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.url.path)
            return text_error(500, f"internal error: {exc}")

    return wrapped
