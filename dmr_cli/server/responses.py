"""OpenAI Responses API (spec §2.10): create, retrieve, input items and delete, under
`/responses`, `/v1/responses`, `/engines/responses`, `/engines/v1/responses` and
`/engines/{backend}/v1/responses`.

A response is a chat completion underneath: the request is translated (instructions, input
items, the stored conversation of `previous_response_id` before them, function tools and
calls) and sent through the inference route; the answer comes back as a Response object or
as the Responses event stream. Responses are kept in memory for an hour, or for
`DMR_RESPONSES_TTL` seconds (read when the daemon first serves this API), unless the
request says `store: false`. Errors come in OpenAI's shape.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dmr_cli import config
from dmr_cli.errors import BadRequest
from dmr_cli.server import upstream
from dmr_cli.server.http import BODY_LIMIT, read_body
from dmr_cli.server.scheduler import BACKENDS
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

log = logging.getLogger("dmr")

DEFAULT_TTL = 3600.0
TTL_ENV = "DMR_RESPONSES_TTL"
PREFIXES = (
    "/responses",
    "/v1/responses",
    "/engines/responses",
    "/engines/v1/responses",
    "/engines/{backend}/v1/responses",
)
# llama.cpp sampling options the Responses API does not define, passed on to the chat
# completion when a client sends them (the OpenAI SDK's `extra_body`).
SAMPLING_EXTRAS = (
    "top_k",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "logit_bias",
)
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def routes() -> list[Route]:
    """The API's routes under every prefix (before the daemon's catch-all 404 routes)."""
    out = []
    for prefix in PREFIXES:
        for path, handlers in (
            (prefix, {"POST": create}),
            (prefix + "/{id}", {"GET": retrieve, "DELETE": delete}),
            (prefix + "/{id}/input_items", {"GET": list_input_items}),
        ):
            out += [Route(path, endpoint, methods=[m]) for m, endpoint in handlers.items()]
            # Other methods are not allowed here: a 405, as DMR's mux answers, rather than
            # the 404 of the catch-all routes under /v1 and /engines.
            others = [m for m in _METHODS if m not in handlers]
            out.append(Route(path, _not_allowed(list(handlers)), methods=others))
    return out


def _not_allowed(allowed: list[str]) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        response = error_response(405, f"Method {request.method} not allowed here.")
        response.headers["Allow"] = ", ".join(allowed)
        return response

    return endpoint


class RequestError(Exception):
    """A request this API refuses, with OpenAI's error fields."""

    def __init__(
        self, message: str, param: str | None = None, code: str | None = None, status: int = 400
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> Response:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    error = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status)


# -- the store ------------------------------------------------------------------------------


@dataclass
class Stored:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    history: list[dict[str, Any]]  # chat messages up to and including this response's output
    expires: float


class ResponseStore:
    """Responses by ID, each gone `ttl` seconds after it was stored."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._items: dict[str, Stored] = {}

    def put(
        self,
        response: dict[str, Any],
        input_items: list[dict[str, Any]],
        history: list[dict[str, Any]],
    ) -> None:
        self._sweep()
        expires = self.clock() + self.ttl
        self._items[response["id"]] = Stored(response, input_items, history, expires)

    def get(self, response_id: str) -> Stored | None:
        self._sweep()
        return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        self._sweep()
        return self._items.pop(response_id, None) is not None

    def _sweep(self) -> None:
        # One TTL for all, so insertion order is expiry order: the expired ones lead.
        now = self.clock()
        while self._items:
            first = next(iter(self._items))
            if self._items[first].expires > now:
                return
            del self._items[first]


def configured_ttl() -> float:
    value = config.env(TTL_ENV)
    if not value:
        return DEFAULT_TTL
    try:
        ttl = float(value)
    except ValueError:
        ttl = 0.0
    if ttl <= 0:
        log.warning("ignoring %s=%r: not a positive number of seconds", TTL_ENV, value)
        return DEFAULT_TTL
    return ttl


def _store(request: Request) -> ResponseStore:
    store: ResponseStore | None = getattr(request.app.state, "responses", None)
    if store is None:
        store = request.app.state.responses = ResponseStore(configured_ttl())
    return store


# -- routes ---------------------------------------------------------------------------------


def _chat_path(request: Request) -> str | None:
    """The inference route behind this prefix; None for an unknown backend."""
    backend = request.path_params.get("backend")
    if backend is None:
        return "/v1/chat/completions"
    return f"/{backend}/v1/chat/completions" if backend in BACKENDS else None


async def create(request: Request) -> Response:
    state: State = request.app.state.dmr
    path = _chat_path(request)
    if path is None:
        return error_response(404, "backend not found")
    try:
        body = await read_body(request)
    except BadRequest:
        return error_response(
            413, f"Request body too large (max {BODY_LIMIT} bytes)", code="request_too_large"
        )
    store = _store(request)
    try:
        payload = parse_request(body)
        previous = None
        if payload.get("previous_response_id"):
            previous = store.get(payload["previous_response_id"])
            if previous is None:
                raise RequestError(
                    f"Previous response with id '{payload['previous_response_id']}' not found.",
                    "previous_response_id",
                    "previous_response_not_found",
                )
        items = input_items(payload.get("input"))
        history = previous.history if previous else []
        if not items and not history:
            raise RequestError(
                "Missing required parameter: 'input'.", "input", "missing_required_parameter"
            )
        chat = to_chat_request(payload, history, items)
    except RequestError as exc:
        return error_response(exc.status, exc.message, exc.param, exc.code)
    turn = Turn(store, payload, items, history)
    headers = forwarded_headers(request)
    if payload.get("stream"):
        return await _stream(state, path, chat, headers, turn)
    async with upstream.call(state, path, chat, headers) as exchange:
        answer = await exchange.read()
        status = exchange.status
    if not 200 <= status < 300:
        return error_response(status, error_message(answer))
    parsed = json_or_none(answer)
    try:
        choice = parsed["choices"][0]
        message = choice["message"]
    except (TypeError, KeyError, IndexError):
        return error_response(502, "the runner sent an unexpected answer")
    output = output_items(message, choice.get("finish_reason"))
    response = turn.finish(output, choice.get("finish_reason"), usage_of(parsed.get("usage")))
    return JSONResponse(response)


async def _stream(
    state: State, path: str, chat: dict[str, Any], headers: dict[str, str], turn: Turn
) -> Response:
    streamed = {**chat, "stream": True, "stream_options": {"include_usage": True}}
    stack = contextlib.AsyncExitStack()
    exchange = await stack.enter_async_context(upstream.call(state, path, streamed, headers))
    if not exchange.ok:
        answer = await exchange.read()
        await stack.aclose()
        return error_response(exchange.status, error_message(answer))
    translator = ResponseStream(turn)

    async def events() -> AsyncIterator[bytes]:
        try:
            for event in translator.start():
                yield encode_event(event)
            async for data in exchange.events():
                for event in translator.feed(data):
                    yield encode_event(event)
                if translator.ended:
                    break
            # The stream's runner connection ends first: the embedded engine takes requests
            # in turns, and a token count may follow.
            await stack.aclose()
            input_tokens = None
            if translator.needs_count:
                try:
                    input_tokens = await prompt_tokens(state, path, chat, headers)
                except UpstreamFailure as exc:
                    translator.error = exc.message
            for event in translator.finish(input_tokens):
                yield encode_event(event)
        finally:
            await stack.aclose()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


async def retrieve(request: Request) -> Response:
    stored = _lookup(request)
    if isinstance(stored, Response):
        return stored
    return JSONResponse(stored.response)


async def delete(request: Request) -> Response:
    if _chat_path(request) is None:
        return error_response(404, "backend not found")
    response_id = request.path_params["id"]
    if not _store(request).delete(response_id):
        return _not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


async def list_input_items(request: Request) -> Response:
    stored = _lookup(request)
    if isinstance(stored, Response):
        return stored
    query = request.query_params
    try:
        page = paginate(
            stored.input_items,
            order=query.get("order", "desc"),
            limit=query.get("limit", "20"),
            after=query.get("after"),
            before=query.get("before"),
        )
    except RequestError as exc:
        return error_response(exc.status, exc.message, exc.param, exc.code)
    return JSONResponse(page)


def _lookup(request: Request) -> Stored | Response:
    if _chat_path(request) is None:
        return error_response(404, "backend not found")
    response_id = request.path_params["id"]
    stored = _store(request).get(response_id)
    return stored if stored is not None else _not_found(response_id)


def _not_found(response_id: str) -> Response:
    return error_response(404, f"Response with id '{response_id}' not found.", "response_id")


# -- request translation --------------------------------------------------------------------


def parse_request(body: bytes) -> dict[str, Any]:
    """The request body, with the fields this layer reads checked."""
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise RequestError(f"Invalid JSON in request body: {exc}") from exc
    if not isinstance(payload, dict):
        raise RequestError("The request body must be a JSON object.")
    model = payload.get("model")
    if not model:
        raise RequestError(
            "Missing required parameter: 'model'.", "model", "missing_required_parameter"
        )
    _check(payload, "model", str, "a string")
    _check(payload, "instructions", str, "a string")
    _check(payload, "previous_response_id", str, "a string")
    _check(payload, "stream", bool, "a boolean")
    _check(payload, "store", bool, "a boolean")
    _check(payload, "parallel_tool_calls", bool, "a boolean")
    _check(payload, "metadata", dict, "an object")
    for name in ("temperature", "top_p"):
        value = payload.get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise RequestError(
                f"Invalid type for '{name}': expected a number.", name, "invalid_type"
            )
    tokens = payload.get("max_output_tokens")
    if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool)):
        raise RequestError(
            "Invalid type for 'max_output_tokens': expected an integer.",
            "max_output_tokens",
            "invalid_type",
        )
    if isinstance(tokens, int) and tokens < 1:
        raise RequestError(
            "Invalid 'max_output_tokens': integer below minimum value 1.",
            "max_output_tokens",
            "integer_below_min_value",
        )
    if payload.get("background"):
        raise RequestError("Background responses are not supported.", "background", None)
    return payload


def _check(payload: Mapping[str, Any], name: str, kind: type, described: str) -> None:
    value = payload.get(name)
    if value is None:
        return
    # JSON true/false are Python ints too: only a boolean field takes them.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise RequestError(
            f"Invalid type for '{name}': expected {described}.", name, "invalid_type"
        )


def input_items(value: Any) -> list[dict[str, Any]]:
    """The request's `input` as a list of complete items with IDs (what input_items lists)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [_message_item("user", [{"type": "input_text", "text": value}])]
    if not isinstance(value, list):
        raise RequestError(
            "Invalid type for 'input': expected a string or an array of input items.",
            "input",
            "invalid_type",
        )
    items = []
    for index, item in enumerate(value):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise RequestError(f"Invalid type for '{where}': expected an object.", where)
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            items.append(_input_message(item, where))
        elif kind == "function_call":
            items.append(
                {
                    "id": item.get("id") or "fc_" + secrets.token_hex(24),
                    "type": "function_call",
                    "status": "completed",
                    "call_id": _text(item, "call_id", where),
                    "name": _text(item, "name", where),
                    "arguments": _text(item, "arguments", where),
                }
            )
        elif kind == "function_call_output":
            output = item.get("output")
            items.append(
                {
                    "id": item.get("id") or "fco_" + secrets.token_hex(24),
                    "type": "function_call_output",
                    "status": "completed",
                    "call_id": _text(item, "call_id", where),
                    "output": output if isinstance(output, str) else _parts_text(output, where),
                }
            )
        elif kind == "reasoning":
            continue  # a previous answer's reasoning: runners do not take it back
        else:
            raise RequestError(
                f"Input item type {kind!r} is not supported.", f"{where}.type", "unsupported_value"
            )
    return items


def _message_item(role: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": "msg_" + secrets.token_hex(24),
        "type": "message",
        "role": role,
        "status": "completed",
        "content": content,
    }


def _input_message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise RequestError(
            f"Invalid value for '{where}.role': expected one of user, assistant, system, "
            "developer.",
            f"{where}.role",
            "invalid_value",
        )
    content = item.get("content")
    text_type = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        parts = [{"type": text_type, "text": content}]
    elif isinstance(content, list):
        parts = [_input_part(part, f"{where}.content[{i}]") for i, part in enumerate(content)]
    else:
        raise RequestError(
            f"Invalid type for '{where}.content': expected a string or an array of parts.",
            f"{where}.content",
            "invalid_type",
        )
    message = _message_item(role, parts)
    if item.get("id"):
        message["id"] = item["id"]
    return message


def _input_part(part: Any, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text"):
        text = _text(part, "text", where)
        return {"type": "output_text" if kind == "output_text" else "input_text", "text": text}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            raise RequestError(
                f"'{where}': only images given by image_url are supported.",
                f"{where}.image_url",
                "unsupported_value",
            )
        return {"type": "input_image", "image_url": url, "detail": part.get("detail", "auto")}
    raise RequestError(
        f"Content part type {kind!r} is not supported.", f"{where}.type", "unsupported_value"
    )


def _text(item: Mapping[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise RequestError(
            f"Missing or invalid '{where}.{name}': expected a string.", f"{where}.{name}"
        )
    return value


def _parts_text(value: Any, where: str) -> str:
    if not isinstance(value, list):
        raise RequestError(
            f"Invalid type for '{where}.output': expected a string or an array of parts.",
            f"{where}.output",
            "invalid_type",
        )
    return "".join(_input_part(p, f"{where}.output")["text"] for p in value)


def to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items (input, or a previous response's output) as chat messages."""
    messages: list[dict[str, Any]] = []
    for item in items:
        if item["type"] == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": _chat_content(item["content"])})
        elif item["type"] == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                # The text and the calls of one answer are one chat message.
                last.setdefault("tool_calls", []).append(call)
            else:
                # llama-cpp-python refuses an assistant message whose content is null.
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif item["type"] == "function_call_output":
            messages.append(
                {"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]}
            )
    return messages


def _chat_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text-only content as one string: chat templates that concatenate `content` (most of
    them, llama-cpp-python's included) cannot take a list of parts."""
    if all(part["type"] != "input_image" for part in parts):
        return "".join(part["text"] for part in parts)
    return [
        {"type": "image_url", "image_url": {"url": part["image_url"]}}
        if part["type"] == "input_image"
        else {"type": "text", "text": part["text"]}
        for part in parts
    ]


def to_chat_request(
    payload: Mapping[str, Any], history: list[dict[str, Any]], items: list[dict[str, Any]]
) -> dict[str, Any]:
    """The chat completion a Responses request stands for. `history` is the stored
    conversation of `previous_response_id`; its instructions are not carried over."""
    messages: list[dict[str, Any]] = []
    if payload.get("instructions"):
        messages.append({"role": "system", "content": payload["instructions"]})
    messages += [dict(m) for m in history]
    messages += to_messages(items)
    chat: dict[str, Any] = {"model": payload["model"], "messages": messages}
    if payload.get("max_output_tokens") is not None:
        chat["max_tokens"] = payload["max_output_tokens"]
    for name in ("temperature", "top_p", "parallel_tool_calls", *SAMPLING_EXTRAS):
        if payload.get(name) is not None:
            chat[name] = payload[name]
    if payload.get("tools"):
        chat["tools"] = _chat_tools(payload["tools"])
    if payload.get("tool_choice") is not None:
        chat["tool_choice"] = _chat_tool_choice(payload["tool_choice"])
    response_format = _response_format(payload.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    return chat


def _chat_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise RequestError("Invalid type for 'tools': expected an array.", "tools", "invalid_type")
    out = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise RequestError(
                f"Tool type {kind!r} is not supported: only function tools are.",
                f"{where}.type",
                "unsupported_value",
            )
        function: dict[str, Any] = {"name": _text(tool, "name", where)}
        for name in ("description", "parameters", "strict"):
            if tool.get(name) is not None:
                function[name] = tool[name]
        out.append({"type": "function", "function": function})
    return out


def _chat_tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": _text(choice, "name", "tool_choice")}}
    raise RequestError(
        "Invalid value for 'tool_choice': expected auto, none, required or a function.",
        "tool_choice",
        "invalid_value",
    )


def _response_format(text: Any) -> dict[str, Any] | None:
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") in (None, "text"):
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    if fmt["type"] == "json_schema":
        schema = {"name": _text(fmt, "name", "text.format"), "schema": fmt.get("schema") or {}}
        if fmt.get("strict") is not None:
            schema["strict"] = fmt["strict"]
        return {"type": "json_schema", "json_schema": schema}
    raise RequestError(
        f"Invalid value for 'text.format.type': {fmt['type']!r}.",
        "text.format.type",
        "invalid_value",
    )


def paginate(
    items: list[dict[str, Any]], *, order: str, limit: str, after: str | None, before: str | None
) -> dict[str, Any]:
    """A page of input items as OpenAI lists them (newest first unless order=asc)."""
    if order not in ("asc", "desc"):
        raise RequestError("Invalid value for 'order': expected asc or desc.", "order")
    try:
        count = int(limit)
    except ValueError:
        count = 0
    if not 1 <= count <= 100:
        raise RequestError("Invalid value for 'limit': expected 1 to 100.", "limit")
    ordered = items if order == "asc" else items[::-1]
    ids = [item["id"] for item in ordered]
    start, end = 0, len(ordered)
    if after:
        if after not in ids:
            raise RequestError(f"No input item with id '{after}'.", "after")
        start = ids.index(after) + 1
    if before:
        if before not in ids:
            raise RequestError(f"No input item with id '{before}'.", "before")
        end = ids.index(before)
    window = ordered[start:end]
    page = window[:count]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(window) > count,
    }


# -- answer translation ---------------------------------------------------------------------


def output_items(message: Mapping[str, Any], finish_reason: str | None) -> list[dict[str, Any]]:
    """A chat completion's message as Responses output items: its text, then its calls."""
    status = "incomplete" if finish_reason == "length" else "completed"
    calls = message.get("tool_calls") or []
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    items = []
    if text or not calls:
        items.append(_output_message(text, status))
    for call in calls:
        function = call.get("function") or {}
        items.append(
            _function_call(
                call.get("id") or "call_" + secrets.token_hex(12),
                function.get("name") or "",
                function.get("arguments") or "",
                "completed",
            )
        )
    return items


def _output_message(text: str, status: str, item_id: str | None = None) -> dict[str, Any]:
    return {
        "id": item_id or "msg_" + secrets.token_hex(24),
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [_output_text(text)],
    }


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _function_call(
    call_id: str, name: str, arguments: str, status: str, item_id: str | None = None
) -> dict[str, Any]:
    return {
        "id": item_id or "fc_" + secrets.token_hex(24),
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def usage_of(usage: Any) -> dict[str, Any] | None:
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details") or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": int(details.get("cached_tokens") or 0)},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


class Turn:
    """One create request: its Response object from start to end, stored when it ends."""

    def __init__(
        self,
        store: ResponseStore,
        payload: Mapping[str, Any],
        items: list[dict[str, Any]],
        history: list[dict[str, Any]],
    ) -> None:
        self.store, self.items, self.history = store, items, history
        self.keep = payload.get("store", True)
        self.response: dict[str, Any] = {
            "id": "resp_" + secrets.token_hex(24),
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": payload.get("instructions"),
            "max_output_tokens": payload.get("max_output_tokens"),
            "max_tool_calls": None,
            "model": payload["model"],
            "output": [],
            "parallel_tool_calls": payload.get("parallel_tool_calls", True),
            "previous_response_id": payload.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": self.keep,
            "temperature": payload.get("temperature"),
            "text": payload.get("text") or {"format": {"type": "text"}},
            "tool_choice": payload.get("tool_choice", "auto"),
            "tools": payload.get("tools") or [],
            "top_p": payload.get("top_p"),
            "truncation": "disabled",
            "usage": None,
            "user": payload.get("user"),
            "metadata": payload.get("metadata") or {},
        }

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self.response)

    def finish(
        self, output: list[dict[str, Any]], finish_reason: str | None, usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        self.response["output"] = output
        self.response["usage"] = usage
        if finish_reason == "length":
            self.response["status"] = "incomplete"
            self.response["incomplete_details"] = {"reason": "max_output_tokens"}
        else:
            self.response["status"] = "completed"
        if self.keep:
            history = self.history + to_messages(self.items) + to_messages(output)
            self.store.put(self.response, self.items, history)
        return self.response

    def fail(self, message: str) -> dict[str, Any]:
        self.response["status"] = "failed"
        self.response["error"] = {"code": "server_error", "message": message}
        return self.response


class ResponseStream:
    """OpenAI chat completion chunks in, Responses stream events out.

    `feed` takes each SSE `data:` payload; `ended` says the runner's answer is complete (or
    failed: `error`); `finish` gives the closing events, the stored response's last event.
    """

    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.text_item: int | None = None  # output index of the message being written
        self.calls: dict[int, int] = {}  # chat tool call index → output index
        self.open: int | None = None
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.output_tokens = 0
        self.ended = False
        self.error: str | None = None

    @property
    def needs_count(self) -> bool:
        """The runner sent no usage (the embedded engine never does in a stream)."""
        return self.usage is None and self.error is None and self.finish_reason is not None

    def start(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self.turn.snapshot()),
            self._event("response.in_progress", response=self.turn.snapshot()),
        ]

    def feed(self, data: str) -> list[dict[str, Any]]:
        if data == "[DONE]":
            self.ended = True
            return []
        try:
            chunk = json.loads(data)
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            return self._fail(f"the runner sent an unreadable event: {data[:200]}")
        if chunk.get("error"):
            return self._fail(error_message(data.encode()))
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        events: list[dict[str, Any]] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            self.output_tokens += chunk_tokens(delta)
            if isinstance(delta.get("content"), str) and delta["content"]:
                events += self._text(delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._tool_call(call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def finish(self, input_tokens: int | None = None) -> list[dict[str, Any]]:
        """The closing events; `input_tokens` counts the prompt when the runner did not."""
        if self.error is None and self.finish_reason is None:
            self.error = "the runner ended its answer early"
        if self.error is not None:
            return [self._event("response.failed", response=self.turn.fail(self.error))]
        status = "incomplete" if self.finish_reason == "length" else "completed"
        # An answer is never nothing: an empty one is an empty message, as without a stream.
        events = [] if self.output else self._text("")
        events += self._close(status)
        usage = usage_of(self.usage)
        if usage is None:
            generated = output_tokens(
                None,
                self.finish_reason,
                self.turn.response["max_output_tokens"],
                self.output_tokens,
            )
            usage = usage_of({"prompt_tokens": input_tokens or 0, "completion_tokens": generated})
        response = self.turn.finish(self.output, self.finish_reason, usage)
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        events.append(self._event(kind, response=response))
        return events

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _fail(self, message: str) -> list[dict[str, Any]]:
        self.error = message
        self.ended = True
        return []

    def _text(self, text: str) -> list[dict[str, Any]]:
        events = []
        if self.open is None or self.open != self.text_item:
            events += self._close("completed")
            item = _output_message("", "in_progress")
            item["content"] = []
            self.output.append(item)
            self.open = self.text_item = len(self.output) - 1
            events.append(
                self._event(
                    "response.output_item.added", output_index=self.open, item=copy.deepcopy(item)
                )
            )
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=self.open,
                    content_index=0,
                    part=_output_text(""),
                )
            )
            item["content"].append(_output_text(""))
        if not text:
            return events
        item = self.output[self.open]
        item["content"][0]["text"] += text
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=item["id"],
                output_index=self.open,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return events

    def _tool_call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        position = call.get("index", len(self.calls))
        function = call.get("function") or {}
        events = []
        if position not in self.calls:
            events += self._close("completed")
            item = _function_call(
                call.get("id") or "call_" + secrets.token_hex(12),
                function.get("name") or "",
                "",
                "in_progress",
            )
            self.output.append(item)
            self.open = self.calls[position] = len(self.output) - 1
            events.append(
                self._event(
                    "response.output_item.added", output_index=self.open, item=copy.deepcopy(item)
                )
            )
        index = self.calls[position]
        fragment = function.get("arguments") or ""
        if fragment:
            self.output[index]["arguments"] += fragment
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=self.output[index]["id"],
                    output_index=index,
                    delta=fragment,
                )
            )
        return events

    def _close(self, status: str) -> list[dict[str, Any]]:
        """The done events of the item being written, which ends with `status`."""
        if self.open is None:
            return []
        index, self.open = self.open, None
        item = self.output[index]
        item["status"] = status
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            common = {"item_id": item["id"], "output_index": index, "content_index": 0}
            events.append(
                self._event("response.output_text.done", text=part["text"], logprobs=[], **common)
            )
            events.append(
                self._event("response.content_part.done", part=copy.deepcopy(part), **common)
            )
        else:
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        events.append(
            self._event("response.output_item.done", output_index=index, item=copy.deepcopy(item))
        )
        return events


def encode_event(event: Mapping[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
