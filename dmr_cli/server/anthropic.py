"""Anthropic Messages API: `POST /anthropic/v1/messages` and `.../count_tokens` (spec §2.9).

Requests go unchanged to the runner's own Messages API (llama-server implements it). A
runner without one answers 404 there although the model exists (the embedded engine,
llama-cpp-python, or an old llama-server); such a request is translated to an OpenAI chat
completion and the answer back: the message object, or Anthropic's event stream. Errors
always come in Anthropic's shape, `{"type":"error","error":{"type":...,"message":...}}`.

The translation is plain functions and one state machine (`MessageStream`), free of I/O.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from dmr_cli.errors import BadRequest, DmrError
from dmr_cli.server import upstream
from dmr_cli.server.http import read_body
from dmr_cli.server.state import State
from dmr_cli.server.upstream import (
    UpstreamFailure,
    chunk_tokens,
    error_message,
    forwarded_headers,
    json_or_none,
    output_tokens,
    prompt_tokens,
)

CHAT_PATH = "/v1/chat/completions"
# Response headers the daemon sets itself when it relays a runner's answer.
_NOT_RELAYED = {"content-length", "transfer-encoding", "connection", "date", "server"}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",  # DMR: backend installation pending or cancelled
    529: "overloaded_error",
}
# Fields that shape sampling, not the prompt: a token count leaves them out.
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
}


class InvalidRequest(Exception):
    """A request the translation cannot express: Anthropic's 400 invalid_request_error."""


# -- routes ---------------------------------------------------------------------------------


async def messages(request: Request) -> Response:
    return await _serve(request, "/v1/messages")


async def count_tokens(request: Request) -> Response:
    return await _serve(request, "/v1/messages/count_tokens")


async def _serve(request: Request, path: str) -> Response:
    state: State = request.app.state.dmr
    try:
        body = await read_body(request)
    except BadRequest:
        return error_response(413, "Request body too large")
    try:
        payload = json.loads(body)
    except ValueError:
        return error_response(400, "Invalid JSON in request body")
    if not isinstance(payload, dict):
        return error_response(400, "Invalid JSON in request body")
    model = payload.get("model")
    if not model:
        return error_response(400, "Missing required field: model")
    if not isinstance(model, str):
        return error_response(400, "model: Input should be a valid string")
    # Both the runner's Messages API and the translation need a message list; without this
    # check llama-server would answer a client's mistake with a 500.
    if not isinstance(payload.get("messages"), list):
        return error_response(400, "messages: Input should be a valid list")
    try:
        found = state.store.find(model)
    except DmrError as exc:
        return error_response(exc.status, exc.message)
    if found is None:
        return error_response(404, f"Model not found: {model}")
    headers = forwarded_headers(request)
    headers["x-request-origin"] = "anthropic/messages"
    try:
        passed = await _pass_through(state, path, payload, headers)
        if passed is not None:
            return passed
        chat = to_chat_request(payload)
        if path.endswith("/count_tokens"):
            tokens = await prompt_tokens(state, CHAT_PATH, chat, headers)
            return JSONResponse({"input_tokens": tokens})
        return await _translate(state, payload, chat, headers)
    except InvalidRequest as exc:
        return error_response(400, str(exc))
    except UpstreamFailure as exc:
        return error_response(exc.status, exc.message)


async def _pass_through(
    state: State, path: str, payload: dict[str, Any], headers: dict[str, str]
) -> Response | None:
    """The runner's own answer, relayed as it comes; None when it has no Messages API."""
    stack = contextlib.AsyncExitStack()
    exchange = await stack.enter_async_context(upstream.call(state, path, payload, headers))
    try:
        if exchange.status == 404 and not exchange.headers.get("content-type", "").startswith(
            "text/plain"
        ):
            # DMR's own 404s are plain text; a JSON 404 is the runner not knowing the route.
            await stack.aclose()
            return None
        if not exchange.ok:
            body = await exchange.read()
            await stack.aclose()
            return _relayed_error(exchange.status, body)
    except BaseException:
        await stack.aclose()
        raise

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in exchange.chunks():
                yield chunk
        finally:
            await stack.aclose()

    kept = {k: v for k, v in exchange.headers.items() if k not in _NOT_RELAYED}
    return StreamingResponse(relay(), status_code=exchange.status, headers=kept)


def _relayed_error(status: int, body: bytes) -> Response:
    """A runner or DMR error in Anthropic's shape (a runner's own Anthropic error as is)."""
    parsed = json_or_none(body)
    if isinstance(parsed, dict) and parsed.get("type") == "error":
        return JSONResponse(parsed, status_code=status)
    return error_response(status, error_message(body))


async def _translate(
    state: State, payload: dict[str, Any], chat: dict[str, Any], headers: dict[str, str]
) -> Response:
    stop_sequences = payload.get("stop_sequences") or []
    input_tokens = await prompt_tokens(state, CHAT_PATH, chat, headers)
    # The answer is always streamed from the runner, so a stop sequence ends generation the
    # moment it appears and the answer can say which one it was; the runner is not given
    # `stop`, since it would cut the sequence out without saying whether it matched.
    streamed = {**chat, "stream": True, "stream_options": {"include_usage": True}}
    stack = contextlib.AsyncExitStack()
    exchange = await stack.enter_async_context(upstream.call(state, CHAT_PATH, streamed, headers))
    if not exchange.ok:
        body = await exchange.read()
        await stack.aclose()
        return _relayed_error(exchange.status, body)
    translator = MessageStream(
        payload["model"], input_tokens, stop_sequences, max_tokens=chat.get("max_tokens")
    )

    async def events() -> AsyncIterator[dict[str, Any]]:
        try:
            for event in translator.start():
                yield event
            async for data in exchange.events():
                for event in translator.feed(data):
                    yield event
                if translator.ended:
                    break
            for event in translator.finish():
                yield event
        finally:
            await stack.aclose()

    if payload.get("stream"):

        async def sse() -> AsyncIterator[bytes]:
            async for event in events():
                yield encode_event(event)

        return StreamingResponse(
            sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    async for _ in events():
        pass
    if translator.error is not None:
        return error_response(500, translator.error)
    return JSONResponse(translator.message())


# -- errors ---------------------------------------------------------------------------------


def error_type(status: int) -> str:
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def error_response(status: int, message: str) -> Response:
    return JSONResponse(error_body(status, message), status_code=status)


# -- request translation --------------------------------------------------------------------


def to_chat_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages request as an OpenAI chat completion request."""
    chat: dict[str, Any] = {"model": body["model"]}
    conversation: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        conversation.append({"role": "system", "content": _text_of(system, "system")})
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list):
        raise InvalidRequest("messages: Input should be a valid list")
    for index, message in enumerate(raw_messages):
        conversation += _convert_message(message, f"messages.{index}")
    chat["messages"] = conversation
    if body.get("max_tokens") is not None:
        max_tokens = body["max_tokens"]
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise InvalidRequest("max_tokens: Input should be a positive integer")
        chat["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "top_k"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise InvalidRequest(f"{name}: Input should be a valid number")
        chat[name] = value
    stops = body.get("stop_sequences")
    if stops is not None and (
        not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops)
    ):
        raise InvalidRequest("stop_sequences: Input should be a list of non-empty strings")
    tools = body.get("tools")
    if tools:
        chat["tools"] = [_convert_tool(tool, f"tools.{i}") for i, tool in enumerate(tools)]
    if body.get("tool_choice") is not None:
        chat.update(_convert_tool_choice(body["tool_choice"]))
    return chat


def _text_of(content: Any, where: str) -> str:
    """A string, or text blocks joined (system prompts, tool results)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}: Input should be a string or a list of content blocks")
    texts = []
    for index, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise InvalidRequest(f"{where}.{index}: only text blocks are supported here")
        texts.append(_string(block.get("text"), f"{where}.{index}.text"))
    return "\n\n".join(texts)


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{where}: Input should be a valid string")
    return value


def _convert_message(message: Any, where: str) -> list[dict[str, Any]]:
    """One Anthropic message as OpenAI messages: tool results become `tool` messages (placed
    first, right after the assistant's tool calls they answer), the rest one message."""
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where}: Input should be an object")
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise InvalidRequest(f"{where}.role: Input should be 'user' or 'assistant'")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content: Input should be a string or a list of blocks")
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for index, block in enumerate(content):
        at = f"{where}.content.{index}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": _string(block.get("text"), f"{at}.text")})
        elif kind == "image" and role == "user":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, at)}})
        elif kind == "tool_use" and role == "assistant":
            calls.append(
                {
                    "id": _string(block.get("id"), f"{at}.id"),
                    "type": "function",
                    "function": {
                        "name": _string(block.get("name"), f"{at}.name"),
                        "arguments": json.dumps(block.get("input") or {}),
                    },
                }
            )
        elif kind == "tool_result" and role == "user":
            results.append(_tool_result(block, at))
        elif kind in ("thinking", "redacted_thinking"):
            continue  # a previous turn's reasoning: runners do not take it back
        else:
            raise InvalidRequest(f"{at}: content block type {kind!r} is not supported")
    converted = list(results)
    if calls:
        # llama-cpp-python refuses an assistant message whose content is null.
        converted.append({"role": "assistant", "content": _joined(parts), "tool_calls": calls})
    elif parts or not results:
        converted.append({"role": role, "content": _joined(parts)})
    return converted


def _joined(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text-only content as one string: chat templates that concatenate `content` (most of
    them, llama-cpp-python's included) cannot take a list of parts."""
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def _image_url(block: dict[str, Any], where: str) -> str:
    source = block.get("source")
    if not isinstance(source, dict):
        raise InvalidRequest(f"{where}.source: Field required")
    if source.get("type") == "base64":
        media_type = _string(source.get("media_type"), f"{where}.source.media_type")
        data = _string(source.get("data"), f"{where}.source.data")
        return f"data:{media_type};base64,{data}"
    if source.get("type") == "url":
        return _string(source.get("url"), f"{where}.source.url")
    raise InvalidRequest(f"{where}.source.type: only 'base64' and 'url' images are supported")


def _tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    content = block.get("content")
    text = "" if content is None else _text_of(content, f"{where}.content")
    if block.get("is_error"):
        text = f"Error: {text}"
    return {
        "role": "tool",
        "tool_call_id": _string(block.get("tool_use_id"), f"{where}.tool_use_id"),
        "content": text,
    }


def _convert_tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict):
        raise InvalidRequest(f"{where}: Input should be an object")
    if tool.get("type") not in (None, "custom"):
        raise InvalidRequest(f"{where}: tool type {tool.get('type')!r} is not supported")
    function: dict[str, Any] = {"name": _string(tool.get("name"), f"{where}.name")}
    if tool.get("description"):
        function["description"] = _string(tool["description"], f"{where}.description")
    schema = tool.get("input_schema")
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{where}.input_schema: Field required")
    function["parameters"] = schema
    return {"type": "function", "function": function}


def _convert_tool_choice(choice: Any) -> dict[str, Any]:
    if not isinstance(choice, dict):
        raise InvalidRequest("tool_choice: Input should be an object")
    kind = choice.get("type")
    converted: dict[str, Any]
    if kind == "auto":
        converted = {"tool_choice": "auto"}
    elif kind == "any":
        converted = {"tool_choice": "required"}
    elif kind == "none":
        converted = {"tool_choice": "none"}
    elif kind == "tool":
        name = _string(choice.get("name"), "tool_choice.name")
        converted = {"tool_choice": {"type": "function", "function": {"name": name}}}
    else:
        raise InvalidRequest(f"tool_choice.type: {kind!r} is not one of auto, any, tool, none")
    if choice.get("disable_parallel_tool_use"):
        converted["parallel_tool_calls"] = False
    return converted


# -- answer translation ---------------------------------------------------------------------


class StopScanner:
    """Finds the first stop sequence in streamed text, holding back any tail that could
    still turn into one so that no part of a stop sequence is ever emitted."""

    def __init__(self, sequences: list[str]) -> None:
        self.sequences = sequences
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """(text safe to emit, the stop sequence matched or None)."""
        buffer = self.pending + text
        hits = [(buffer.find(s), s) for s in self.sequences if s in buffer]
        if hits:
            at, sequence = min(hits)
            self.pending = ""
            return buffer[:at], sequence
        held = max(
            (n for s in self.sequences for n in range(1, len(s)) if buffer.endswith(s[:n])),
            default=0,
        )
        self.pending = buffer[len(buffer) - held :] if held else ""
        return buffer[: len(buffer) - held], None

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


class MessageStream:
    """OpenAI chat completion chunks in, Anthropic stream events out; `message()` is the
    answer they add up to, for requests that did not ask for a stream.

    `feed` takes each SSE `data:` payload; `ended` says the answer is complete (or failed,
    see `error`); `finish` gives the closing events (or the error event).
    """

    def __init__(
        self,
        model: str,
        input_tokens: int,
        stop_sequences: list[str],
        *,
        max_tokens: int | None = None,
    ) -> None:
        self.id = "msg_" + secrets.token_hex(12)
        self.max_tokens = max_tokens
        self.model = model
        self.input_tokens = input_tokens
        self.output_tokens = 0
        self.reported_output: int | None = None
        self.blocks: list[dict[str, Any]] = []
        self.arguments: dict[int, str] = {}  # tool_use block index → JSON text so far
        self.tool_blocks: dict[int, int] = {}  # OpenAI tool call index → block index
        self.open: int | None = None
        self.scanner = StopScanner(stop_sequences)
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        self.ended = False
        self.error: str | None = None

    def start(self) -> list[dict[str, Any]]:
        message = {
            **self._envelope(),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
        }
        return [{"type": "message_start", "message": message}, {"type": "ping"}]

    def feed(self, data: str) -> list[dict[str, Any]]:
        if data == "[DONE]":
            self.ended = True
            return []
        try:
            chunk = json.loads(data)
        except ValueError:
            return self._fail(f"the runner sent an unreadable event: {data[:200]}")
        if not isinstance(chunk, dict):
            return self._fail(f"the runner sent an unexpected event: {data[:200]}")
        if chunk.get("error"):
            return self._fail(error_message(data.encode()))
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self.reported_output = usage["completion_tokens"]
        events: list[dict[str, Any]] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            self.output_tokens += chunk_tokens(delta)
            if isinstance(delta.get("content"), str) and delta["content"]:
                events += self._text(delta["content"])
                if self.stop_sequence is not None:
                    self.ended = True
                    return events
            for call in delta.get("tool_calls") or []:
                events += self._tool_call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def finish(self) -> list[dict[str, Any]]:
        if self.error is None and self.finish_reason is None and self.stop_sequence is None:
            self.error = "the runner ended its answer early"
        if self.error is not None:
            return [error_body(500, self.error)]
        events = self._text(self.scanner.flush(), scan=False)
        events += self._close()
        events.append(
            {
                "type": "message_delta",
                "delta": {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence},
                "usage": self.usage,
            }
        )
        events.append({"type": "message_stop"})
        return events

    def message(self) -> dict[str, Any]:
        content = []
        for index, block in enumerate(self.blocks):
            if block["type"] == "tool_use":
                block = {**block, "input": parse_arguments(self.arguments[index])}
            content.append(block)
        return {
            **self._envelope(),
            "content": content,
            "stop_reason": self.stop_reason,
            "stop_sequence": self.stop_sequence,
            "usage": self.usage,
        }

    @property
    def stop_reason(self) -> str:
        if self.stop_sequence is not None:
            return "stop_sequence"
        if self.finish_reason != "length" and self.tool_blocks:
            return "tool_use"
        return _STOP_REASONS.get(self.finish_reason or "stop", "end_turn")

    @property
    def usage(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": output_tokens(
                self.reported_output, self.finish_reason, self.max_tokens, self.output_tokens
            ),
        }

    def _envelope(self) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model}

    def _fail(self, message: str) -> list[dict[str, Any]]:
        self.error = message
        self.ended = True
        return []

    def _text(self, text: str, *, scan: bool = True) -> list[dict[str, Any]]:
        if scan:
            text, self.stop_sequence = self.scanner.feed(text)
        if not text:
            return []
        events = []
        if self.open is None or self.blocks[self.open]["type"] != "text":
            events += self._open({"type": "text", "text": ""})
        assert self.open is not None
        self.blocks[self.open]["text"] += text
        delta = {"type": "text_delta", "text": text}
        events.append({"type": "content_block_delta", "index": self.open, "delta": delta})
        return events

    def _tool_call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        position = call.get("index", len(self.tool_blocks))
        function = call.get("function") or {}
        events: list[dict[str, Any]] = []
        if position not in self.tool_blocks:
            # Text held back by the stop scanner comes before the tool call it precedes.
            events += self._text(self.scanner.flush(), scan=False)
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": call.get("id") or "toolu_" + secrets.token_hex(12),
                "name": function.get("name") or "",
                "input": {},
            }
            events += self._open(block)
            assert self.open is not None
            self.tool_blocks[position] = self.open
            self.arguments[self.open] = ""
        index = self.tool_blocks[position]
        fragment = function.get("arguments") or ""
        if fragment:
            self.arguments[index] += fragment
            delta = {"type": "input_json_delta", "partial_json": fragment}
            events.append({"type": "content_block_delta", "index": index, "delta": delta})
        return events

    def _open(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        self.blocks.append(block)
        self.open = len(self.blocks) - 1
        # A copy: the block itself keeps growing as deltas arrive.
        start = {"type": "content_block_start", "index": self.open, "content_block": {**block}}
        return [*events, start]

    def _close(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        index, self.open = self.open, None
        return [{"type": "content_block_stop", "index": index}]


def parse_arguments(text: str) -> dict[str, Any]:
    """Tool arguments as the object Anthropic's `input` is; a model that produced no valid
    JSON object gets an empty input rather than failing the whole answer."""
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def encode_event(event: Mapping[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
