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
