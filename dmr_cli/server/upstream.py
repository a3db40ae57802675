"""In-process calls to the inference routes, for the compatibility layers (Ollama, Anthropic
translation, Responses) that speak another API on the outside and OpenAI to the runners.

A call runs the same handler a client's POST to `/engines/v1/...` would, so model
resolution, runner loading, the request log, metrics and DMR's errors all apply unchanged;
the answer arrives as an `Exchange` instead of on a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.requests import Request
from starlette.types import Message, Scope

from dmr_cli.server import inference
from dmr_cli.server.state import State


class Exchange:
    """The runner's answer to one in-process call: status, headers, then the body.

    Leaving the `async with` before the body ended (the outer client hung up, or the
    translator has what it needs) cancels the call, which closes the runner connection.
    """

    def __init__(self, task: asyncio.Task[None], queue: asyncio.Queue[Message | None]) -> None:
        self._task = task
        self._queue = queue
        self.status = 0
        self.headers: dict[str, str] = {}

    async def _start(self) -> None:
        message = await self._queue.get()
        if message is None:  # the handler ended without answering: it raised
            await self._task
            raise RuntimeError("the inference handler sent no response")
        self.status = message["status"]
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in message["headers"]}

    async def chunks(self) -> AsyncIterator[bytes]:
        while (message := await self._queue.get()) is not None:
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body", False):
                return

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def json(self) -> Any:
        """The body as JSON; a plain-text DMR error comes back as {"error": {"message": ...}}."""
        body = await self.read()
        try:
            return json.loads(body)
        except ValueError:
            return {"error": {"message": body.decode(errors="replace").strip()}}

    async def events(self) -> AsyncIterator[str]:
        """The `data:` payloads of an SSE stream, `[DONE]` included, one per event."""
        buffer = b""
        async for chunk in self.chunks():
            buffer += chunk
            *events, buffer = buffer.replace(b"\r\n", b"\n").split(b"\n\n")
            for event in events:
                data = [
                    line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")
                ]
                if data:
                    yield b"\n".join(data).decode()

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    async def close(self) -> None:
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


class _QueueSink:
    """The relay's sink for an in-process call: the answer goes to the Exchange's queue."""

    def __init__(self, queue: asyncio.Queue[Message | None]) -> None:
        self.queue = queue

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.queue.put_nowait({"type": "http.response.start", "status": status, "headers": headers})

    def body(self, data: bytes, more: bool) -> None:
        self.queue.put_nowait({"type": "http.response.body", "body": data, "more_body": more})

    def paused(self) -> None:
        return None


@contextlib.asynccontextmanager
async def call(
    state: State,
    path: str,
    payload: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
) -> AsyncIterator[Exchange]:
    """POST `payload` to the inference route `path` (e.g. "/v1/chat/completions")."""
    queue: asyncio.Queue[Message | None] = asyncio.Queue()
    body = json.dumps(payload).encode()
    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": "/engines" + path,
        "headers": [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()
        ],
        # Leaving the call cancels its task: there is no hang-up to report.
        "extensions": {"dmr.sink": _QueueSink(queue), "dmr.hang_up": lambda callback: None},
    }
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # leaving the call cancels the task instead
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await queue.put(message)

    async def run() -> None:
        try:
            route = inference.match("/engines" + path)
            assert route is not None, path
            await inference.handle(state, scope, receive, send, *route)
        finally:
            queue.put_nowait(None)

    exchange = Exchange(asyncio.create_task(run()), queue)
    try:
        await exchange._start()
        yield exchange
    finally:
        await exchange.close()


# Headers that describe the outer request's framing, not the inner call's.
_NOT_FORWARDED = {"host", "content-length", "transfer-encoding", "connection", "expect"}
# Fields of a chat request that do not change its prompt's length.
_NOT_COUNTED = {"stream", "stream_options", "tool_choice", "response_format", "max_tokens"}


class UpstreamFailure(Exception):
    """The inference route answered with an error (DMR's, or the runner's)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- helpers for the translating layers ----------------------------------------------


def forwarded_headers(request: Request) -> dict[str, str]:
    """The client's headers for the in-process inference call (User-Agent for the request
    log; the relay picks what runners use)."""
    return {k: v for k, v in request.headers.items() if k not in _NOT_FORWARDED}


async def prompt_tokens(
    state: State, path: str, chat: Mapping[str, Any], headers: Mapping[str, str]
) -> int:
    """The prompt's length in tokens as the runner counts it.

    A one-token completion reports `usage.prompt_tokens` for exactly the prompt the chat
    template renders, tools included: what llama-server's own count_tokens computes. Both
    runners cache the evaluated prompt, so a generation that follows reuses it.
    """
    counted = {k: v for k, v in chat.items() if k not in _NOT_COUNTED}
    counted.update(max_tokens=1, stream=False)
    async with call(state, path, counted, headers) as exchange:
        body = await exchange.read()
        status = exchange.status
    if not 200 <= status < 300:
        raise UpstreamFailure(status, error_message(body))
    parsed = json_or_none(body)
    usage = parsed.get("usage") if isinstance(parsed, dict) else None
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if not isinstance(tokens, int):
        raise UpstreamFailure(502, "the runner reported no prompt token count")
    return tokens


def json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def error_message(body: bytes) -> str:
    """The message of an error answer: OpenAI's, FastAPI's or Anthropic's JSON, or DMR's text."""
    parsed = json_or_none(body)
    if isinstance(parsed, dict):
        inner = parsed.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
        for key in ("detail", "message"):
            if isinstance(parsed.get(key), str):
                return str(parsed[key])
    text = body.decode(errors="replace").strip()
    return text or "the runner answered with an empty error"


def chunk_tokens(delta: Mapping[str, Any]) -> int:
    """Tokens one streamed chat chunk stands for: one per chunk with text or tool-call
    arguments (the role-only first chunk carries none)."""
    return 1 if delta.get("content") is not None or delta.get("tool_calls") else 0


def output_tokens(
    reported: int | None, finish_reason: str | None, max_tokens: int | None, chunks: int
) -> int:
    """How many tokens a streamed answer took.

    The runner's own count when it sent one (llama-server does at the end of a stream; an
    answer cut at a stop sequence never gets there, and the embedded engine never sends
    one). Otherwise an answer that ran into max_tokens took exactly that many, and any other
    is counted by its chunks: one per token, except that llama-cpp-python also streams empty
    chunks around bytes that do not decode on their own.
    """
    if reported is not None:
        return reported
    if finish_reason == "length" and max_tokens is not None:
        return max_tokens
    return chunks
