"""The Responses API layer: request translation, the store's expiry, input item pages, and
chat completion answers (whole or streamed) as Responses objects and events."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dmr_cli.server.responses import (
    DEFAULT_TTL,
    RequestError,
    ResponseStore,
    ResponseStream,
    Turn,
    configured_ttl,
    encode_event,
    input_items,
    output_items,
    paginate,
    parse_request,
    to_chat_request,
    to_messages,
)

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def chunk(
    content: str | None = None,
    *,
    tool_calls: list[dict[str, Any]] | None = None,
    finish: str | None = None,
) -> str:
    delta: dict[str, Any] = {}
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def turn(into: ResponseStore | None = None, **payload: Any) -> Turn:
    body = {"model": "ai/tiny", **payload}
    return Turn(into or ResponseStore(60), body, input_items(body.get("input")), [])


def run(stream: ResponseStream, *data: str, input_tokens: int | None = None) -> list[Any]:
    events = stream.start()
    for item in data:
        events += stream.feed(item)
        if stream.ended:
            break
    return events + stream.finish(input_tokens)


# -- requests -------------------------------------------------------------------------------


def test_string_input_with_instructions_and_options() -> None:
    payload = parse_request(
        json.dumps(
            {
                "model": "ai/tiny",
                "input": "hello",
                "instructions": "Be terse.",
                "max_output_tokens": 16,
                "temperature": 0,
                "top_p": 0.5,
                "parallel_tool_calls": False,
                "logit_bias": {"2": -100},
                "top_k": 1,
                "store": False,
                "reasoning": {"effort": "low"},
            }
        ).encode()
    )
    items = input_items(payload["input"])
    assert len(items) == 1 and items[0]["id"].startswith("msg_")
    assert {k: v for k, v in items[0].items() if k != "id"} == {
        "type": "message",
        "role": "user",
        "status": "completed",
        "content": [{"type": "input_text", "text": "hello"}],
    }
    history = [{"role": "user", "content": "before"}, {"role": "assistant", "content": "reply"}]
    assert to_chat_request(payload, history, items) == {
        "model": "ai/tiny",
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "before"},
            {"role": "assistant", "content": "reply"},
            {"role": "user", "content": "hello"},
        ],
        "max_tokens": 16,
        "temperature": 0,
        "top_p": 0.5,
        "parallel_tool_calls": False,
        "top_k": 1,
        "logit_bias": {"2": -100},
    }


def test_item_input_with_roles_images_and_function_calls() -> None:
    items = input_items(
        [
            {"role": "developer", "content": "Answer in French."},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is "},
                    {"type": "input_text", "text": "this?"},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "and this"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
                ],
            },
            {"role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {
                "type": "function_call_output",
                "call_id": "c2",
                "output": [{"type": "input_text", "text": "noon"}],
            },
        ]
    )
    assert [item["type"] for item in items] == [
        "message",
        "message",
        "message",
        "message",
        "function_call",
        "function_call",
        "function_call_output",
        "function_call_output",
    ]
    assert all(item["id"] for item in items)
    assert to_messages(items) == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "What is this?"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "and this"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "noon"},
    ]


def test_function_calls_without_text_get_empty_content() -> None:
    items = input_items([{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}])
    (message,) = to_messages(items)
    assert message["role"] == "assistant" and message["content"] == ""


def test_tools_tool_choice_and_text_format() -> None:
    payload = {
        "model": "m",
        "tools": [{**WEATHER, "strict": True}],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
    }
    chat = to_chat_request(payload, [], input_items("hi"))
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": WEATHER["parameters"],
                "strict": True,
            },
        }
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "w", "schema": {"type": "object"}},
    }
    plain = to_chat_request({"model": "m", "tool_choice": "required"}, [], input_items("x"))
    assert plain["tool_choice"] == "required" and "response_format" not in plain


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"{not json", None, None),
        (b"[1]", None, None),
        (b"{}", "model", "missing_required_parameter"),
        (b'{"model": 5}', "model", "invalid_type"),
        (b'{"model": "m", "stream": 1}', "stream", "invalid_type"),
        (b'{"model": "m", "temperature": true}', "temperature", "invalid_type"),
        (b'{"model": "m", "max_output_tokens": 1.5}', "max_output_tokens", "invalid_type"),
        (b'{"model": "m", "max_output_tokens": 0}', "max_output_tokens", "integer_below_min_value"),
        (b'{"model": "m", "metadata": []}', "metadata", "invalid_type"),
        (b'{"model": "m", "background": true}', "background", None),
    ],
)
def test_invalid_requests(body: bytes, param: str | None, code: str | None) -> None:
    with pytest.raises(RequestError) as caught:
        parse_request(body)
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, param, code)


@pytest.mark.parametrize(
    ("value", "param"),
    [
        (5, "input"),
        ([5], "input[0]"),
        ([{"role": "tool", "content": "x"}], "input[0].role"),
        ([{"role": "user", "content": 5}], "input[0].content"),
        (
            [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}],
            "input[0].content[0].type",
        ),
        (
            [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}],
            "input[0].content[0].image_url",
        ),
        ([{"type": "function_call", "name": "f", "arguments": "{}"}], "input[0].call_id"),
        ([{"type": "item_reference", "id": "x"}], "input[0].type"),
    ],
)
def test_invalid_input(value: Any, param: str) -> None:
    with pytest.raises(RequestError) as caught:
        input_items(value)
    assert caught.value.param == param


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": {"type": "function"}}, "tools"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ],
)
def test_unsupported_options(payload: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as caught:
        to_chat_request({"model": "m", **payload}, [], input_items("x"))
    assert caught.value.param == param


# -- the store ------------------------------------------------------------------------------


def test_store_forgets_responses_after_their_ttl() -> None:
    clock = Clock()
    store = ResponseStore(10, clock)
    store.put({"id": "resp_a"}, [], [])
    clock.now += 6
    store.put({"id": "resp_b"}, [], [])
    clock.now += 3.9
    assert store.get("resp_a") is not None
    clock.now += 0.1
    assert store.get("resp_a") is None
    found = store.get("resp_b")
    assert found is not None and found.response == {"id": "resp_b"}
    assert store.delete("resp_b")
    assert not store.delete("resp_b")
    assert store.get("resp_b") is None


def test_ttl_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DMR_RESPONSES_TTL", raising=False)
    assert configured_ttl() == DEFAULT_TTL == 3600
    monkeypatch.setenv("DMR_RESPONSES_TTL", "2.5")
    assert configured_ttl() == 2.5
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv("DMR_RESPONSES_TTL", bad)
        assert configured_ttl() == DEFAULT_TTL


# -- input item pages -----------------------------------------------------------------------


ITEMS = [{"id": f"msg_{n}"} for n in range(5)]


def ids(page: dict[str, Any]) -> list[str]:
    return [item["id"] for item in page["data"]]


def test_pages_are_newest_first_unless_asked() -> None:
    page = paginate(ITEMS, order="desc", limit="2", after=None, before=None)
    assert ids(page) == ["msg_4", "msg_3"]
    assert (page["first_id"], page["last_id"], page["has_more"]) == ("msg_4", "msg_3", True)
    following = paginate(ITEMS, order="desc", limit="2", after="msg_3", before=None)
    assert ids(following) == ["msg_2", "msg_1"]
    assert ids(paginate(ITEMS, order="asc", limit="20", after=None, before=None)) == [
        f"msg_{n}" for n in range(5)
    ]
    last = paginate(ITEMS, order="asc", limit="3", after="msg_1", before="msg_4")
    assert ids(last) == ["msg_2", "msg_3"] and last["has_more"] is False
    empty = paginate([], order="desc", limit="20", after=None, before=None)
    assert empty == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }


@pytest.mark.parametrize(
    ("order", "limit", "after", "param"),
    [
        ("up", "20", None, "order"),
        ("asc", "0", None, "limit"),
        ("asc", "x", None, "limit"),
        ("asc", "101", None, "limit"),
        ("asc", "20", "msg_9", "after"),
    ],
)
def test_bad_page_parameters(order: str, limit: str, after: str | None, param: str) -> None:
    with pytest.raises(RequestError) as caught:
        paginate(ITEMS, order=order, limit=limit, after=after, before=None)
    assert caught.value.param == param


# -- answers --------------------------------------------------------------------------------


def test_output_items_from_a_chat_message() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    text, function = output_items({"content": "Let me see.", "tool_calls": [call]}, "tool_calls")
    assert text["type"] == "message" and text["status"] == "completed"
    assert text["content"] == [
        {"type": "output_text", "text": "Let me see.", "annotations": [], "logprobs": []}
    ]
    assert function["id"].startswith("fc_")
    assert {k: function[k] for k in ("type", "call_id", "name", "arguments", "status")} == {
        "type": "function_call",
        "call_id": "call_1",
        "name": "f",
        "arguments": '{"a":1}',
        "status": "completed",
    }
    (only_call,) = output_items({"content": None, "tool_calls": [call]}, "tool_calls")
    assert only_call["type"] == "function_call"
    (empty,) = output_items({"content": ""}, "stop")
    assert empty["content"][0]["text"] == ""
    (cut,) = output_items({"content": "abc"}, "length")
    assert cut["status"] == "incomplete"


def test_a_finished_turn_is_stored_with_its_conversation() -> None:
    store = ResponseStore(60)
    this = turn(store, input="hello", instructions="Be terse.", max_output_tokens=4)
    response = this.finish(output_items({"content": "hi"}, "length"), "length", None)
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert (response["instructions"], response["max_output_tokens"]) == ("Be terse.", 4)
    stored = store.get(response["id"])
    assert stored is not None and stored.response is response
    assert [i["content"][0]["text"] for i in stored.input_items] == ["hello"]
    # Instructions are not carried into the next turn's history.
    assert stored.history == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
    ]
    unstored = turn(store, input="x", store=False)
    response = unstored.finish(output_items({"content": "y"}, "stop"), "stop", None)
    assert response["status"] == "completed" and response["store"] is False
    assert store.get(response["id"]) is None


def test_text_stream_events() -> None:
    store = ResponseStore(60)
    stream = ResponseStream(turn(store, input="hello", max_output_tokens=3))
    usage = {
        "prompt_tokens": 9,
        "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 8},
    }
    events = run(
        stream,
        json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}),
        chunk("Hel"),
        chunk("lo"),
        chunk("!", finish="length"),
        json.dumps({"choices": [], "usage": usage}),
        "[DONE]",
    )
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["response"]["status"] == "in_progress"
    assert events[0]["response"]["output"] == []
    added = events[2]["item"]
    assert (added["type"], added["status"], added["content"]) == ("message", "in_progress", [])
    assert [e["delta"] for e in events[4:7]] == ["Hel", "lo", "!"]
    assert events[7]["text"] == "Hello!" and events[8]["part"]["text"] == "Hello!"
    assert events[9]["item"]["status"] == "incomplete"
    final = events[-1]["response"]
    assert final["status"] == "incomplete"
    assert final["output"][0]["content"][0]["text"] == "Hello!"
    assert final["output"][0]["id"] == added["id"]
    assert final["usage"] == {
        "input_tokens": 9,
        "input_tokens_details": {"cached_tokens": 8},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 12,
    }
    assert not stream.needs_count
    assert store.get(final["id"]) is not None


def test_a_stream_without_usage_is_counted() -> None:
    stream = ResponseStream(turn(input="hello"))
    stream.start()
    stream.feed(chunk("a"))
    stream.feed(chunk("b", finish="stop"))
    stream.feed("[DONE]")
    assert stream.needs_count
    events = stream.finish(input_tokens=11)
    final = events[-1]
    assert final["type"] == "response.completed"
    assert final["response"]["status"] == "completed"
    usage = final["response"]["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (11, 2, 13)


def test_an_empty_answer_is_an_empty_message() -> None:
    stream = ResponseStream(turn(input="hello"))
    events = run(stream, chunk("", finish="stop"), "[DONE]", input_tokens=3)
    assert [e["type"] for e in events[2:]] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == ""


def test_streamed_function_calls() -> None:
    first = {"index": 0, "id": "call_1", "function": {"name": "get_weather", "arguments": '{"ci'}}
    more = {"index": 0, "id": "call_1", "function": {"name": "get_weather", "arguments": 'ty":1}'}}
    stream = ResponseStream(turn(input="weather?"))
    events = run(
        stream,
        chunk("Hm."),
        chunk(tool_calls=[first]),
        chunk(tool_calls=[more]),
        chunk(finish="tool_calls"),
        "[DONE]",
        input_tokens=4,
    )
    assert [e["type"] for e in events[2:]] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    call_added = events[8]
    assert call_added["output_index"] == 1
    assert call_added["item"]["type"] == "function_call"
    assert call_added["item"]["call_id"] == "call_1" and call_added["item"]["arguments"] == ""
    assert events[11]["arguments"] == '{"city":1}' and events[11]["name"] == "get_weather"
    output = events[-1]["response"]["output"]
    assert [item["type"] for item in output] == ["message", "function_call"]
    assert output[1]["arguments"] == '{"city":1}' and output[1]["status"] == "completed"


def test_runner_failures_fail_the_response() -> None:
    store = ResponseStore(60)
    stream = ResponseStream(turn(store, input="x"))
    failure = json.dumps({"error": {"message": "the runner exited unexpectedly"}})
    events = run(stream, chunk("a"), failure)
    final = events[-1]
    assert final["type"] == "response.failed"
    assert final["response"]["status"] == "failed"
    assert final["response"]["error"] == {
        "code": "server_error",
        "message": "the runner exited unexpectedly",
    }
    assert store.get(final["response"]["id"]) is None
    early = ResponseStream(turn(input="x"))
    assert run(early, chunk("a"))[-1]["response"]["error"]["message"] == (
        "the runner ended its answer early"
    )


def test_event_encoding() -> None:
    event = {"type": "response.output_text.delta", "sequence_number": 4, "delta": "hi"}
    assert encode_event(event) == (
        b"event: response.output_text.delta\n"
        b'data: {"type": "response.output_text.delta", "sequence_number": 4, "delta": "hi"}\n\n'
    )
