"""The real `anthropic` SDK against `dmr serve`'s /anthropic routes (spec §2.9), with both
runner kinds: a native llama-server (which implements the Messages API: requests pass
through) and the embedded engine (which does not: requests are translated)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import MessageParam

from tests.helpers.daemon import Daemon, start_tiny

MAX_TOKENS = 8
SYSTEM = "You are terse."
CONVERSATION: list[MessageParam] = [
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": [{"type": "text", "text": "hi there"}]},
    {"role": "user", "content": "tell me more"},
]
WEATHER: Any = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
BODY_LIMIT = 10 * 1024 * 1024
# Greedy decoding, so that answers repeat. The SDK no longer has a `temperature` argument;
# older clients still send the field, and both the runner and the translation honour it.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module", params=["native", "embedded"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Daemon]]:
    tmp = tmp_path_factory.mktemp(request.param)
    native = request.getfixturevalue("native_llama_server") if request.param == "native" else None
    daemon = start_tiny(request.param, tmp, native)
    yield request.param, daemon
    daemon.stop()


@pytest.fixture
def client(served: tuple[str, Daemon]) -> Iterator[anthropic.Anthropic]:
    _, daemon = served
    # max_retries=0: a failure must show, not be retried away.
    with anthropic.Anthropic(
        base_url=daemon.url + "/anthropic", api_key="unused", max_retries=0, timeout=120
    ) as sdk:
        yield sdk


def text_of(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def runner_requests(daemon: Daemon) -> list[dict[str, Any]]:
    """The chat completions the runner received, oldest first (the request log, §9.2)."""
    groups = httpx.get(daemon.url + "/engines/requests", params={"model": "ai/tiny"}).json()
    return [
        json.loads(record["request"])
        for group in groups
        for record in group["records"]
        if record["url"] == "/engines/v1/chat/completions"
    ]


def test_create_with_system_prompt_and_several_turns(
    client: anthropic.Anthropic, served: tuple[str, Daemon]
) -> None:
    kind, daemon = served
    message = client.messages.create(
        model="ai/tiny",
        max_tokens=MAX_TOKENS,
        extra_body=GREEDY,
        system=SYSTEM,
        messages=CONVERSATION,
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.id
    assert all(block.type == "text" for block in message.content)
    # The tiny model's random tokens may include its end token.
    assert message.stop_reason in ("end_turn", "max_tokens")
    if message.stop_reason == "max_tokens":
        assert message.usage.output_tokens == MAX_TOKENS
    # llama-server counts cached prompt tokens apart, as Anthropic does.
    prompt = message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
    counted = client.messages.count_tokens(model="ai/tiny", system=SYSTEM, messages=CONVERSATION)
    assert prompt == counted.input_tokens
    if kind == "embedded":
        # Translated: the runner got the system prompt and every turn as chat messages.
        assert runner_requests(daemon)[-1]["messages"] == [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": "hi there"},
            {"role": "user", "content": "tell me more"},
        ]


def test_count_tokens_grows_with_the_prompt(client: anthropic.Anthropic) -> None:
    def count(**kwargs: Any) -> int:
        return client.messages.count_tokens(model="ai/tiny", **kwargs).input_tokens

    single = count(messages=CONVERSATION[:1])
    assert single > 0
    assert count(messages=CONVERSATION) > single
    assert count(messages=CONVERSATION, system=SYSTEM) > count(messages=CONVERSATION)


def test_stream_assembles_the_same_answer(client: anthropic.Anthropic) -> None:
    whole = client.messages.create(
        model="ai/tiny", max_tokens=MAX_TOKENS, extra_body=GREEDY, messages=CONVERSATION
    )
    with client.messages.stream(
        model="ai/tiny", max_tokens=MAX_TOKENS, extra_body=GREEDY, messages=CONVERSATION
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    # Greedy decoding: the streamed answer, put together, is the non-streamed one.
    assert text == text_of(whole) == text_of(final)
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    if final.stop_reason == "max_tokens":
        assert final.usage.output_tokens == MAX_TOKENS


def test_stream_event_grammar(client: anthropic.Anthropic) -> None:
    # Greedy: a sampled answer may end at once, with no output token to count.
    events = list(
        client.messages.create(
            model="ai/tiny",
            max_tokens=MAX_TOKENS,
            messages=CONVERSATION,
            stream=True,
            extra_body=GREEDY,
        )
    )
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    open_block = None
    for event in events:
        if event.type == "content_block_start":
            assert open_block is None
            open_block = event.index
        elif event.type == "content_block_delta":
            assert event.index == open_block
        elif event.type == "content_block_stop":
            assert event.index == open_block
            open_block = None
    assert open_block is None
    delta = events[-2]
    assert delta.type == "message_delta"
    assert delta.delta.stop_reason in ("end_turn", "max_tokens")
    assert delta.usage.output_tokens > 0


def test_stop_sequences(client: anthropic.Anthropic, served: tuple[str, Daemon]) -> None:
    kind, _ = served
    request: dict[str, Any] = {
        "model": "ai/tiny",
        "max_tokens": MAX_TOKENS,
        "extra_body": GREEDY,
        "messages": CONVERSATION,
    }
    text = text_of(client.messages.create(**request))
    # A letter or digit the greedy answer has after its start, first seen there, ends it
    # early. (llama-server's own stop matching misses a backslash.)
    cut = next(
        (
            i
            for i, ch in enumerate(text)
            if i and ch.isascii() and ch.isalnum() and ch not in text[:i]
        ),
        None,
    )
    assert cut is not None, f"no usable stop character in {text!r}"
    stopped = client.messages.create(**request, stop_sequences=[text[cut]])
    assert text_of(stopped) == text[:cut]
    assert stopped.stop_sequence == text[cut]
    # llama-server's own Messages API reports end_turn along with the stop sequence.
    assert stopped.stop_reason == ("stop_sequence" if kind == "embedded" else "end_turn")
    with client.messages.stream(**request, stop_sequences=[text[cut]]) as stream:
        assert "".join(stream.text_stream) == text[:cut]
        assert stream.get_final_message().stop_sequence == text[cut]


def test_tool_use_round_trip(client: anthropic.Anthropic, served: tuple[str, Daemon]) -> None:
    kind, daemon = served
    asked: list[MessageParam] = [{"role": "user", "content": "weather in Paris?"}]
    message = client.messages.create(
        model="ai/tiny",
        max_tokens=48,
        extra_body=GREEDY,
        messages=asked,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    if kind == "embedded":
        # llama-cpp-python constrains the answer to a call of the chosen tool.
        assert message.stop_reason in ("tool_use", "max_tokens")
        calls = [block for block in message.content if block.type == "tool_use"]
        assert len(calls) == 1
        assert calls[0].name == "get_weather" and isinstance(calls[0].input, dict)
    else:
        # The tiny model's chat template knows no tools: llama-server answers in text.
        assert message.stop_reason in ("end_turn", "max_tokens")
    answer = client.messages.create(
        model="ai/tiny",
        max_tokens=MAX_TOKENS,
        messages=[
            *asked,
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    }
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}],
            },
        ],
        tools=[WEATHER],
    )
    assert answer.type == "message" and answer.stop_reason in ("end_turn", "max_tokens")
    if kind == "embedded":
        sent = runner_requests(daemon)[-1]["messages"]
        assert sent[1:] == [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        ]


def test_unknown_model_is_not_found(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="ai/absent", max_tokens=4, messages=CONVERSATION)
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "Model not found: ai/absent"},
    }
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="ai/absent", messages=CONVERSATION)


@pytest.mark.parametrize(
    ("body", "status", "kind", "message"),
    [
        (b'{"model": ', 400, "invalid_request_error", "Invalid JSON in request body"),
        (b"[]", 400, "invalid_request_error", "Invalid JSON in request body"),
        (b'{"messages": []}', 400, "invalid_request_error", "Missing required field: model"),
        (b'{"model": 7}', 400, "invalid_request_error", "model: Input should be a valid string"),
        (
            b'{"model": "ai/tiny"}',
            400,
            "invalid_request_error",
            "messages: Input should be a valid list",
        ),
        (
            b'{"model": "ai/absent", "messages": []}',
            404,
            "not_found_error",
            "Model not found: ai/absent",
        ),
    ],
)
@pytest.mark.parametrize("path", ["/anthropic/v1/messages", "/anthropic/v1/messages/count_tokens"])
def test_bad_input_gets_anthropic_errors(
    served: tuple[str, Daemon], path: str, body: bytes, status: int, kind: str, message: str
) -> None:
    _, daemon = served
    response = httpx.post(daemon.url + path, content=body)
    assert response.status_code == status
    assert response.json() == {"type": "error", "error": {"type": kind, "message": message}}


def test_oversized_bodies_and_wrong_methods(served: tuple[str, Daemon]) -> None:
    _, daemon = served
    body = b'{"model": "ai/tiny", "pad": "' + b"a" * BODY_LIMIT + b'"}'
    response = httpx.post(daemon.url + "/anthropic/v1/messages", content=body, timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"
    assert httpx.get(daemon.url + "/anthropic/v1/messages").status_code == 405


def test_translation_refuses_what_it_cannot_express(served: tuple[str, Daemon]) -> None:
    kind, daemon = served
    document = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": "x"},
    }
    response = httpx.post(
        daemon.url + "/anthropic/v1/messages",
        json={
            "model": "ai/tiny",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": [document]}],
        },
        timeout=120,
    )
    if kind == "embedded":
        assert response.status_code == 400
        assert response.json() == {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "messages.0.content.0: content block type 'document' is not supported",
            },
        }
    else:
        # llama-server's own Messages API decides; whatever it says comes in Anthropic's shape.
        assert response.json()["type"] in ("message", "error")


def test_engines_messages_route_passes_through(served: tuple[str, Daemon]) -> None:
    kind, daemon = served
    with anthropic.Anthropic(
        base_url=daemon.url + "/engines", api_key="unused", max_retries=0, timeout=120
    ) as sdk:
        if kind == "native":
            message = sdk.messages.create(
                model="ai/tiny", max_tokens=MAX_TOKENS, messages=CONVERSATION
            )
            assert message.type == "message"
            assert message.stop_reason in ("end_turn", "max_tokens")
        else:
            # DMR's /engines route relays to the runner as is; only /anthropic translates.
            with pytest.raises(anthropic.NotFoundError):
                sdk.messages.create(model="ai/tiny", max_tokens=MAX_TOKENS, messages=CONVERSATION)
