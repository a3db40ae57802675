"""The request log: the last request/response pairs per model, and `/engines/requests`
(spec §9.2).

Recording sits on the inference path, so it costs what it must and no more: `start` keeps a
reference to the request body, the recording sink appends each response chunk to a list,
and `finish` marks the record done and wakes subscribers. Turning that into the record DMR
shows (base64 media cut short, an event stream reassembled into one JSON answer) happens
when someone reads the log, once per record, and off the event loop for large records.
Headers are never kept, so API keys and Authorization headers cannot leak into the log.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from dmr_cli.server.http import query_bool
from dmr_cli.server.relay import Sink

MAX_RECORDS = 10  # per model, as DMR
SUBSCRIBER_BUFFER = 100  # events a slow follower may lag behind before the oldest are dropped
MEDIA_KEEP = 100  # characters of base64 media kept in a recorded request
RESPONSE_LIMIT = 4 * 1024 * 1024  # bytes of an answer kept (embeddings can be huge)
INLINE_LIMIT = 256 * 1024  # records larger than this are prepared in a worker thread
STREAM_ERROR_STATUS = 400  # DMR's status for an error inside a stream that names none
_ALIAS_PREFIXES = ("/v1/", "/rerank", "/score")
_ANTHROPIC_EVENTS = {"message_start", "content_block_start", "content_block_delta"}


class Record:
    """One request and its answer; also the handle the relay reports the answer to."""

    __slots__ = (
        "_body",
        "_chunks",
        "_done",
        "_json",
        "_recorder",
        "_size",
        "error",
        "first_byte",
        "id",
        "method",
        "model",
        "model_id",
        "origin",
        "started",
        "status_code",
        "timestamp",
        "url",
        "user_agent",
    )

    def __init__(
        self,
        recorder: Recorder,
        model_id: str,
        model_ref: str,
        method: str,
        url: str,
        body: bytes,
        user_agent: str,
        origin: str,
        started: float,
    ) -> None:
        self._recorder = recorder
        self.model_id, self.model, self.method, self.url = model_id, model_ref, method, url
        self.id = f"{model_id}_{time.time_ns()}"
        self.timestamp = int(time.time())
        self.user_agent, self.origin = user_agent, origin
        self.started = started  # time.perf_counter() when the request arrived
        self.first_byte: float | None = None
        self.status_code = 0
        self.error = ""
        self._body = body
        self._chunks: list[bytes] = []
        self._size = 0
        self._done = False
        self._json: dict[str, Any] | None = None

    # -- the hot path -------------------------------------------------------------------

    def recording(self, sink: Sink) -> Sink:
        """SINK, with the status and the body recorded on their way to the client."""
        return _Recording(self, sink)

    def response_chunk(self, chunk: bytes) -> None:
        if self.first_byte is None:
            self.first_byte = time.perf_counter()
        if self._size < RESPONSE_LIMIT:
            self._chunks.append(chunk)
        self._size += len(chunk)

    def finish(self, status: int | None = None, error: str | None = None) -> None:
        """The exchange is over: STATUS overrides the one seen (none seen: 408, as DMR);
        ERROR is a failure the body does not show (text or JSON)."""
        if self._done:
            return
        if status is not None:
            self.status_code = status
        elif not self.status_code:
            self.status_code = 408
        if error:
            self.error = _error_json(error)
        self._done = True
        self._recorder._finished(self)

    @property
    def ttfb(self) -> float | None:
        """Seconds from arrival to the first byte of the answer, once there was one."""
        return None if self.first_byte is None else self.first_byte - self.started

    # -- reading ------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self._body) + self._size

    def to_json(self) -> dict[str, Any]:
        """DMR's RequestResponsePair; built once the exchange is over, then kept.

        Safe from a worker thread: the inputs are read before the cache is checked, and the
        cache is set before they are released."""
        body, chunks, done = self._body, self._chunks, self._done
        if self._json is not None:
            return self._json
        out: dict[str, Any] = {
            "id": self.id,
            "model": self.model,
            "method": self.method,
            "url": self.url,
            "request": truncate_media(body),
        }
        if done:
            response, error = self._response(chunks)
            if response:
                out["response"] = response
            if error:
                out["error"] = error
        out["timestamp"] = self.timestamp
        out["status_code"] = self.status_code if done else 0
        if self.user_agent:
            out["user_agent"] = self.user_agent
        if self.origin:
            out["origin"] = self.origin
        if done:
            self._json = out
            self._body, self._chunks = b"", []  # what the record shows is all it keeps
        return out

    def _response(self, chunks: list[bytes]) -> tuple[str, str]:
        if self.error:
            return "", self.error
        data = b"".join(chunks)
        text = data.decode("utf-8", "replace")
        if self._size > len(data):
            text += f"...[truncated {self._size - len(data)} bytes]"
        if self.status_code >= 400:
            return "", _error_json(text)
        if text.startswith(("data:", "event:", "error:")) or "\ndata:" in text:
            return reassemble_stream(text)
        return text, ""


class Subscriber:
    """A follower of `/engines/requests`: a bounded queue of finished records."""

    def __init__(self, model_id: str | None, size: int = SUBSCRIBER_BUFFER) -> None:
        self.model_id = model_id
        self.queue: asyncio.Queue[Record] = asyncio.Queue(size)

    def offer(self, record: Record) -> None:
        # A follower that does not keep up loses its oldest events, never slows requests.
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(record)


class _Recording:
    """A sink that tells a record what passes through it."""

    __slots__ = ("record", "sink")

    def __init__(self, record: Record, sink: Sink) -> None:
        self.record = record
        self.sink = sink

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.record.status_code = status
        self.sink.start(status, headers)

    def body(self, data: bytes, more: bool) -> None:
        if data:
            self.record.response_chunk(data)
        self.sink.body(data, more)

    def paused(self) -> asyncio.Future[None] | None:
        return self.sink.paused()


class Recorder:
    """The last MAX_RECORDS exchanges per model ID. Used from the event loop only."""

    def __init__(self, limit: int = MAX_RECORDS) -> None:
        self.limit = limit
        self._models: dict[str, deque[Record]] = {}
        self._subscribers: set[Subscriber] = set()

    def start(
        self,
        model_id: str,
        model_ref: str,
        method: str,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        started: float | None = None,
    ) -> Record:
        """Record a request about to be relayed. BODY is kept by reference (not copied);
        of HEADERS only User-Agent and X-Request-Origin are read."""
        if url.startswith(_ALIAS_PREFIXES):
            url = "/engines" + url  # DMR's aliases rewrite the path before it is recorded
        record = Record(
            self,
            model_id,
            model_ref,
            method,
            url,
            body,
            headers.get("user-agent", ""),
            headers.get("x-request-origin", ""),
            time.perf_counter() if started is None else started,
        )
        records = self._models.get(model_id)
        if records is None:
            records = self._models[model_id] = deque(maxlen=self.limit)
        records.append(record)
        return record

    def forget(self, model_id: str) -> None:
        """Drop a model's records (its runners are gone)."""
        self._models.pop(model_id, None)

    def snapshot(self, model_id: str | None = None) -> list[tuple[str, list[Record]]]:
        """(model ID, records oldest first) for every model, or for MODEL_ID only."""
        if model_id is not None:
            records = self._models.get(model_id)
            return [(model_id, list(records))] if records else []
        return [(mid, list(records)) for mid, records in self._models.items() if records]

    def subscribe(self, model_id: str | None = None) -> Subscriber:
        subscriber = Subscriber(model_id)
        self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)

    def _finished(self, record: Record) -> None:
        for subscriber in self._subscribers:
            if subscriber.model_id is None or subscriber.model_id == record.model_id:
                subscriber.offer(record)


# -- preparing records --------------------------------------------------------------------


def truncate_media(body: bytes) -> str:
    """The request as text, with base64 media (image data URIs, input_audio data,
    Anthropic base64 image sources) cut to MEDIA_KEEP characters."""
    text = body.decode("utf-8", "replace")
    if len(body) <= MEDIA_KEEP or not (
        b"data:" in body or b'"input_audio"' in body or b'"base64"' in body
    ):
        return text  # nothing to cut: no parse, the body is kept as sent
    try:
        payload = json.loads(text)
    except ValueError:
        return text
    messages = payload.get("messages") if isinstance(payload, dict) else None
    changed = False
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        for item in content if isinstance(content, list) else []:
            if isinstance(item, dict):
                changed |= _truncate_item(item)
    if not changed:
        return text
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def _truncate_item(item: dict[str, Any]) -> bool:
    changed = False
    image = item.get("image_url")
    if isinstance(image, dict) and isinstance(image.get("url"), str):
        url = image["url"]
        if url.startswith("data:"):
            prefix, _, data = url.partition(",")
            if len(data) > MEDIA_KEEP:
                image["url"] = f"{prefix},{_cut(data)}"
                changed = True
    for key, data_key in (("input_audio", "data"), ("source", "data")):
        holder = item.get(key)
        if isinstance(holder, dict) and isinstance(holder.get(data_key), str):
            if key == "source" and holder.get("type") != "base64":
                continue
            if len(holder[data_key]) > MEDIA_KEEP:
                holder[data_key] = _cut(holder[data_key])
                changed = True
    return changed


def _cut(data: str) -> str:
    return f"{data[:MEDIA_KEEP]}...[truncated {len(data) - MEDIA_KEEP} chars]"


def _error_json(text: str) -> str:
    """DMR's normalizeErrorToJSON: JSON stays as it is, anything else becomes
    `{"error": "<text>"}`."""
    if not text:
        return '{"error": "unknown error"}'
    try:
        json.loads(text)
    except ValueError:
        return '{"error": ' + json.dumps(text.strip(), ensure_ascii=False) + "}"
    return text


def _stream_error(data: str, error: Any) -> str:
    """DMR's StreamingError as JSON: status_code, message, type, details."""
    out: dict[str, Any] = {"status_code": STREAM_ERROR_STATUS, "message": "streaming error"}
    if isinstance(error, dict):
        if isinstance(error.get("code"), int):
            out["status_code"] = error["code"]
        if isinstance(error.get("message"), str):
            out["message"] = error["message"]
        if isinstance(error.get("type"), str):
            out["type"] = error["type"]
    elif isinstance(error, str):
        out["message"] = error
    out["details"] = data
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def _events(text: str) -> list[tuple[str, str]]:
    """(event name, data) pairs of an event stream, in order; `error:` lines too."""
    out: list[tuple[str, str]] = []
    event = ""
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            out.append((event, line[5:].removeprefix(" ")))
        elif line.startswith("error:"):
            out.append(("error", line[6:].strip()))
        elif not line:
            event = ""
    return out


def reassemble_stream(text: str) -> tuple[str, str]:
    """An event stream (chat, text completion or Anthropic messages) as the one JSON answer
    the same request without `stream` gets: (response, error)."""
    chunks: list[tuple[str, dict[str, Any]]] = []
    for event, data in _events(text):
        if data == "[DONE]":
            break
        try:
            chunk = json.loads(data)
        except ValueError:
            if event == "error":
                return "", _stream_error(data, data)
            continue
        if not isinstance(chunk, dict):
            continue
        if event == "error" or "error" in chunk or chunk.get("type") == "error":
            return "", _stream_error(data, chunk.get("error", chunk))
        chunks.append((event, chunk))
    if not chunks:
        return text, ""
    if any(c.get("type") in _ANTHROPIC_EVENTS for _, c in chunks):
        final = _anthropic(chunks)
    else:
        final = _openai([c for _, c in chunks])
    if final is None:
        return text, ""
    return json.dumps(final, ensure_ascii=False, separators=(",", ":")), ""


def _openai(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    choices: dict[int, dict[str, Any]] = {}
    text_completion = False
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            state = choices.setdefault(index, {"content": [], "reasoning": [], "tools": {}})
            state["last"] = choice
            if isinstance(choice.get("text"), str):
                text_completion = True
                state["content"].append(choice["text"])
            delta = choice.get("delta")
            if isinstance(delta, dict):
                _add_delta(state, delta)
    final = dict(chunks[-1])
    out_choices = []
    for index in sorted(choices, key=lambda i: i if isinstance(i, int) else 0):
        state = choices[index]
        choice = {k: v for k, v in state["last"].items() if k not in ("delta", "text")}
        if text_completion:
            choice["text"] = "".join(state["content"])
        else:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(state["content"])}
            if state["reasoning"]:
                message["reasoning_content"] = "".join(state["reasoning"])
            if state["tools"]:
                message["tool_calls"] = [state["tools"][i] for i in sorted(state["tools"])]
            choice["message"] = message
        if choice.get("finish_reason") is None:
            choice["finish_reason"] = "stop"
        out_choices.append(choice)
    final["choices"] = out_choices
    final["object"] = "text_completion" if text_completion else "chat.completion"
    return final


def _add_delta(state: dict[str, Any], delta: dict[str, Any]) -> None:
    if isinstance(delta.get("content"), str):
        state["content"].append(delta["content"])
    if isinstance(delta.get("reasoning_content"), str):
        state["reasoning"].append(delta["reasoning_content"])
    for call in delta.get("tool_calls") or []:
        if not isinstance(call, dict):
            continue
        tool = state["tools"].setdefault(
            call.get("index", len(state["tools"])),
            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if call.get("id"):
            tool["id"] = call["id"]
        function = call.get("function")
        if isinstance(function, dict):
            for key in ("name", "arguments"):
                if isinstance(function.get(key), str):
                    tool["function"][key] += function[key]


def _anthropic(chunks: list[tuple[str, dict[str, Any]]]) -> dict[str, Any] | None:
    message: dict[str, Any] | None = None
    blocks: dict[int, dict[str, Any]] = {}
    partial_json: dict[int, list[str]] = {}
    for _, chunk in chunks:
        kind = chunk.get("type")
        if kind == "message_start" and isinstance(chunk.get("message"), dict):
            message = dict(chunk["message"])
        elif kind == "content_block_start" and isinstance(chunk.get("content_block"), dict):
            blocks[chunk.get("index", len(blocks))] = dict(chunk["content_block"])
        elif kind == "content_block_delta" and isinstance(chunk.get("delta"), dict):
            index = chunk.get("index", 0)
            block = blocks.setdefault(index, {"type": "text", "text": ""})
            delta = chunk["delta"]
            for key in ("text", "thinking", "signature"):
                if isinstance(delta.get(key), str):
                    block[key] = block.get(key, "") + delta[key]
            if isinstance(delta.get("partial_json"), str):
                partial_json.setdefault(index, []).append(delta["partial_json"])
        elif kind == "message_delta" and message is not None:
            delta = chunk.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason"):
                message["stop_reason"] = delta["stop_reason"]
            if isinstance(chunk.get("usage"), dict):
                message["usage"] = {**(message.get("usage") or {}), **chunk["usage"]}
    if message is None:
        return None
    for index, parts in partial_json.items():
        try:
            blocks[index]["input"] = json.loads("".join(parts))
        except ValueError:
            blocks[index]["input"] = "".join(parts)
    message["content"] = [blocks[i] for i in sorted(blocks)]
    if not message.get("stop_reason"):
        message["stop_reason"] = "end_turn"
    return message


# -- the route ----------------------------------------------------------------------------


def _group_json(model_id: str, config: dict[str, Any], records: list[Record]) -> dict[str, Any]:
    return {
        "count": len(records),
        "model": model_id,
        "config": config,
        "records": [r.to_json() for r in records],
    }


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


async def _prepare(records: list[Record], work: Callable[[], bytes]) -> bytes:
    """Run WORK (which builds records' JSON) inline when small, else in a worker thread."""
    if sum(r.size for r in records) <= INLINE_LIMIT:
        return work()
    return await asyncio.to_thread(work)


def config_for(state: Any, model_id: str) -> dict[str, Any]:
    """The stored runner configuration of a model (completion mode preferred), as DMR's
    BackendConfiguration JSON; `{}` when it has none."""
    stored = [c for c in state.scheduler.configs.all() if c.key.model_id == model_id]
    stored.sort(key=lambda c: c.key.mode != "completion")
    return dict(stored[0].config.to_json()) if stored else {}


async def requests_route(request: Request) -> Response:
    """GET /engines/requests[?model=M][&include_existing=true]: JSON, or an event stream
    with `Accept: text/event-stream`."""
    state = request.app.state.dmr
    recorder: Recorder = state.recorder
    model_id: str | None = None
    wanted = request.query_params.get("model")
    if wanted:
        found = await asyncio.to_thread(state.store.find, wanted)
        model_id = found.id if found is not None else wanted
    if "text/event-stream" in request.headers.get("accept", ""):
        include = "include_existing" in request.query_params and query_bool(
            request, "include_existing"
        )
        return StreamingResponse(
            _follow(state, recorder, model_id, include),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    groups = recorder.snapshot(model_id)
    configs = {mid: config_for(state, mid) for mid, _ in groups}
    body = await _prepare(
        [r for _, records in groups for r in records],
        lambda: (
            _dumps([_group_json(mid, configs[mid], records) for mid, records in groups]) + b"\n"
        ),
    )
    return Response(body, media_type="application/json")


def _event(name: str, model_id: str, config: dict[str, Any], record: Record) -> bytes:
    data = _dumps([_group_json(model_id, config, [record])])
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


async def _follow(
    state: Any, recorder: Recorder, model_id: str | None, include_existing: bool
) -> AsyncIterator[bytes]:
    # Subscribed before the snapshot, in the same step: no record falls between the two.
    subscriber = recorder.subscribe(model_id)
    existing = recorder.snapshot(model_id) if include_existing else []
    try:
        yield b'event: connected\ndata: {"status": "connected"}\n\n'
        for mid, records in existing:
            config = config_for(state, mid)
            for record in records:
                work = functools.partial(_event, "existing_request", mid, config, record)
                yield await _prepare([record], work)
        while True:
            record = await subscriber.queue.get()
            config = config_for(state, record.model_id)
            work = functools.partial(_event, "new_request", record.model_id, config, record)
            yield await _prepare([record], work)
    finally:
        recorder.unsubscribe(subscriber)
