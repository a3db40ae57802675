"""POST /engines/_configure bodies (DMR spec §2.7) and the stored RunnerConfig JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dmr_cli.errors import BadRequest
from dmr_cli.runtime.config import (
    MODES,
    ConfigureRequest,
    RunnerConfig,
    SpeculativeConfig,
    parse_configure,
)


def parse(**body: Any) -> ConfigureRequest:
    return parse_configure({"model": "ai/qwen3", **body})


def rejected(body: Any, backend: str = "llama.cpp") -> str:
    with pytest.raises(BadRequest) as info:
        parse_configure(body, backend)
    assert info.value.status == 400
    return info.value.message


def test_the_specs_example_body() -> None:
    body = {
        "model": "ai/qwen3",
        "mode": "completion",
        "context-size": 8192,
        "runtime-flags": ["--temp", "0.7"],
        "speculative": {
            "draft_model": "ai/qwen3:0.6B",
            "num_tokens": 16,
            "min_acceptance_rate": 0.8,
        },
        "keep_alive": "10m",
        "vllm": {"hf-overrides": {"rope_scaling": {"type": "yarn"}}, "gpu-memory-utilization": 0.9},
        "llamacpp": {"reasoning-budget": -1},
    }
    request = parse_configure(body)
    assert request.model == "ai/qwen3"
    assert request.mode == "completion"
    assert request.config == RunnerConfig(
        context_size=8192,
        runtime_flags=["--temp", "0.7"],
        keep_alive=600.0,
        reasoning_budget=-1,
        speculative=SpeculativeConfig("ai/qwen3:0.6B", 16, 0.8),
        vllm={"hf-overrides": {"rope_scaling": {"type": "yarn"}}, "gpu-memory-utilization": 0.9},
    )
    assert request.config.to_json() == {
        "context-size": 8192,
        "runtime-flags": ["--temp", "0.7"],
        "keep_alive": "10m0s",
        "speculative": {
            "draft_model": "ai/qwen3:0.6B",
            "num_tokens": 16,
            "min_acceptance_rate": 0.8,
        },
        "vllm": {"hf-overrides": {"rope_scaling": {"type": "yarn"}}, "gpu-memory-utilization": 0.9},
        "llamacpp": {"reasoning-budget": -1},
    }


def test_a_minimal_body_configures_nothing() -> None:
    request = parse()
    assert request.mode == "completion"
    assert request.config == RunnerConfig()
    assert request.config.to_json() == {}


# -- what docker-agent sends (pkg/model/provider/dmr) -----------------------------------------


@pytest.mark.parametrize(
    ("keep_alive", "seconds", "stored"),
    [("30m", 1800.0, "30m0s"), ("0", 0.0, "0s"), ("-1", -1.0, "-1"), ("-1m", -1.0, "-1")],
)
def test_docker_agent_keep_alive(keep_alive: str, seconds: float, stored: str) -> None:
    config = parse(keep_alive=keep_alive).config
    assert config.keep_alive == seconds
    assert config.to_json()["keep_alive"] == stored


def test_docker_agent_rejects_invalid_keep_alive() -> None:
    assert rejected({"model": "m", "keep_alive": "forever"}).startswith("invalid keep_alive ")


def test_docker_agent_full_body() -> None:
    body = json.loads(
        '{"context-size": 32768, "runtime-flags": ["--temp", "0.2", "--top-p=0.9"],'
        ' "speculative": {"draft_model": "ai/qwen3:0.6B", "num_tokens": 4},'
        ' "keep_alive": "5m", "llamacpp": {"reasoning-budget": 0},'
        ' "model": "ai/qwen3", "mode": "completion"}'
    )
    request = parse_configure(body)
    assert request.config.context_size == 32768
    assert request.config.runtime_flags == ["--temp", "0.2", "--top-p=0.9"]
    assert request.config.speculative == SpeculativeConfig("ai/qwen3:0.6B", 4, 0.0)
    assert request.config.reasoning_budget == 0
    assert request.config.keep_alive == 300.0


def test_raw_runtime_flags_are_split_like_a_shell() -> None:
    config = parse(**{"raw-runtime-flags": "--temp 0.7 --chat-template-kwargs '{\"a\":1}'"}).config
    assert config.runtime_flags == ["--temp", "0.7", "--chat-template-kwargs", '{"a":1}']


def test_runtime_flags_and_raw_runtime_flags_together_are_an_error() -> None:
    message = rejected(
        {"model": "m", "runtime-flags": ["--temp", "1"], "raw-runtime-flags": "--top-k 4"}
    )
    assert "runtime-flags and raw-runtime-flags" in message


def test_an_empty_one_of_the_two_does_not_conflict() -> None:
    assert parse(
        **{"runtime-flags": [], "raw-runtime-flags": "--top-k 4"}
    ).config.runtime_flags == [
        "--top-k",
        "4",
    ]
    assert parse(**{"runtime-flags": ["-v"], "raw-runtime-flags": " "}).config.runtime_flags == [
        "-v"
    ]


def test_unparseable_raw_flags() -> None:
    assert rejected({"model": "m", "raw-runtime-flags": '--temp "0.7'}).startswith(
        "invalid runtime flags: "
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--log-file", "x.log"],
            'runtime flag "--log-file" is not allowed for backend "llama.cpp"',
        ),
        (
            ["--threads", "/etc/passwd"],
            "invalid runtime flag \"/etc/passwd\": paths are not allowed (contains '/' or '\\\\')",
        ),
        (
            ["--seed=-l"],
            "invalid flag \"--seed=-l\": value cannot start with '-' unless followed by a digit",
        ),
    ],
)
def test_flags_are_validated_with_dmrs_messages(flags: list[str], message: str) -> None:
    assert rejected({"model": "m", "runtime-flags": flags}) == message


def test_raw_flags_are_validated_too() -> None:
    assert "is not allowed" in rejected({"model": "m", "raw-runtime-flags": "--model x.gguf"})


def test_flags_are_validated_against_the_backend() -> None:
    body = {"model": "m", "runtime-flags": ["--max-model-len", "4096"]}
    assert parse_configure(body, "vllm").config.runtime_flags == ["--max-model-len", "4096"]
    assert 'for backend "llama.cpp"' in rejected(body)
    assert 'for backend "mlx"' in rejected({"model": "m", "runtime-flags": ["-v"]}, "mlx")


@pytest.mark.parametrize("flags", [[1, 2], "--temp 0.7", {"a": 1}])
def test_runtime_flags_must_be_a_list_of_strings(flags: Any) -> None:
    assert "runtime-flags must be a list of strings" in rejected(
        {"model": "m", "runtime-flags": flags}
    )


def test_raw_runtime_flags_must_be_a_string() -> None:
    assert "raw-runtime-flags must be a string" in rejected({"model": "m", "raw-runtime-flags": []})


# -- mode -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_is_accepted(mode: str) -> None:
    assert parse(mode=mode).mode == mode


def test_unknown_mode() -> None:
    message = rejected({"model": "m", "mode": "chat"})
    assert message.startswith("invalid request")
    assert "'chat'" in message and "completion, embedding, reranking, image-generation" in message


@pytest.mark.parametrize(
    ("body", "mode"),
    [
        ({}, "completion"),
        ({"mode": None}, "completion"),
        ({"runtime-flags": ["--embeddings"]}, "embedding"),
        ({"raw-runtime-flags": "--embedding --pooling mean"}, "embedding"),
        ({"runtime-flags": ["--embeddings"], "mode": "reranking"}, "reranking"),
    ],
)
def test_default_mode(body: dict[str, Any], mode: str) -> None:
    assert parse(**body).mode == mode


# -- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"), [(8192, 8192), (-1, -1), (4096.0, 4096), (None, None)]
)
def test_context_size(value: Any, expected: int | None) -> None:
    assert parse(**{"context-size": value}).config.context_size == expected


@pytest.mark.parametrize("value", [0, -2, 2**31, 1.5, "8192", True])
def test_invalid_context_size(value: Any) -> None:
    assert rejected({"model": "m", "context-size": value}).startswith("invalid context-size ")


@pytest.mark.parametrize(
    ("speculative", "message"),
    [
        ({"draft_model": "ai/d", "num_tokens": -1}, "invalid speculative.num_tokens -1"),
        ({"draft_model": "ai/d", "num_tokens": 2.5}, "invalid speculative.num_tokens 2.5"),
        (
            {"draft_model": "ai/d", "min_acceptance_rate": 1.5},
            "invalid speculative.min_acceptance_rate",
        ),
        (
            {"draft_model": "ai/d", "min_acceptance_rate": -0.1},
            "invalid speculative.min_acceptance_rate",
        ),
        ({"draft_model": 7}, "invalid speculative.draft_model"),
        ({"num_tokens": 8}, "speculative.draft_model is required"),
        ("ai/d", "speculative must be a JSON object"),
    ],
)
def test_invalid_speculative(speculative: Any, message: str) -> None:
    assert message in rejected({"model": "m", "speculative": speculative})


def test_an_empty_speculative_object_is_no_speculation() -> None:
    assert parse(speculative={}).config.speculative is None
    assert parse(speculative={"draft_model": ""}).config.speculative is None


@pytest.mark.parametrize("budget", ["1024", 1.5, True, [1]])
def test_invalid_reasoning_budget(budget: Any) -> None:
    message = rejected({"model": "m", "llamacpp": {"reasoning-budget": budget}})
    assert message.startswith("invalid llamacpp.reasoning-budget ")


def test_reasoning_budget_values() -> None:
    assert parse(llamacpp={"reasoning-budget": 0}).config.reasoning_budget == 0
    assert parse(llamacpp={"reasoning-budget": 2048}).config.reasoning_budget == 2048
    assert parse(llamacpp={}).config.reasoning_budget is None


@pytest.mark.parametrize(
    ("vllm", "message"),
    [
        ({"hf-overrides": {"--bad": 1}}, 'invalid hf_overrides key "--bad"'),
        (
            {"hf-overrides": {"ok": {"bad key": 1}}},
            'invalid hf_overrides nested key "bad key" in "ok"',
        ),
        ({"hf-overrides": "rope"}, "invalid hf-overrides: expected a JSON object"),
        ({"gpu-memory-utilization": 1.5}, "invalid vllm.gpu-memory-utilization 1.5"),
        ({"gpu-memory-utilization": -0.5}, "invalid vllm.gpu-memory-utilization -0.5"),
        ({"gpu-memory-utilization": "0.9"}, "invalid vllm.gpu-memory-utilization '0.9'"),
        (["x"], "vllm must be a JSON object"),
    ],
)
def test_invalid_vllm_options(vllm: Any, message: str) -> None:
    assert message in rejected({"model": "m", "vllm": vllm})


def test_vllm_options_are_stored() -> None:
    config = parse(vllm={"gpu-memory-utilization": 1, "unknown": True}).config
    assert config.vllm == {"gpu-memory-utilization": 1.0}
    assert parse(vllm={}).config.vllm is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "invalid request"),
        ("{}", "invalid request"),
        ({}, "model is required"),
        ({"model": ""}, "model is required"),
        ({"model": 5}, "model is required"),
        ({"model": "m", "llamacpp": 5}, "invalid request: llamacpp must be a JSON object"),
    ],
)
def test_malformed_bodies(body: Any, message: str) -> None:
    assert rejected(body) == message


def test_unknown_fields_are_ignored_as_go_does() -> None:
    assert parse(**{"flash": True}).config == RunnerConfig()


# -- stored form ------------------------------------------------------------------------------

ROUND_TRIP = [
    RunnerConfig(),
    RunnerConfig(context_size=-1),
    RunnerConfig(context_size=4096, keep_alive=0.0),
    RunnerConfig(keep_alive=-1.0, runtime_flags=["--temp=0.5", "-v"]),
    RunnerConfig(keep_alive=5400.0, reasoning_budget=0),
    RunnerConfig(keep_alive=0.25),
    RunnerConfig(speculative=SpeculativeConfig("ai/small")),
    RunnerConfig(speculative=SpeculativeConfig("ai/small", 8, 0.75)),
    RunnerConfig(vllm={"hf-overrides": {"architectures": ["X"]}, "gpu-memory-utilization": 0.5}),
]


@pytest.mark.parametrize("config", ROUND_TRIP)
def test_to_json_from_json_round_trip(config: RunnerConfig) -> None:
    stored = json.loads(json.dumps(config.to_json()))
    assert RunnerConfig.from_json(stored) == config


def test_to_json_leaves_zero_speculative_fields_out() -> None:
    assert RunnerConfig(speculative=SpeculativeConfig("ai/small")).to_json() == {
        "speculative": {"draft_model": "ai/small"}
    }


def test_from_json_reads_dmrs_backend_configuration() -> None:
    # As DMR stores it: int32 context size, keep_alive as a Go duration string.
    config = RunnerConfig.from_json(
        {"context-size": 2048, "keep_alive": "1h0m0s", "llamacpp": {"reasoning-budget": 512}}
    )
    assert config == RunnerConfig(context_size=2048, keep_alive=3600.0, reasoning_budget=512)
