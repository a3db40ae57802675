"""The real `openai` SDK's Responses API against `dmr serve` (spec §2.10), through each
prefix, with both runner kinds: a native llama-server and the embedded engine."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.helpers.daemon import Daemon, start_tiny

PREFIXES = ["", "/v1", "/engines", "/engines/v1", "/engines/llama.cpp/v1"]
MAX_TOKENS = 8
# Greedy decoding with the tiny llama's end tokens (</s>, <|im_end|>) banned: every answer
# runs to max_output_tokens. The Responses API has neither field; llama.cpp's sampling
# options go through as extra fields.
NO_STOP: Any = {"temperature": 0, "logit_bias": {"2": -100, "260": -100}}
# The end token forced: an answer that ends at once, normally.
STOP_AT_ONCE: Any = {"logit_bias": {"2": 100}}
WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
BODY_LIMIT = 10 * 1024 * 1024


@pytest.fixture(scope="module", params=["native", "embedded"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Daemon]]:
    tmp = tmp_path_factory.mktemp(request.param)
    native = request.getfixturevalue("native_llama_server") if request.param == "native" else None
    daemon = start_tiny(request.param, tmp, native)
    try:
        yield request.param, daemon
    finally:
        daemon.stop()


def sdk(daemon: Daemon, prefix: str = "/v1") -> openai.OpenAI:
    # max_retries=0: a failure must show, not be retried away.
    return openai.OpenAI(base_url=daemon.url + prefix, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def client(served: tuple[str, Daemon]) -> Iterator[openai.OpenAI]:
    with sdk(served[1]) as opened:
        yield opened


def runner_requests(daemon: Daemon) -> list[dict[str, Any]]:
    """The chat completions the runner received, oldest first (the request log, §9.2)."""
    groups = httpx.get(daemon.url + "/engines/requests", params={"model": "ai/tiny"}).json()
    return [
        json.loads(record["request"])
        for group in groups
        for record in group["records"]
        if record["url"].endswith("/v1/chat/completions")
    ]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_create_retrieve_list_delete(served: tuple[str, Daemon], prefix: str) -> None:
    _, daemon = served
    with sdk(daemon, prefix) as client:
        response = client.responses.create(
            model="ai/tiny",
            input="hello world",
            instructions="Be terse.",
            max_output_tokens=MAX_TOKENS,
            extra_body=NO_STOP,
        )
        assert response.id.startswith("resp_") and response.object == "response"
        assert response.status == "incomplete"
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
        assert response.instructions == "Be terse." and response.model == "ai/tiny"
        (message,) = response.output
        assert message.type == "message" and message.role == "assistant"
        assert message.content[0].type == "output_text"
        assert response.output_text == message.content[0].text
        assert response.usage is not None
        assert response.usage.output_tokens == MAX_TOKENS
        assert response.usage.input_tokens > 0
        assert response.usage.total_tokens == response.usage.input_tokens + MAX_TOKENS

        retrieved = client.responses.retrieve(response.id)
        assert retrieved.model_dump() == response.model_dump()
        items = client.responses.input_items.list(response.id)
        (item,) = items.data
        assert item.type == "message" and item.role == "user"
        assert [part.model_dump(exclude_none=True) for part in item.content] == [
            {"type": "input_text", "text": "hello world"}
        ]

        client.responses.delete(response.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(response.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.delete(response.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.input_items.list(response.id)


def test_stream_events(client: openai.OpenAI) -> None:
    whole = client.responses.create(
        model="ai/tiny", input="hello world", max_output_tokens=MAX_TOKENS, extra_body=NO_STOP
    )
    events = list(
        client.responses.create(
            model="ai/tiny",
            input="hello world",
            max_output_tokens=MAX_TOKENS,
            extra_body=NO_STOP,
            stream=True,
        )
    )
    kinds = [event.type for event in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas > 0
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",  # OpenAI's last event for an answer cut at max_output_tokens
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    # Greedy decoding: the streamed answer, put together, is the non-streamed one.
    assert text == whole.output_text
    final = events[-1]
    assert final.type == "response.incomplete"
    assert final.response.output_text == text
    assert final.response.usage is not None
    assert final.response.usage.output_tokens == MAX_TOKENS
    assert whole.usage is not None
    assert final.response.usage.input_tokens == whole.usage.input_tokens
    # A streamed response is stored like any other.
    assert client.responses.retrieve(final.response.id).output_text == text


def test_stream_helper_gets_the_completed_response(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model="ai/tiny", input="hello world", max_output_tokens=MAX_TOKENS, extra_body=STOP_AT_ONCE
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[-1] == "response.completed"
    assert final.status == "completed" and final.incomplete_details is None
    assert final.output_text == ""
    assert final.usage is not None and final.usage.input_tokens > 0


def test_previous_response_id_chains_the_conversation(
    client: openai.OpenAI, served: tuple[str, Daemon]
) -> None:
    _, daemon = served
    first = client.responses.create(
        model="ai/tiny",
        input="hello world",
        instructions="Be terse.",
        max_output_tokens=MAX_TOKENS,
        extra_body=NO_STOP,
    )
    second = client.responses.create(
        model="ai/tiny",
        input="tell me more",
        previous_response_id=first.id,
        max_output_tokens=MAX_TOKENS,
        extra_body=NO_STOP,
    )
    assert second.previous_response_id == first.id
    assert runner_requests(daemon)[-1]["messages"] == [
        # The first turn's instructions are not carried over (as OpenAI does).
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "tell me more"},
    ]
    third = client.responses.stream(
        model="ai/tiny",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "and then?"}]}],
        previous_response_id=second.id,
        instructions="Be brief.",
        max_output_tokens=MAX_TOKENS,
        extra_body=STOP_AT_ONCE,
    )
    with third as stream:
        final = stream.get_final_response()
    assert runner_requests(daemon)[-1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "tell me more"},
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "and then?"},
    ]
    assert first.usage is not None and second.usage is not None and final.usage is not None
    assert first.usage.input_tokens < second.usage.input_tokens < final.usage.input_tokens


def test_store_false_keeps_nothing(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="ai/tiny", input="hello", max_output_tokens=4, store=False, extra_body=NO_STOP
    )
    assert response.to_dict()["store"] is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model="ai/tiny", input="again", previous_response_id=response.id, max_output_tokens=4
        )
    assert caught.value.code == "previous_response_not_found"
    assert caught.value.param == "previous_response_id"


def test_function_calls(client: openai.OpenAI, served: tuple[str, Daemon]) -> None:
    kind, daemon = served
    asked = client.responses.create(
        model="ai/tiny",
        input="weather in Paris?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=48,
        extra_body={"temperature": 0},
    )
    if kind == "embedded":
        # llama-cpp-python constrains the answer to a call of the chosen tool.
        (call,) = asked.output
        assert call.type == "function_call" and call.name == "get_weather"
        assert call.call_id and call.arguments.startswith("{")
        call_id = call.call_id
    else:
        # The tiny model's chat template knows no tools: llama-server answers in text.
        assert [item.type for item in asked.output] == ["message"]
        call_id = "call_1"
    answer = client.responses.create(
        model="ai/tiny",
        input=[
            {"type": "function_call", "call_id": call_id, "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": call_id, "output": "sunny"},
        ],
        previous_response_id=asked.id,
        tools=[WEATHER],
        max_output_tokens=MAX_TOKENS,
        extra_body=NO_STOP,
    )
    assert answer.status == "incomplete" and answer.output[0].type == "message"
    sent = runner_requests(daemon)[-1]["messages"]
    assert sent[-2:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "sunny"},
    ]
    assert sent[0] == {"role": "user", "content": "weather in Paris?"}


def test_unknown_model_and_backend(client: openai.OpenAI, served: tuple[str, Daemon]) -> None:
    _, daemon = served
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="ai/absent", input="hi")
    assert "ai/absent" in caught.value.message
    with sdk(daemon, "/engines/nope/v1") as elsewhere, pytest.raises(openai.NotFoundError):
        elsewhere.responses.create(model="ai/tiny", input="hi")


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b'{"model": ', None, None),
        (b'{"input": "hi"}', "model", "missing_required_parameter"),
        (b'{"model": "ai/tiny"}', "input", "missing_required_parameter"),
        (b'{"model": "ai/tiny", "input": 42}', "input", "invalid_type"),
        (
            b'{"model": "ai/tiny", "input": "hi", "max_output_tokens": "8"}',
            "max_output_tokens",
            "invalid_type",
        ),
        (
            b'{"model": "ai/tiny", "input": "hi", "tools": [{"type": "web_search"}]}',
            "tools[0].type",
            "unsupported_value",
        ),
        (
            b'{"model": "ai/tiny", "input": "hi", "previous_response_id": "resp_nope"}',
            "previous_response_id",
            "previous_response_not_found",
        ),
    ],
)
def test_bad_input_gets_openai_errors(
    served: tuple[str, Daemon], body: bytes, param: str | None, code: str | None
) -> None:
    _, daemon = served
    response = httpx.post(daemon.url + "/v1/responses", content=body)
    assert response.status_code == 400
    error = error_of(response)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert error["message"]


def test_unknown_ids_oversized_bodies_and_wrong_methods(served: tuple[str, Daemon]) -> None:
    _, daemon = served
    for path in ("/responses/resp_nope", "/v1/responses/resp_nope/input_items"):
        response = httpx.get(daemon.url + path)
        assert response.status_code == 404
        assert error_of(response)["message"] == "Response with id 'resp_nope' not found."
    assert httpx.delete(daemon.url + "/engines/v1/responses/resp_nope").status_code == 404
    response = httpx.get(daemon.url + "/engines/nope/v1/responses/resp_nope")
    assert response.status_code == 404 and error_of(response)["message"] == "backend not found"
    body = b'{"model": "ai/tiny", "pad": "' + b"a" * BODY_LIMIT + b'"}'
    response = httpx.post(daemon.url + "/v1/responses", content=body, timeout=60)
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"
    wrong = httpx.put(daemon.url + "/v1/responses")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    wrong = httpx.post(daemon.url + "/engines/llama.cpp/v1/responses/resp_nope")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, DELETE"
    assert error_of(wrong)["message"] == "Method POST not allowed here."


def test_responses_expire(tmp_path: Path) -> None:
    """DMR_RESPONSES_TTL shortens the one-hour life of a stored response."""
    daemon = start_tiny("embedded", tmp_path, None, DMR_RESPONSES_TTL="1")
    try:
        with sdk(daemon) as client:
            response = client.responses.create(
                model="ai/tiny", input="hello", max_output_tokens=2, extra_body=NO_STOP
            )
            time.sleep(1.5)
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(response.id)
            with pytest.raises(openai.BadRequestError) as caught:
                client.responses.create(
                    model="ai/tiny", input="again", previous_response_id=response.id
                )
            assert caught.value.code == "previous_response_not_found"
    finally:
        daemon.stop()
