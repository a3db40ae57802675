"""The Anthropic ↔ OpenAI chat translation used for runners without a Messages API."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dmr_cli.server.anthropic import (
    InvalidRequest,
    MessageStream,
    StopScanner,
    encode_event,
    error_body,
    error_type,
    output_tokens,
    parse_arguments,
    to_chat_request,
)

WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def chunk(
    content: str | None = None,
    *,
    tool_calls: list[dict[str, Any]] | None = None,
    finish: str | None = None,
    usage: dict[str, int] | None = None,
) -> str:
    delta: dict[str, Any] = {}
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    body: dict[str, Any] = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body)


ROLE_CHUNK = json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})


def run(stream: MessageStream, *data: str) -> list[dict[str, Any]]:
    events = stream.start()
    for item in data:
        events += stream.feed(item)
        if stream.ended:
            break
    return events + stream.finish()


# -- requests -------------------------------------------------------------------------------


def test_system_prompt_and_multi_turn() -> None:
    chat = to_chat_request(
        {
            "model": "ai/tiny",
            "max_tokens": 16,
            "system": [{"type": "text", "text": "Be terse."}, {"type": "text", "text": "Be kind."}],
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 40,
            "stop_sequences": ["END"],
            "stream": True,
        }
    )
    assert chat == {
        "model": "ai/tiny",
        "messages": [
            {"role": "system", "content": "Be terse.\n\nBe kind."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            # Text-only content becomes a string: chat templates concatenate `content`.
            {"role": "user", "content": "ab"},
        ],
        "max_tokens": 16,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
    }


def test_images_become_image_url_parts() -> None:
    chat = to_chat_request(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                        },
                        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                    ],
                }
            ],
        }
    )
    assert chat["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
            ],
        }
    ]


def test_tool_use_and_tool_result_become_tool_calls_and_tool_messages() -> None:
    chat = to_chat_request(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "weather in Paris?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "x"},
                        {"type": "text", "text": "Let me check."},
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "get_weather",
                            "input": {"city": "Paris"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_2",
                            "content": [{"type": "text", "text": "no such city"}],
                            "is_error": True,
                        },
                        {"type": "text", "text": "and tomorrow?"},
                    ],
                },
            ],
            "tools": [WEATHER],
            "tool_choice": {
                "type": "tool",
                "name": "get_weather",
                "disable_parallel_tool_use": True,
            },
        }
    )
    assert chat["messages"][1:] == [
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no such city"},
        {"role": "user", "content": "and tomorrow?"},
    ]
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": WEATHER["input_schema"],
            },
        }
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["parallel_tool_calls"] is False


def test_tool_results_alone_make_no_empty_user_message() -> None:
    chat = to_chat_request(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
            ],
        }
    )
    assert chat["messages"] == [{"role": "tool", "tool_call_id": "t", "content": ""}]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: str) -> None:
    chat = to_chat_request({"model": "m", "messages": [], "tool_choice": choice})
    assert chat["tool_choice"] == expected
    assert "parallel_tool_calls" not in chat


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"messages": "hi"}, "messages: Input should be a valid list"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "content block type 'document' is not supported",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "x"}]}]},
            "content block type 'tool_use' is not supported",
        ),
        ({"messages": [], "max_tokens": 0}, "max_tokens"),
        ({"messages": [], "max_tokens": "8"}, "max_tokens"),
        ({"messages": [], "temperature": "hot"}, "temperature"),
        ({"messages": [], "stop_sequences": "END"}, "stop_sequences"),
        ({"messages": [], "stop_sequences": [""]}, "stop_sequences"),
        ({"messages": [], "system": [{"type": "image"}]}, "only text blocks"),
        ({"messages": [], "tools": [{"type": "web_search_20250305", "name": "w"}]}, "tool type"),
        ({"messages": [], "tools": [{"name": "w"}]}, "tools.0.input_schema"),
        ({"messages": [], "tool_choice": {"type": "some"}}, "tool_choice.type"),
    ],
)
def test_invalid_requests(body: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace(".", r"\.")):
        to_chat_request({"model": "m", **body})


# -- stop sequences -------------------------------------------------------------------------


def test_stop_scanner_holds_back_what_could_become_a_stop_sequence() -> None:
    scanner = StopScanner(["END", "\n\n"])
    assert scanner.feed("hello E") == ("hello ", None)
    assert scanner.feed("N") == ("", None)
    assert scanner.feed("X and") == ("ENX and", None)
    assert scanner.feed(" E") == (" ", None)
    assert scanner.feed("ND more") == ("", "END")


def test_stop_scanner_takes_the_earliest_match_and_flushes_the_rest() -> None:
    scanner = StopScanner(["bc", "ab"])
    assert scanner.feed("xabc") == ("x", "ab")
    other = StopScanner(["END"])
    assert other.feed("tail E") == ("tail ", None)
    assert other.flush() == "E"
    assert StopScanner([]).feed("anything") == ("anything", None)


# -- answers --------------------------------------------------------------------------------


def test_text_stream_follows_anthropics_event_grammar() -> None:
    stream = MessageStream("ai/tiny", 12, [], max_tokens=3)
    events = run(
        stream, ROLE_CHUNK, chunk("Hel"), chunk("lo"), chunk("!", finish="length"), "[DONE]"
    )
    assert [e["type"] for e in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0]["message"]
    assert start["id"].startswith("msg_") and start["model"] == "ai/tiny"
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {"input_tokens": 12, "output_tokens": 0}
    assert events[2] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert [e["delta"] for e in events[3:6]] == [
        {"type": "text_delta", "text": "Hel"},
        {"type": "text_delta", "text": "lo"},
        {"type": "text_delta", "text": "!"},
    ]
    assert events[7] == {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
        "usage": {"input_tokens": 12, "output_tokens": 3},
    }
    message = stream.message()
    assert message["content"] == [{"type": "text", "text": "Hello!"}]
    assert message["stop_reason"] == "max_tokens"
    assert message["id"] == start["id"]


def test_runner_usage_wins_over_counting() -> None:
    stream = MessageStream("m", 5, [])
    run(
        stream,
        chunk("a"),
        chunk("", finish="stop"),
        json.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}),
        "[DONE]",
    )
    assert stream.message()["stop_reason"] == "end_turn"
    assert stream.message()["usage"] == {"input_tokens": 5, "output_tokens": 7}


def test_output_token_count_without_runner_usage() -> None:
    assert output_tokens(7, "length", 3, 9) == 7
    assert output_tokens(None, "length", 3, 9) == 3
    assert output_tokens(None, "stop", 3, 2) == 2
    assert output_tokens(None, "length", None, 4) == 4


def test_a_stop_sequence_ends_the_answer_without_showing_it() -> None:
    stream = MessageStream("m", 1, ["STOP"])
    events = run(stream, chunk("one ST"), chunk("OP two"), chunk("never"))
    assert stream.ended
    deltas = [e["delta"]["text"] for e in events if e["type"] == "content_block_delta"]
    assert "".join(deltas) == "one "
    message = stream.message()
    assert message["content"] == [{"type": "text", "text": "one "}]
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "STOP")
    assert message["usage"]["output_tokens"] == 2  # the chunks read before it ended
    assert events[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "STOP"}


def test_held_back_text_is_emitted_when_it_turns_out_not_to_stop() -> None:
    stream = MessageStream("m", 1, ["STOP"])
    run(stream, chunk("wait ST", finish="stop"), "[DONE]")
    assert stream.message()["content"] == [{"type": "text", "text": "wait ST"}]
    assert stream.message()["stop_reason"] == "end_turn"


def test_tool_calls_become_tool_use_blocks() -> None:
    first = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"ci'},
    }
    more = {"index": 0, "function": {"arguments": 'ty": "Paris"}'}}
    second = {"index": 1, "id": "call_2", "function": {"name": "get_time", "arguments": "{}"}}
    stream = MessageStream("m", 1, [])
    events = run(
        stream,
        chunk("Checking."),
        chunk(tool_calls=[first]),
        chunk(tool_calls=[more]),
        chunk(tool_calls=[second]),
        chunk(finish="tool_calls"),
        "[DONE]",
    )
    assert [(e["type"], e.get("index")) for e in events[2:]] == [
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert events[5]["content_block"] == {
        "type": "tool_use",
        "id": "call_1",
        "name": "get_weather",
        "input": {},
    }
    assert [e["delta"] for e in events[6:8]] == [
        {"type": "input_json_delta", "partial_json": '{"ci'},
        {"type": "input_json_delta", "partial_json": 'ty": "Paris"}'},
    ]
    message = stream.message()
    assert message["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
    ]
    assert message["stop_reason"] == "tool_use"


def test_tool_calls_ending_on_stop_still_say_tool_use() -> None:
    call = {"index": 0, "id": "c", "function": {"name": "f", "arguments": "{}"}}
    stream = MessageStream("m", 1, [])
    run(stream, chunk(tool_calls=[call], finish="stop"), "[DONE]")
    assert stream.message()["stop_reason"] == "tool_use"


def test_runner_errors_end_the_stream_with_an_error_event() -> None:
    stream = MessageStream("m", 1, [])
    failure = json.dumps({"error": {"message": "the runner exited unexpectedly", "code": 500}})
    events = run(stream, chunk("par"), failure, chunk("never"))
    assert events[-1] == {
        "type": "error",
        "error": {"type": "api_error", "message": "the runner exited unexpectedly"},
    }
    assert stream.error == "the runner exited unexpectedly"


def test_a_stream_that_stops_without_finishing_is_an_error() -> None:
    stream = MessageStream("m", 1, [])
    events = run(stream, chunk("cut"))
    assert events[-1]["type"] == "error"
    assert stream.error == "the runner ended its answer early"


def test_an_answer_that_only_finishes_without_done_still_completes() -> None:
    stream = MessageStream("m", 1, [])
    events = run(stream, chunk("ok", finish="stop"))
    assert events[-1] == {"type": "message_stop"}


def test_parse_arguments() -> None:
    assert parse_arguments('{"a": 1}') == {"a": 1}
    assert parse_arguments("") == {}
    assert parse_arguments('{"a": ') == {}
    assert parse_arguments("[1]") == {}


def test_event_encoding_and_errors() -> None:
    assert encode_event({"type": "ping"}) == b'event: ping\ndata: {"type": "ping"}\n\n'
    assert error_body(404, "Model not found: x") == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "Model not found: x"},
    }
    assert [error_type(s) for s in (400, 401, 403, 404, 409, 413, 429, 500, 502, 503, 529)] == [
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "invalid_request_error",
        "request_too_large",
        "rate_limit_error",
        "api_error",
        "api_error",
        "overloaded_error",
        "overloaded_error",
    ]
