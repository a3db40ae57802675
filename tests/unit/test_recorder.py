"""The request log: records, media truncation, stream reassembly, limits, subscribers, and
the `/engines/requests` route driven through Starlette's ASGI interface."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Message

from dmr_cli.runtime.config import RunnerConfig
from dmr_cli.server import recorder as rec
from dmr_cli.server.configs import ConfigKey, ConfigStore
from dmr_cli.server.recorder import Record, Recorder, reassemble_stream, truncate_media
from dmr_cli.store import Store
from tests.helpers.oci import hand_artifact

MODEL_ID = "sha256:" + "ab" * 32
CHAT = b'{"model":"ai/tiny","messages":[{"role":"user","content":"hi"}]}'
HEADERS = {
    "user-agent": "test-agent/1",
    "authorization": "Bearer sk-secret",
    "x-api-key": "secret-key",
    "x-request-origin": "ollama/completion",
}


def sse(*chunks: Any, done: bool = True) -> bytes:
    lines = [f"data: {json.dumps(c)}\n\n" for c in chunks]
    return ("".join(lines) + ("data: [DONE]\n\n" if done else "")).encode()


class Sink:
    """The client's end: what reached it through the record's sink."""

    def __init__(self) -> None:
        self.status = 0
        self.chunks: list[bytes] = []
        self.ended = False

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status

    def body(self, data: bytes, more: bool) -> None:
        if data:
            self.chunks.append(data)
        self.ended = not more

    def paused(self) -> None:
        return None


def answer(record: Record, status: int, *chunks: bytes) -> None:
    """An answer sent through the record's sink, as the relay sends it."""
    client = Sink()
    sink = record.recording(client)
    sink.start(status, [])
    for chunk in chunks:
        sink.body(chunk, True)
    sink.body(b"", False)
    assert (client.status, client.chunks, client.ended) == (status, list(chunks), True)


def exchange(recorder: Recorder, status: int, *chunks: bytes, body: bytes = CHAT) -> Record:
    record = recorder.start(
        MODEL_ID, "ai/tiny", "POST", "/engines/v1/chat/completions", body, HEADERS, started=0.0
    )
    answer(record, status, *chunks)
    record.finish()
    return record


def test_record_shape_and_no_secrets() -> None:
    recorder = Recorder()
    answer_body = b'{"object":"chat.completion","choices":[]}'
    record = exchange(recorder, 200, answer_body)
    out = record.to_json()
    assert list(out) == [
        "id",
        "model",
        "method",
        "url",
        "request",
        "response",
        "timestamp",
        "status_code",
        "user_agent",
        "origin",
    ]
    model_id, _, nanos = out["id"].rpartition("_")
    assert model_id == MODEL_ID and nanos.isdigit() and len(nanos) >= 18
    assert out["model"] == "ai/tiny" and out["method"] == "POST"
    assert out["url"] == "/engines/v1/chat/completions"
    assert out["request"] == CHAT.decode()
    assert out["response"] == answer_body.decode()
    assert out["status_code"] == 200
    assert out["user_agent"] == "test-agent/1" and out["origin"] == "ollama/completion"
    assert isinstance(out["timestamp"], int)
    assert "secret" not in json.dumps(out)
    assert record.ttfb is not None and record.ttfb > 0


def test_in_flight_record_and_alias_url() -> None:
    recorder = Recorder()
    record = recorder.start(MODEL_ID, "tiny", "POST", "/v1/completions", b"{}", {})
    out = record.to_json()
    assert out["url"] == "/engines/v1/completions"
    assert out["status_code"] == 0
    assert "response" not in out and "user_agent" not in out and "origin" not in out
    assert record.ttfb is None
    record.finish()  # nothing was sent: DMR records 408
    assert record.to_json()["status_code"] == 408


def test_keeps_the_last_ten_per_model_and_forgets() -> None:
    recorder = Recorder()
    ids = [exchange(recorder, 200, b"{}").id for _ in range(12)]
    other = recorder.start("sha256:" + "cd" * 32, "ai/other", "POST", "/v1/embeddings", b"{}", {})
    ((model_id, records),) = recorder.snapshot(MODEL_ID)
    assert model_id == MODEL_ID
    assert [r.id for r in records] == ids[2:]
    assert {mid for mid, _ in recorder.snapshot()} == {MODEL_ID, other.model_id}
    recorder.forget(MODEL_ID)
    assert recorder.snapshot(MODEL_ID) == []
    assert [mid for mid, _ in recorder.snapshot()] == [other.model_id]


def test_errors_are_recorded_as_json() -> None:
    recorder = Recorder()
    plain = exchange(recorder, 500, b"model failed to load\n").to_json()
    assert "response" not in plain
    assert json.loads(plain["error"]) == {"error": "model failed to load"}
    structured = b'{"error":{"code":400,"message":"bad"}}'
    assert exchange(recorder, 400, structured).to_json()["error"] == structured.decode()
    record = recorder.start(MODEL_ID, "ai/tiny", "POST", "/v1/completions", b"{}", {})
    record.finish(502, "the runner could not be reached")
    out = record.to_json()
    assert out["status_code"] == 502
    assert json.loads(out["error"]) == {"error": "the runner could not be reached"}


def test_large_answers_are_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rec, "RESPONSE_LIMIT", 10)
    out = exchange(Recorder(), 200, b"0123456789", b"abcdef").to_json()
    assert out["response"] == "0123456789...[truncated 6 bytes]"


# -- media truncation ---------------------------------------------------------------------


def test_media_is_truncated_and_other_bodies_stay_byte_for_byte() -> None:
    image = "data:image/png;base64," + "A" * 500
    audio = "B" * 300
    anthropic = {"type": "base64", "media_type": "image/png", "data": "C" * 200}
    body = {
        "model": "x",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
                    {"type": "image", "source": anthropic},
                    {"type": "image_url", "image_url": {"url": "https://x/" + "p" * 200}},
                    {"type": "text", "text": "data: " + "D" * 200},
                ],
            }
        ],
    }
    out = json.loads(truncate_media(json.dumps(body).encode()))
    parts = out["messages"][0]["content"]
    assert parts[0]["image_url"]["url"] == (
        "data:image/png;base64," + "A" * 100 + "...[truncated 400 chars]"
    )
    assert parts[1]["input_audio"] == {
        "data": "B" * 100 + "...[truncated 200 chars]",
        "format": "wav",
    }
    assert parts[2]["source"]["data"] == "C" * 100 + "...[truncated 100 chars]"
    assert parts[3]["image_url"]["url"] == "https://x/" + "p" * 200  # not media
    assert parts[4]["text"] == "data: " + "D" * 200
    # Nothing to cut: the body as sent (spacing included), without a parse.
    spaced = (
        b'{ "model" : "x",  "messages": [{"role":"user","content":"data: ' + b"x" * 200 + b'"}]}'
    )
    assert truncate_media(spaced) == spaced.decode()
    assert truncate_media(b"not json data:" + b"x" * 200) == "not json data:" + "x" * 200


# -- stream reassembly --------------------------------------------------------------------


def chat_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "tiny",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


def test_chat_stream_becomes_one_chat_completion() -> None:
    call = {"index": 0, "id": "call_1", "type": "function"}
    stream = sse(
        chat_chunk({"role": "assistant", "content": None}),
        chat_chunk({"reasoning_content": "think"}),
        chat_chunk({"content": "Hel"}),
        chat_chunk({"content": "lo"}),
        chat_chunk({"tool_calls": [{**call, "function": {"name": "f", "arguments": '{"a"'}}]}),
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}),
        chat_chunk({}, "tool_calls"),
        {"id": "chatcmpl-1", "choices": [], "usage": {"total_tokens": 9}},
    )
    out = exchange(Recorder(), 200, stream[:40], stream[40:]).to_json()  # split mid-line
    final = json.loads(out["response"])
    assert final["object"] == "chat.completion"
    assert final["usage"] == {"total_tokens": 9}
    (choice,) = final["choices"]
    assert choice["finish_reason"] == "tool_calls" and "delta" not in choice
    assert choice["message"] == {
        "role": "assistant",
        "content": "Hello",
        "reasoning_content": "think",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
        ],
    }


def test_text_completion_stream_and_missing_finish_reason() -> None:
    chunks = [
        {"object": "text_completion", "choices": [{"index": 0, "text": t, "finish_reason": None}]}
        for t in ("a", "b")
    ]
    response, error = reassemble_stream(sse(*chunks).decode())
    final = json.loads(response)
    assert error == "" and final["object"] == "text_completion"
    assert final["choices"] == [{"index": 0, "text": "ab", "finish_reason": "stop"}]


def test_anthropic_stream_becomes_one_message() -> None:
    def event(kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        return kind, {"type": kind, **fields}

    def delta(index: int, **fields: Any) -> tuple[str, dict[str, Any]]:
        return event("content_block_delta", index=index, delta=fields)

    tool = {"type": "tool_use", "id": "t", "name": "f", "input": {}}
    events = [
        event("message_start", message={"id": "m", "usage": {"input_tokens": 3}}),
        event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        delta(0, type="text_delta", text="Hi"),
        delta(0, type="text_delta", text="!"),
        event("content_block_start", index=1, content_block=tool),
        delta(1, type="input_json_delta", partial_json='{"x":'),
        delta(1, type="input_json_delta", partial_json=" 2}"),
        event("message_delta", delta={"stop_reason": "tool_use"}, usage={"output_tokens": 5}),
        event("message_stop"),
    ]
    text = "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)
    response, error = reassemble_stream(text)
    message = json.loads(response)
    assert error == ""
    assert message["content"] == [
        {"type": "text", "text": "Hi!"},
        {"type": "tool_use", "id": "t", "name": "f", "input": {"x": 2}},
    ]
    assert message["stop_reason"] == "tool_use"
    assert message["usage"] == {"input_tokens": 3, "output_tokens": 5}


def test_errors_inside_streams() -> None:
    # llama-server's error event, and the one dmr's relay adds when a runner dies.
    died = {
        "error": {"message": "the runner exited unexpectedly", "type": "server_error", "code": 500}
    }
    out = exchange(Recorder(), 200, sse(chat_chunk({"content": "a"}), died, done=False)).to_json()
    assert "response" not in out and out["status_code"] == 200
    error = json.loads(out["error"])
    assert error["status_code"] == 500
    assert error["message"] == "the runner exited unexpectedly"
    assert error["type"] == "server_error"
    assert json.loads(error["details"]) == died
    # DMR's `error:` lines, parseable or not.
    _, error_text = reassemble_stream('data: {"choices":[]}\n\nerror: {"message":"boom"}\n\n')
    assert json.loads(error_text)["message"] == "boom"
    assert json.loads(error_text)["status_code"] == 400
    _, error_text = reassemble_stream("error: something broke\n\n")
    assert json.loads(error_text)["message"] == "something broke"
    # An Anthropic error event.
    anthropic_error = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    _, error_text = reassemble_stream(f"event: error\ndata: {json.dumps(anthropic_error)}\n\n")
    assert json.loads(error_text)["type"] == "overloaded_error"


def test_unparseable_stream_is_kept_as_sent() -> None:
    assert reassemble_stream("data: not json\n\n") == ("data: not json\n\n", "")


# -- subscribers --------------------------------------------------------------------------


def test_subscribers_get_finished_records_and_a_slow_one_loses_the_oldest() -> None:
    async def go() -> None:
        recorder = Recorder()
        everything = recorder.subscribe()
        only_other = recorder.subscribe("sha256:" + "cd" * 32)
        small = rec.Subscriber(None, size=2)
        recorder._subscribers.add(small)
        records = []
        for n in range(3):
            record = recorder.start(MODEL_ID, "ai/tiny", "POST", "/v1/completions", b"{}", {})
            assert everything.queue.qsize() == n  # nothing before it finishes
            record.finish(200)
            records.append(record)
        assert [everything.queue.get_nowait() for _ in range(3)] == records
        assert only_other.queue.empty()
        assert [small.queue.get_nowait() for _ in range(2)] == records[1:]  # oldest dropped
        recorder.unsubscribe(everything)
        recorder.start(MODEL_ID, "ai/tiny", "POST", "/v1/completions", b"{}", {}).finish(200)
        assert everything.queue.empty()

    asyncio.run(go())


# -- the route ----------------------------------------------------------------------------


@pytest.fixture
def state(tmp_path: Path) -> SimpleNamespace:
    store = Store(tmp_path / "models")
    store.ensure_layout()
    art = hand_artifact([b"GGUF-ish layer"])
    for blob in [*art.layers, art.config]:
        store.write_blob_bytes(blob)
    store.write_model(art.manifest, ["ai/tiny"])
    configs = ConfigStore(store.root)
    configs.set(
        ConfigKey("llama.cpp", art.id, "completion"), "ai/tiny", RunnerConfig(context_size=512)
    )
    return SimpleNamespace(
        store=store,
        scheduler=SimpleNamespace(configs=configs),
        recorder=Recorder(),
        model_id=art.id,
    )


def app_for(state: SimpleNamespace) -> Starlette:
    app = Starlette(routes=[Route("/engines/requests", rec.requests_route, methods=["GET"])])
    app.state.dmr = state
    return app


async def get(
    app: Starlette,
    query: str = "",
    accept: str = "application/json",
    on_message: Callable[[Message], Awaitable[None]] | None = None,
    disconnect: asyncio.Event | None = None,
) -> list[Message]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/engines/requests",
        "raw_path": b"/engines/requests",
        "query_string": query.encode(),
        "headers": [(b"accept", accept.encode())],
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1),
        "root_path": "",
    }
    received = False
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if disconnect is not None:
            await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if on_message is not None:
            await on_message(message)

    await app(scope, receive, send)
    return sent


def body_of(sent: list[Message]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_json_route(state: SimpleNamespace) -> None:
    app = app_for(state)
    assert json.loads(body_of(asyncio.run(get(app)))) == []
    recorder: Recorder = state.recorder
    record = recorder.start(state.model_id, "tiny", "POST", "/v1/chat/completions", CHAT, HEADERS)
    answer(record, 200, b'{"ok":true}')
    record.finish()
    other = "sha256:" + "cd" * 32
    recorder.start(other, "gone", "POST", "/v1/embeddings", b"{}", {})  # still running

    sent = asyncio.run(get(app))
    assert sent[0]["status"] == 200
    assert (b"content-type", b"application/json") in sent[0]["headers"]
    groups = {g["model"]: g for g in json.loads(body_of(sent))}
    assert set(groups) == {state.model_id, other}
    mine = groups[state.model_id]
    assert mine["count"] == 1 and mine["config"] == {"context-size": 512}
    assert mine["records"][0]["response"] == '{"ok":true}'
    assert groups[other]["config"] == {} and groups[other]["records"][0]["status_code"] == 0
    # ?model= takes any spelling of a local model, or an ID that is no longer local.
    for query in ("model=ai/tiny", "model=tiny", f"model={state.model_id}"):
        (group,) = json.loads(body_of(asyncio.run(get(app, query))))
        assert group["model"] == state.model_id
    (group,) = json.loads(body_of(asyncio.run(get(app, f"model={other}"))))
    assert group["model"] == other
    assert json.loads(body_of(asyncio.run(get(app, "model=ai/unknown")))) == []


def test_event_stream_route(state: SimpleNamespace) -> None:
    recorder: Recorder = state.recorder
    earlier = recorder.start(state.model_id, "tiny", "POST", "/v1/completions", b"{}", {})
    earlier.finish(200)

    async def go() -> bytes:
        app = app_for(state)
        disconnect = asyncio.Event()
        events: list[bytes] = []

        async def on_message(message: Message) -> None:
            if message.get("body"):
                events.append(message["body"])

        task = asyncio.create_task(
            get(
                app, "include_existing=true&model=tiny", "text/event-stream", on_message, disconnect
            )
        )
        while len(events) < 2:  # connected + one existing_request
            await asyncio.sleep(0.01)
        record = recorder.start(state.model_id, "ai/tiny", "POST", "/v1/chat/completions", CHAT, {})
        answer(record, 200, sse(chat_chunk({"content": "yo"})))
        record.finish()
        recorder.start("sha256:" + "cd" * 32, "x", "POST", "/v1/completions", b"{}", {}).finish(200)
        while len(events) < 3:
            await asyncio.sleep(0.01)
        assert len(recorder._subscribers) == 1
        disconnect.set()
        sent = await task
        assert recorder._subscribers == set()  # a follower that left is forgotten
        assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
        return b"".join(events)

    text = asyncio.run(go()).decode()
    blocks = text.split("\n\n")
    assert blocks[0] == 'event: connected\ndata: {"status": "connected"}'
    kinds = [b.split("\n")[0] for b in blocks if b]
    assert kinds == ["event: connected", "event: existing_request", "event: new_request"]
    existing = json.loads(blocks[1].split("\n")[1].removeprefix("data: "))
    assert existing[0]["records"][0]["id"] == earlier.id
    (new,) = json.loads(blocks[2].split("\n")[1].removeprefix("data: "))
    assert new["count"] == 1 and new["model"] == state.model_id
    assert new["config"] == {"context-size": 512}
    assert json.loads(new["records"][0]["response"])["choices"][0]["message"]["content"] == "yo"
