"""The Ollama ↔ OpenAI translation rules (dmr_cli/server/ollama_translate.py), without runners."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pytest

from dmr_cli.errors import BadRequest, DmrError
from dmr_cli.server import ollama_translate as tr


def test_model_name_accepts_model_or_name_and_requires_one() -> None:
    assert tr.model_name({"model": " ai/tiny "}) == "ai/tiny"
    assert tr.model_name({"name": "ai/tiny:latest"}) == "ai/tiny:latest"
    with pytest.raises(BadRequest, match="model is required"):
        tr.model_name({})
    with pytest.raises(BadRequest, match="model must be"):
        tr.model_name({"model": 3})


def test_stream_defaults_to_true() -> None:
    assert tr.stream_flag({}) is True
    assert tr.stream_flag({"stream": False}) is False
    with pytest.raises(BadRequest):
        tr.stream_flag({"stream": "no"})


def test_options_map_to_openai_fields() -> None:
    body = {
        "options": {
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 40,
            "num_predict": 16,
            "stop": ["\n\n"],
            "seed": 7,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.25,
            "repeat_penalty": 1.1,
            "num_ctx": 4096,  # a runner setting, not a sampling field
            "mirostat": 1,  # no OpenAI equivalent: left out
        }
    }
    assert tr.sampling(body) == {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "max_tokens": 16,
        "stop": ["\n\n"],
        "seed": 7,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "repeat_penalty": 1.1,
    }


def test_negative_num_predict_sets_no_limit_and_integral_floats_pass() -> None:
    assert tr.sampling({"options": {"num_predict": -1}}) == {}
    assert tr.sampling({"options": {"num_predict": -2, "top_k": 40.0}}) == {"top_k": 40}


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": "hot"},
        {"top_k": 4.5},
        {"seed": True},
        {"temperature": math.inf},
        {"stop": [1, 2]},
        {"num_predict": None, "top_p": [0.9]},
    ],
)
def test_bad_option_values_are_bad_requests(options: dict[str, Any]) -> None:
    with pytest.raises(BadRequest, match="invalid option"):
        tr.sampling({"options": options})


def test_options_must_be_an_object() -> None:
    with pytest.raises(BadRequest, match="options must be"):
        tr.sampling({"options": [1]})


def test_runner_settings_keep_alive_num_ctx_and_think() -> None:
    settings = tr.runner_settings(
        {"keep_alive": "10m", "options": {"num_ctx": 2048}, "think": True}
    )
    assert settings.changes() == {"keep_alive": 600.0, "context_size": 2048, "reasoning_budget": -1}
    assert tr.runner_settings({"think": False}).reasoning_budget == 0
    assert tr.runner_settings({"think": "low"}).reasoning_budget == -1
    assert tr.runner_settings({}).changes() == {}


def test_keep_alive_top_level_wins_over_options_and_numbers_are_seconds() -> None:
    assert tr.runner_settings({"keep_alive": 30, "options": {"keep_alive": "1h"}}).keep_alive == 30
    assert tr.runner_settings({"options": {"keep_alive": "1h"}}).keep_alive == 3600
    assert tr.runner_settings({"keep_alive": -1}).keep_alive == -1
    assert tr.runner_settings({"keep_alive": "0s"}).keep_alive == 0


def test_num_ctx_zero_keeps_the_configured_context() -> None:
    assert tr.runner_settings({"options": {"num_ctx": 0}}).context_size is None


@pytest.mark.parametrize(
    "body",
    [
        {"keep_alive": "soon"},
        {"keep_alive": True},
        {"options": {"num_ctx": "big"}},
        {"options": {"num_ctx": 2**40}},
        {"think": "very"},
        {"think": 1},
    ],
)
def test_bad_runner_settings_are_bad_requests(body: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        tr.runner_settings(body)


def test_images_become_data_uri_parts_by_their_magic_bytes() -> None:
    png, jpeg, gif, other = "iVBORw0KGgo=", "/9j/4AAQ", "R0lGODlh", "AAAA"
    (message,) = tr.messages([{"role": "user", "content": "what is it?", "images": [png, jpeg]}])
    assert message["content"] == [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{jpeg}"}},
    ]
    assert tr.image_url(gif) == f"data:image/gif;base64,{gif}"
    assert tr.image_url(other) == f"data:image/jpeg;base64,{other}"
    (bare,) = tr.messages([{"role": "user", "images": [png]}])
    assert [p["type"] for p in bare["content"]] == ["image_url"]
    with pytest.raises(BadRequest):
        tr.messages([{"role": "user", "content": "x", "images": "iVBOR"}])


def test_tool_calls_and_results_become_openai_messages() -> None:
    converted = tr.messages(
        [
            {"role": "user", "content": "weather in Paris and 1+2?"},
            {
                "role": "assistant",
                "content": "",
                "thinking": "two tools",
                "tool_calls": [
                    {"function": {"name": "weather", "arguments": {"city": "Paris"}}},
                    {"function": {"name": "add", "arguments": {"a": 1, "b": 2}}},
                ],
            },
            {"role": "tool", "content": "3", "tool_name": "add"},
            {"role": "tool", "content": "sunny", "tool_name": "weather"},
        ]
    )
    assistant = converted[1]
    assert assistant["reasoning_content"] == "two tools"
    assert assistant["tool_calls"] == [
        {
            "id": "call_1_0",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
        },
        {
            "id": "call_1_1",
            "type": "function",
            "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
        },
    ]
    # Results name a function: each answers that function's call, whatever the order.
    assert converted[2] == {"role": "tool", "content": "3", "tool_call_id": "call_1_1"}
    assert converted[3] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1_0"}


def test_tool_results_without_a_name_answer_calls_in_order_and_ids_are_kept() -> None:
    converted = tr.messages(
        [
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "abc", "function": {"name": "f", "arguments": '{"x": 1}'}},
                    {"function": {"name": "g", "arguments": {}}},
                ],
            },
            {"role": "tool", "content": "one"},
            {"role": "tool", "content": "two", "tool_call_id": "explicit"},
            {"role": "tool", "content": "three"},
        ]
    )
    assert converted[0]["tool_calls"][0]["id"] == "abc"
    assert converted[0]["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'
    assert [m.get("tool_call_id") for m in converted[1:]] == ["abc", "explicit", "call_0_1"]


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [{"content": "no role"}],
        [{"role": "user", "content": ["parts"]}],
        [{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}],
        [{"role": "assistant", "tool_calls": {"function": {"name": "f"}}}],
    ],
)
def test_malformed_messages_are_bad_requests(messages: Any) -> None:
    with pytest.raises(BadRequest):
        tr.messages(messages)


def test_chat_request_carries_tools_format_and_stream_usage() -> None:
    tool = {"function": {"name": "add", "parameters": {"type": "object"}}}
    payload = tr.chat_request(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [tool],
            "format": {"type": "object"},
            "options": {"temperature": 0},
        },
        "ai/tiny",
        stream=True,
    )
    assert payload == {
        "model": "ai/tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", **tool}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "response_format": {"type": "json_object", "schema": {"type": "object"}},
    }
    plain = tr.chat_request({"messages": [], "format": "json"}, "m", stream=False)
    assert plain["response_format"] == {"type": "json_object"}
    assert "stream_options" not in plain
    with pytest.raises(BadRequest):
        tr.chat_request({"format": "yaml"}, "m", stream=False)
    with pytest.raises(BadRequest):
        tr.chat_request({"tools": "add"}, "m", stream=False)


def test_generate_request_is_one_user_message_after_the_system_prompt() -> None:
    payload = tr.generate_request(
        {"prompt": "hello", "system": "be brief", "images": ["iVBOR"], "options": {"seed": 1}},
        "ai/tiny",
        stream=False,
    )
    assert payload["messages"] == [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hello"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
            ],
        },
    ]
    assert payload["seed"] == 1 and payload["stream"] is False
    with pytest.raises(BadRequest):
        tr.generate_request({"prompt": ["hello"]}, "m", stream=False)


def test_embed_inputs() -> None:
    assert tr.embed_inputs("hi") == ["hi"]
    assert tr.embed_inputs(["a", "b"]) == ["a", "b"]
    assert tr.embed_inputs(None) == [] and tr.embed_inputs("") == []
    with pytest.raises(BadRequest):
        tr.embed_inputs([1])


def openai_response(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
        "timings": {"prompt_ms": 1.5, "predicted_ms": 20.25},
    }


def test_whole_answer_with_tool_calls_becomes_ollama_message() -> None:
    data = openai_response(
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "I should add",
            "tool_calls": [
                {
                    "id": "call_9",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
                }
            ],
        },
        finish="tool_calls",
    )
    turn = tr.Turn.from_response(data)
    reply = tr.final("ai/tiny", turn, chat=True, whole=True, total_ns=99, load_ns=7)
    assert reply["message"] == {
        "role": "assistant",
        "content": "",
        "thinking": "I should add",
        "tool_calls": [
            {"id": "call_9", "function": {"index": 0, "name": "add", "arguments": {"a": 1, "b": 2}}}
        ],
    }
    assert {k: v for k, v in reply.items() if k not in ("message", "created_at")} == {
        "model": "ai/tiny",
        "done": True,
        "done_reason": "stop",
        "total_duration": 99,
        "load_duration": 7,
        "prompt_eval_count": 12,
        "prompt_eval_duration": 1_500_000,
        "eval_count": 5,
        "eval_duration": 20_250_000,
    }


def test_generate_answer_uses_response_and_leaves_out_unknown_statistics() -> None:
    turn = tr.Turn.from_response(
        {"choices": [{"message": {"content": "hi"}, "finish_reason": "length"}]}
    )
    reply = tr.final("m", turn, chat=False, whole=True, total_ns=5, load_ns=None)
    assert reply["response"] == "hi" and "message" not in reply
    assert reply["done_reason"] == "length"
    assert not {"load_duration", "eval_count", "eval_duration"} & reply.keys()


def test_stream_reader_assembles_text_thinking_and_tool_calls() -> None:
    reader = tr.StreamReader()
    chunks: list[dict[str, Any]] = [
        {"choices": [{"delta": {"role": "assistant", "reasoning_content": "hm"}}]},
        {"choices": [{"delta": {"content": "Hel"}}]},
        {"choices": [{"delta": {"content": "lo"}}]},
        {
            "choices": [
                {
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "add", "arguments": '{"a":'},
                            }
                        ]
                    }
                }
            ]
        },
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}], "timings": {"prompt_ms": 2}},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
    ]
    pieces = [reader.feed(c) for c in chunks]
    assert [p for p in pieces if p != ("", "")] == [("", "hm"), ("Hel", ""), ("lo", "")]
    turn = reader.turn
    assert turn.finish_reason == "tool_calls"
    assert turn.usage == {"prompt_tokens": 3, "completion_tokens": 4}
    line = tr.tool_call_chunk("m", turn.tool_calls)
    assert line["done"] is False
    assert line["message"]["tool_calls"] == [
        {"id": "c1", "function": {"index": 0, "name": "add", "arguments": {"a": 1}}}
    ]
    last = tr.final("m", turn, chat=True, whole=False, total_ns=1, load_ns=0)
    assert last["message"] == {"role": "assistant", "content": ""}
    assert last["done"] is True and last["eval_count"] == 4 and last["prompt_eval_duration"] == 2e6


def test_streamed_chunks_for_chat_and_generate() -> None:
    chat = tr.chunk("m", "Hi", "why", chat=True)
    assert chat["message"] == {"role": "assistant", "content": "Hi", "thinking": "why"}
    assert chat["done"] is False
    generate = tr.chunk("m", "Hi", "", chat=False)
    assert generate["response"] == "Hi" and "thinking" not in generate


@pytest.mark.parametrize("arguments", ['{"a": 1', "[1, 2]"])
def test_tool_arguments_that_are_not_a_json_object_are_errors(arguments: str) -> None:
    calls = [{"function": {"name": "f", "arguments": arguments}}]
    with pytest.raises(DmrError, match="arguments"):
        tr.ollama_tool_calls(calls)


def test_error_messages_from_runner_bodies() -> None:
    assert tr.error_message({"error": {"message": "bad", "type": "x"}}) == "bad"
    assert tr.error_message({"error": "plain"}) == "plain"
    assert tr.error_message({"detail": [{"msg": "m"}]}) == '[{"msg": "m"}]'
    assert tr.error_message({"type": "error", "message": "runner died"}) == "runner died"
    assert tr.stream_error({"error": {"message": "boom"}}) == "boom"
    assert tr.stream_error({"choices": []}) is None


def test_done_reasons() -> None:
    assert tr.done_reason("tool_calls") == "stop"
    assert tr.done_reason(None) == "stop"
    assert tr.done_reason("length") == "length"


def test_idle_replies_for_load_and_unload() -> None:
    load = tr.idle_reply("m", "load", chat=True)
    assert load["message"] == {"role": "assistant", "content": ""}
    assert load["done"] is True and load["done_reason"] == "load"
    unload = tr.idle_reply("m", "unload", chat=False)
    assert unload["response"] == "" and unload["done_reason"] == "unload"


def test_embeddings_in_input_order_and_normalised() -> None:
    data = {"data": [{"index": 1, "embedding": [0.0, 2.0]}, {"index": 0, "embedding": [3.0, 4.0]}]}
    assert tr.embeddings(data) == [[3.0, 4.0], [0.0, 2.0]]
    assert tr.normalize([3.0, 4.0]) == [0.6, 0.8]
    assert tr.normalize([0.0, 0.0]) == [0.0, 0.0]
    with pytest.raises(DmrError):
        tr.embeddings({"object": "list"})


def test_pull_status_lines() -> None:
    digest = "sha256:" + "ab" * 32
    progress = {
        "type": "progress",
        "message": "Downloaded: 1.00 MB",
        "total": 10,
        "layer": {"id": digest, "size": 10, "current": 4},
        "mode": "pull",
    }
    assert tr.pull_status(progress) == {
        "status": "pulling abababababab",
        "digest": digest,
        "total": 10,
        "completed": 4,
    }
    progress["layer"] = {"id": digest, "size": 10, "current": 0}
    assert "completed" not in tr.pull_status(progress)
    progress["layer"] = {"size": 0, "current": 0}
    assert tr.pull_status(progress) == {"status": "pulling manifest"}
    assert tr.pull_status({"type": "success", "message": "Model pulled successfully"}) == {
        "status": "success"
    }
    assert tr.pull_status({"type": "warning", "message": "careful"}) == {"status": "careful"}
    assert tr.pull_status({"type": "error", "message": "Error: x"}) == {"error": "Error: x"}


def test_names_digests_and_times() -> None:
    assert tr.ollama_name("docker.io/ai/tiny:latest") == "ai/tiny:latest"
    assert tr.ollama_name("index.docker.io/me/x:v1") == "me/x:v1"
    assert tr.ollama_name("127.0.0.1:5000/ai/x:v1") == "127.0.0.1:5000/ai/x:v1"
    assert tr.digest("sha256:" + "0" * 64) == "0" * 64
    assert tr.rfc3339(None) == "0001-01-01T00:00:00Z"
    assert tr.rfc3339(0) == "1970-01-01T00:00:00Z"


GGUF_UINT32, GGUF_STRING, GGUF_FLOAT64 = 4, 8, 12


def test_model_info_types_arrays_and_left_out_keys() -> None:
    eps = struct.unpack("<f", struct.pack("<f", 1e-5))[0]
    kvs: dict[str, tuple[int, Any]] = {
        "general.architecture": (GGUF_STRING, "llama"),
        "general.name": (GGUF_STRING, "tiny"),
        "tokenizer.chat_template": (GGUF_STRING, "{{ x }}"),
        "llama.context_length": (GGUF_UINT32, 256),
        "llama.attention.layer_norm_rms_epsilon": (tr.GGUF_FLOAT32, eps),
        "llama.rope.freq_base": (GGUF_FLOAT64, 10000.0),
        "tokenizer.ggml.tokens": (tr.GGUF_ARRAY, (GGUF_STRING, 300, None)),
        "llama.rope.sections": (tr.GGUF_ARRAY, (GGUF_UINT32, 2, [16, 24])),
        "tokenizer.ggml.empty": (tr.GGUF_ARRAY, (GGUF_UINT32, 0, [])),
        "weird.nan": (GGUF_FLOAT64, math.nan),
    }
    info = tr.model_info(kvs, 1234, verbose=False)
    assert list(info) == sorted(info)
    assert "general.name" not in info and "tokenizer.chat_template" not in info
    assert info["general.parameter_count"] == 1234
    assert info["llama.context_length"] == 256
    assert json.dumps(info["llama.attention.layer_norm_rms_epsilon"]) == "1e-05"
    assert info["llama.rope.freq_base"] == 10000.0
    assert info["tokenizer.ggml.tokens"] is None and info["llama.rope.sections"] is None
    assert info["tokenizer.ggml.empty"] == [] and info["weird.nan"] is None
    verbose = tr.model_info(kvs, 1234, verbose=True)
    assert verbose["llama.rope.sections"] == [16, 24]
    assert verbose["tokenizer.ggml.tokens"] is None  # the reader did not keep 300 items


def test_capabilities() -> None:
    chat = {"general.architecture": (GGUF_STRING, "llama")}
    embedder = {"general.architecture": (GGUF_STRING, "bert"), "bert.pooling_type": (4, 1)}
    assert tr.capabilities(chat, "{{ messages }}", vision=False) == ["completion"]
    assert tr.capabilities(embedder, "", vision=False) == ["embedding"]
    template = "{% if tools %}...{% endif %}{{ '<think>' }}"
    assert tr.capabilities(chat, template, vision=True) == [
        "completion",
        "tools",
        "thinking",
        "vision",
    ]


def test_details_parameters_and_modelfile() -> None:
    config = {"format": "gguf", "architecture": "llama", "parameters": "1B", "quantization": "Q4"}
    assert tr.details(config) == {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "1B",
        "quantization_level": "Q4",
    }
    assert tr.parameters({"num_ctx": 4096, "stop": "<end>"}) == (
        'num_ctx                        4096\nstop                           "<end>"'
    )
    text = tr.modelfile("ai/x", "/blobs/x.gguf", "{{ t }}", {"num_ctx": 8}, "MIT")
    assert text.splitlines()[4:] == [
        "FROM /blobs/x.gguf",
        'TEMPLATE """{{ t }}"""',
        "PARAMETER num_ctx 8",
        'LICENSE """MIT"""',
    ]
