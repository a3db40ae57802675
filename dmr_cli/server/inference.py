"""The inference hot path (spec §2.6), as a bare ASGI handler.

Every chat, completion, embedding and rerank request passes here, so it skips the web
framework: the path is matched with a dict lookup, the body is read straight from ASGI, the
model resolves from the store's in-memory index, and the answer is relayed byte for byte to
the exchange's sink (the `dmr.sink` and `dmr.hang_up` extensions of dmr's HTTP server, or of
an in-process call).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable
from typing import Any

from starlette.types import Receive, Scope, Send

from dmr_cli.errors import DmrError
from dmr_cli.server.http import BODY_LIMIT
from dmr_cli.server.relay import FORWARDED, HangUpHook, Sink, UpstreamError, relay
from dmr_cli.server.scheduler import BACKENDS, DEFAULT_BACKEND, Runner
from dmr_cli.server.state import State

log = logging.getLogger("dmr")

# Path suffix → runner mode (spec §2.6 step 2).
MODES = {
    "/v1/chat/completions": "completion",
    "/v1/completions": "completion",
    "/v1/messages": "completion",
    "/v1/messages/count_tokens": "completion",
    "/v1/embeddings": "embedding",
    "/rerank": "reranking",
    "/score": "reranking",
    "/v1/rerank": "reranking",
    "/v1/images/generations": "image-generation",
}


# The request headers dmr reads: forwarded to the runner (relay.FORWARDED), asked for a preload,
# or kept in the request log.
_READ = frozenset(
    name.encode() for name in (*FORWARDED, "x-preload-only", "user-agent", "x-request-origin")
)

# LiteLLM's docker_model_runner provider posts to `{api_base}/chat/completions` with
# api_base `<dmr>/engines/llama.cpp`, without the /v1 DMR expects.
_WITHOUT_V1 = {
    "/chat/completions": "/v1/chat/completions",
    "/completions": "/v1/completions",
    "/embeddings": "/v1/embeddings",
}


def match(path: str) -> tuple[str, str] | None:
    """(backend, runner path) for an inference route, else None.

    `/engines/v1/x`, `/engines/<backend>/v1/x`, the aliases `/v1/x`, `/rerank`, `/score`,
    and `/engines[/<backend>]/x` for the OpenAI routes LiteLLM calls without /v1.
    """
    engines = path.startswith("/engines/")
    if engines:
        rest = path[len("/engines") :]
    elif path.startswith("/v1/") or path in ("/rerank", "/score"):
        rest = path
    else:
        return None
    if rest in MODES:
        return DEFAULT_BACKEND, rest
    if engines and rest in _WITHOUT_V1:
        return DEFAULT_BACKEND, _WITHOUT_V1[rest]
    backend, sep, tail = rest[1:].partition("/")
    if sep:
        tail = "/" + tail
        if tail in MODES:
            return backend, tail
        if engines and tail in _WITHOUT_V1:
            return backend, _WITHOUT_V1[tail]
    return None


async def handle(
    state: State, scope: Scope, receive: Receive, send: Send, backend: str, path: str
) -> None:
    started = time.perf_counter()
    if backend not in BACKENDS:
        return await _answer(state, send, path, 404, "backend not found")
    if backend != DEFAULT_BACKEND:
        message = f'backend "{backend}" is not installed; dmr serves GGUF models with llama.cpp'
        return await _answer(state, send, path, 412, message)
    body = await read_body(receive)
    if body is None:
        return await _answer(state, send, path, 400, "request too large")
    try:
        payload = json.loads(body)
    except ValueError:
        return await _answer(state, send, path, 400, "invalid request")
    # DMR decodes into a struct with a string `model`: anything else is not a request.
    model = payload.get("model") if isinstance(payload, dict) else 0
    if model is not None and not isinstance(model, str):
        return await _answer(state, send, path, 400, "invalid request")
    if not model:
        return await _answer(state, send, path, 400, "model is required")
    headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"] if k in _READ}
    scheduler = state.scheduler
    try:
        runner = await scheduler.acquire(model, MODES[path], backend, scheduler.store.get(model))
    except DmrError as exc:
        return await _answer(state, send, path, exc.status, exc.message)
    try:
        if headers.get("x-preload-only", "").lower() == "true":
            return await _answer(state, send, path, 200, "")
        record = state.recorder.start(
            runner.key.model_id, model, "POST", scope["path"], body, headers, started
        )
        try:
            extensions = scope["extensions"]
            sink = record.recording(extensions["dmr.sink"])
            hang_up = extensions["dmr.hang_up"]
            if runner.embedded:
                async with runner.turn:
                    await _relay(runner, path, headers, body, sink, hang_up)
            else:
                await _relay(runner, path, headers, body, sink, hang_up)
        finally:
            record.finish()
            state.metrics.request_done(path, record.status_code, record.ttfb)
    finally:
        scheduler.release(runner)


def _answer(state: State, send: Send, path: str, status: int, message: str) -> Awaitable[None]:
    """An answer dmr gives itself (no runner involved), counted in the metrics."""
    state.metrics.request_done(path, status)
    return send_text(send, status, message)


async def _relay(
    runner: Runner, path: str, headers: dict[str, str], body: bytes, sink: Sink, hang_up: HangUpHook
) -> None:
    try:
        await relay(runner.socket, "POST", path, headers, body, sink, hang_up)
    except UpstreamError as exc:
        # DMR's shape for a runner that went away before answering (spec §2.6 step 10).
        error: dict[str, Any] = {
            "type": "error",
            "code": None,
            "message": f"the runner for {runner.model_ref} failed: {exc}",
            "param": None,
            "sequence_number": 1,
        }
        data = json.dumps(error).encode()
        sink.start(500, _headers(data, b"application/json"))
        sink.body(data, False)


async def read_body(receive: Receive) -> bytes | None:
    """The request body, or None past the 10 MiB limit."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > BODY_LIMIT:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_text(send: Send, status: int, message: str) -> None:
    """Go's http.Error, as the rest of the daemon answers (plain text, nosniff, newline)."""
    body = (message + "\n").encode() if message else b""
    headers = _headers(body, b"text/plain; charset=utf-8")
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _headers(body: bytes, content_type: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"x-content-type-options", b"nosniff"),
    ]
