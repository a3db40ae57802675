"""Runtime-flag allow-lists, hf-overrides and keep_alive.

The tables port DMR's own tests (mr:pkg/inference/runtime_flags_test.go,
runtime_flags_allowlist_test.go, hf_overrides_test.go).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from dmr_cli.errors import BadRequest
from dmr_cli.runtime.flags import (
    ALLOWED_FLAGS,
    LLAMACPP_ALLOWED_FLAGS,
    VLLM_ALLOWED_FLAGS,
    format_keep_alive,
    parse_flag_key,
    parse_go_duration,
    parse_keep_alive,
    split_raw_flags,
    validate_hf_overrides,
    validate_runtime_flags,
)

ISSUE_515_FLAGS = [
    "--n-gpu-layers", "99", "--jinja", "--top-p", "0.8", "--top-k", "20", "--temp", "0.7",
    "--min-p", "0.0", "--presence-penalty", "1.5", "--no-mmap", "--flash-attn", "--cache-type-k",
    "q8_0", "--cache-type-v", "q8_0",
]  # fmt: skip

# (name, backend, flags, allowed) — DMR's TestValidateRuntimeFlags
RUNTIME_FLAG_CASES: list[tuple[str, str, list[str], bool]] = [
    ("llama.cpp: empty flags", "llama.cpp", [], True),
    ("llama.cpp: valid allowed flags", "llama.cpp", ["--verbose", "--threads", "4"], True),
    ("llama.cpp: single character flags", "llama.cpp", ["-v", "-t", "4"], True),
    ("llama.cpp: flag with equals", "llama.cpp", ["--threads=4", "--ctx-size=2048"], True),
    ("llama.cpp: reject non-allowed flag", "llama.cpp", ["--log-file", "test.log"], False),
    ("llama.cpp: reject path in value", "llama.cpp", ["--threads", "/etc/passwd"], False),
    ("llama.cpp: reject path in flag=value", "llama.cpp", ["--threads=/var/log/test"], False),
    (
        "llama.cpp: multiple allowed flags",
        "llama.cpp",
        ["--threads", "4", "--ctx-size", "2048", "--verbose", "--flash-attn"],
        True,
    ),
    ("llama.cpp: GPU flags", "llama.cpp", ["-ngl", "99", "--main-gpu", "0"], True),
    (
        "llama.cpp: sampling flags",
        "llama.cpp",
        ["--temp", "0.7", "--top-p", "0.9", "--seed", "42"],
        True,
    ),
    ("llama.cpp: real-world flags from issue 515", "llama.cpp", ISSUE_515_FLAGS, True),
    (
        "vllm: allowed flags",
        "vllm",
        ["--tensor-parallel-size", "2", "--max-model-len", "4096"],
        True,
    ),
    ("vllm: reject non-allowed flag", "vllm", ["--output-file", "test.log"], False),
    ("vllm: short flags", "vllm", ["-tp", "2", "-q", "awq"], True),
    (
        "unknown backend: rejects every flag",
        "unknown-backend",
        ["--verbose", "--debug", "--threads", "4"],
        False,
    ),
    ("mlx has no allow-list", "mlx", ["--threads", "4"], False),
    ("reject ../ path", "llama.cpp", ["--threads", "../file.txt"], False),
    ("reject ./ path", "llama.cpp", ["--threads", "./config.yaml"], False),
    ("reject Windows path", "llama.cpp", ["--threads", "C:\\Users\\file.txt"], False),
    ("reject UNC path", "llama.cpp", ["--threads", "\\\\server\\share\\file.txt"], False),
    ("reject URL", "llama.cpp", ["--threads", "http://example.com/api"], False),
    ("dots and numbers", "llama.cpp", ["--temp", "0.7", "--seed", "42"], True),
    ("long flag smuggled via =", "llama.cpp", ["--seed=--log-file=container-to-host.log"], False),
    ("short flag smuggled via =", "llama.cpp", ["--seed=-l"], False),
    ("dash-only value via =", "llama.cpp", ["--seed=-"], False),
    ("dash-dot value via =", "llama.cpp", ["--temp=-.5"], False),
    ("negative integer via =", "llama.cpp", ["--threads=-1"], True),
    ("negative float via =", "llama.cpp", ["--temp=-0.5"], True),
    ("zero via =", "llama.cpp", ["--seed=0"], True),
    # dmr reads a standalone negative number as a value (DMR would reject the "flag" -1).
    ("negative number as value", "llama.cpp", ["--seed", "-1", "--reasoning-budget", "-1"], True),
    ("speculative flags", "llama.cpp", ["--spec-draft-n-max", "8", "--draft-p-min", "0.5"], True),
]


@pytest.mark.parametrize(
    ("backend", "flags", "allowed"),
    [case[1:] for case in RUNTIME_FLAG_CASES],
    ids=[case[0] for case in RUNTIME_FLAG_CASES],
)
def test_validate_runtime_flags(backend: str, flags: list[str], allowed: bool) -> None:
    if allowed:
        validate_runtime_flags(backend, flags)
    else:
        with pytest.raises(BadRequest):
            validate_runtime_flags(backend, flags)


@pytest.mark.parametrize(
    ("backend", "flags", "message"),
    [
        (
            "llama.cpp",
            ["--log-file", "test.log"],
            'runtime flag "--log-file" is not allowed for backend "llama.cpp"',
        ),
        (
            "llama.cpp",
            ["--threads", "/var/log/test.log"],
            'invalid runtime flag "/var/log/test.log": paths are not allowed '
            "(contains '/' or '\\\\')",
        ),
        (
            "llama.cpp",
            ["--threads=C:\\x"],
            'invalid runtime flag "--threads=C:\\\\x": paths are not allowed '
            "(contains '/' or '\\\\')",
        ),
        (
            "llama.cpp",
            ["--seed=-l"],
            "invalid flag \"--seed=-l\": value cannot start with '-' unless followed by a digit",
        ),
        ("vllm", ["--port", "8000"], 'runtime flag "--port" is not allowed for backend "vllm"'),
        (
            "llama.cpp",
            ["--threads=8", "--log-file=x"],
            'runtime flag "--log-file" is not allowed for backend "llama.cpp"',
        ),
    ],
)
def test_error_messages_are_dmrs(backend: str, flags: list[str], message: str) -> None:
    with pytest.raises(BadRequest) as info:
        validate_runtime_flags(backend, flags)
    assert info.value.message == message
    assert info.value.status == 400


def test_the_allow_list_is_checked_before_paths() -> None:
    # DMR's order: an unknown flag is reported even when a later value is a path.
    with pytest.raises(BadRequest, match="is not allowed"):
        validate_runtime_flags("llama.cpp", ["--threads", "/etc/x", "--log-file", "y"])


@pytest.mark.parametrize(
    ("flag", "key"),
    [
        ("--threads", "--threads"),
        ("-t", "-t"),
        ("--threads=4", "--threads"),
        ("-t=4", "-t"),
        ("4", ""),
        ("some-value", ""),
        ("", ""),
        ("--model-name=llama-3.2-1b", "--model-name"),
        ("--config=key=value", "--config"),
    ],
)
def test_parse_flag_key(flag: str, key: str) -> None:
    assert parse_flag_key(flag) == key


def test_allow_lists_per_backend() -> None:
    assert ALLOWED_FLAGS["llama.cpp"] is LLAMACPP_ALLOWED_FLAGS
    assert ALLOWED_FLAGS["vllm"] is VLLM_ALLOWED_FLAGS
    assert "unknown" not in ALLOWED_FLAGS and "" not in ALLOWED_FLAGS
    for flag in ["--threads", "-t", "--ctx-size", "-ngl", "--verbose", "-v", "--cache-type-k"]:
        assert flag in LLAMACPP_ALLOWED_FLAGS
    for flag in ["--tensor-parallel-size", "-tp", "--max-model-len", "--dtype"]:
        assert flag in VLLM_ALLOWED_FLAGS


LLAMACPP_CATEGORIES = {
    "threading": ["-t", "--threads", "-tb", "--threads-batch", "-C", "--cpu-mask", "--prio"],
    "context": ["-c", "--ctx-size", "-n", "--n-predict", "--keep"],
    "batching": ["-b", "--batch-size", "-ub", "--ubatch-size", "-fa", "--flash-attn"],
    "sampling": [
        "--samplers", "-s", "--seed", "--temp", "--temperature", "--top-k", "--top-p", "--min-p",
        "--typical", "--repeat-last-n", "--repeat-penalty", "--presence-penalty",
        "--frequency-penalty", "--mirostat", "--mirostat-lr", "--mirostat-ent",
        "--dynatemp-range", "--dynatemp-exp",
    ],
    "gpu": [
        "-ngl", "--gpu-layers", "--n-gpu-layers", "-sm", "--split-mode", "-ts", "--tensor-split",
        "-mg", "--main-gpu", "-dev", "--device", "--fit",
    ],
    "memory": [
        "--mlock", "--mmap", "--no-mmap", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v",
        "-kvo", "--kv-offload", "-nkvo", "--no-kv-offload", "-cram", "--cache-ram", "-kvu",
        "--context-shift",
    ],
    "rope": [
        "--rope-scaling", "--rope-scale", "--rope-freq-base", "--rope-freq-scale",
        "--yarn-orig-ctx", "--yarn-ext-factor",
    ],
    "server": [
        "-np", "--parallel", "-to", "--timeout", "-cb", "--cont-batching", "--cache-prompt",
        "--threads-http", "--warmup", "--no-warmup", "--cache-reuse",
    ],
    "mode": [
        "--embeddings", "--embedding", "--reranking", "--rerank", "--metrics", "--no-metrics",
        "--jinja", "--no-jinja", "--reasoning-format", "--reasoning-budget", "--chat-template",
        "--chat-template-kwargs",
    ],
    "speculative": [
        "--draft-max", "--draft-min", "-cd", "--ctx-size-draft", "-ngld",
        "--gpu-layers-draft", "--spec-draft-n-max", "--spec-draft-p-min", "--spec-type",
    ],
    "api": ["--api-prefix", "--webui", "--api-key", "--props", "--slots", "--grammar", "-j"],
}  # fmt: skip


@pytest.mark.parametrize("category", sorted(LLAMACPP_CATEGORIES))
def test_llamacpp_categories(category: str) -> None:
    assert set(LLAMACPP_CATEGORIES[category]) <= LLAMACPP_ALLOWED_FLAGS


def test_vllm_categories() -> None:
    expected = {
        "--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "-pp", "--max-model-len",
        "--max-num-batched-tokens", "--max-num-seqs", "--block-size", "--swap-space", "--seed",
        "--dtype", "--quantization", "-q", "--kv-cache-dtype", "--enforce-eager",
        "--enable-prefix-caching", "--enable-chunked-prefill", "--tokenizer-mode",
        "--max-logprobs", "--revision", "--load-format", "--disable-log-stats",
        "--served-model-name", "--gpu-memory-utilization",
    }  # fmt: skip
    assert expected <= VLLM_ALLOWED_FLAGS


@pytest.mark.parametrize(
    "flag",
    [
        "--log-file", "--output-file", "--model-path", "--config-file", "--lora-path",
        "--grammar-file", "--prompt-file", "--slot-save-path", "-mm", "--mmproj", "-mmu",
        "--mmproj-url", "-jf", "--json-schema-file", "--chat-template-file", "--path",
        "--webui-config-file", "--api-key-file", "--ssl-key-file", "--ssl-cert-file",
        "--models-dir", "--models-preset", "-md", "--model-draft", "--lora", "--lora-scaled",
        "--control-vector", "--control-vector-scaled", "--model", "-m", "--host", "--port",
    ],
)  # fmt: skip
def test_flags_taking_paths_are_never_allowed(flag: str) -> None:
    assert flag not in LLAMACPP_ALLOWED_FLAGS
    assert flag not in VLLM_ALLOWED_FLAGS


def test_split_raw_flags_is_shell_like() -> None:
    assert split_raw_flags("--temp 0.7 --top-k 40") == ["--temp", "0.7", "--top-k", "40"]
    assert split_raw_flags("--chat-template-kwargs '{\"a\": 1}'") == [
        "--chat-template-kwargs",
        '{"a": 1}',
    ]
    assert split_raw_flags("  ") == []
    with pytest.raises(BadRequest, match=r"^invalid runtime flags: "):
        split_raw_flags("--temp '0.7")


# -- hf-overrides -----------------------------------------------------------------------------

HF_VALID: list[dict[str, Any]] = [
    {"architectures": ["Qwen3ForSequenceClassification"]},
    {"architectures": ["GteNewModel", "GemmaForSequenceClassification"]},
    {"is_original_qwen3_reranker": True},
    {"model_type": "bert"},
    {"num_labels": 2},
    {"some_field": None},
    {
        "architectures": ["Qwen3ForSequenceClassification"],
        "classifier_from_token": ["no", "yes"],
        "is_original_qwen3_reranker": True,
    },
    {"_private_config": "value"},
    {"layer2_config": "value"},
    {},
    {"nested": {"valid_key": "data"}},
    {"array": [{"valid_key": "data"}]},
    {"deep": {"level1": {"level2": "value"}}},
    {"rope_scaling": {"type": "linear", "factor": 2.0}},
    {"architectures": ["Model"], "config": {"option1": True, "nested": {"deep_option": 42}}},
]


@pytest.mark.parametrize("overrides", HF_VALID)
def test_valid_hf_overrides(overrides: dict[str, Any]) -> None:
    validate_hf_overrides(overrides)


@pytest.mark.parametrize(
    "key",
    [
        "--malicious-flag", "-v", "123key", "key with spaces", 'key"injection', "key;rm -rf /",
        "key`whoami`", "key$HOME", "key|cat /etc/passwd", "key&malicious", "key\ninjection",
        "key\rinjection", "key$(whoami)", "key{evil}", "key[0]", "", "model.type", "model:type",
        "model/type", "model\\type", "模型", "🚀", "1",
    ],
)  # fmt: skip
def test_invalid_hf_override_keys(key: str) -> None:
    with pytest.raises(BadRequest) as info:
        validate_hf_overrides({key: "value"})
    assert info.value.message.startswith("invalid hf_overrides key ")
    assert info.value.message.endswith(
        "must contain only alphanumeric characters and underscores, "
        "and start with a letter or underscore"
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"nested": {"--malicious-flag": "data"}},
        {"deep": {"level1": {"--bad-key": "value"}}},
        {"array": [{"key;injection": "data"}]},
        {"config": {"key$(whoami)": "value"}},
        {"config": {"123key": "value"}},
        {"config": {"": "value"}},
    ],
)
def test_invalid_nested_hf_override_keys(overrides: dict[str, Any]) -> None:
    with pytest.raises(BadRequest, match=r"^invalid hf_overrides nested key "):
        validate_hf_overrides(overrides)


@pytest.mark.parametrize(
    "key",
    ["a", "_", "A", "a1", "_1", "_a", "___", "AbCdEf", "model_type", "modelType"],
)
def test_hf_override_key_boundaries(key: str) -> None:
    validate_hf_overrides({key: "value"})


def test_hf_overrides_from_json() -> None:
    validate_hf_overrides(json.loads('{"rope_scaling": {"type": "linear", "factor": 2.0}}'))
    with pytest.raises(BadRequest, match='key "--hf-overrides"'):
        validate_hf_overrides(json.loads('{"--hf-overrides": "injection"}'))
    with pytest.raises(BadRequest, match='nested key "--bad-key" in "config"'):
        validate_hf_overrides(json.loads('{"config": {"--bad-key": "value"}}'))


def test_hf_overrides_must_be_an_object() -> None:
    with pytest.raises(BadRequest, match="expected a JSON object"):
        validate_hf_overrides(["architectures"])


# -- keep_alive -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("30s", 30.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("2h45m30.5s", 9930.5),
        ("10us", 0.00001),
        ("10µs", 0.00001),
        ("0", 0.0),
        ("-0", 0.0),
        (" 10m ", 600.0),
        ("-1", -1.0),
        ("-1m", -1.0),
        ("-5h", -1.0),
        ("300", 300.0),  # a number as a string: seconds, as Ollama means it
        (300, 300.0),
        (0, 0.0),
        (0.5, 0.5),
        (-3, -1.0),
        (None, None),
    ],
)
def test_parse_keep_alive(value: Any, seconds: float | None) -> None:
    result = parse_keep_alive(value)
    if seconds is None:
        assert result is None
    else:
        assert result == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value", ["", "abc", "5x", "m", ".s", "1h-5m", "5 m", "--1m", True, [5], {"m": 5}, "1e3s"]
)
def test_invalid_keep_alive(value: Any) -> None:
    with pytest.raises(BadRequest, match=r"^invalid keep_alive "):
        parse_keep_alive(value)


def test_go_duration_errors_match_go() -> None:
    with pytest.raises(ValueError, match="missing unit"):
        parse_go_duration("5")
    with pytest.raises(ValueError, match="unknown unit"):
        parse_go_duration("5d")
    with pytest.raises(ValueError):
        parse_go_duration("9999999999h")  # past Go's int64 nanoseconds


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (300, "5m0s"),
        (0, "0s"),
        (5400, "1h30m0s"),
        (3600, "1h0m0s"),
        (0.5, "500ms"),
        (30, "30s"),
        (1.5, "1.5s"),
        (0.0015, "1.5ms"),
        (90061, "25h1m1s"),
        (-1, "-1"),
        (None, None),
    ],
)
def test_format_keep_alive(seconds: float | None, text: str | None) -> None:
    assert format_keep_alive(seconds) == text


@pytest.mark.parametrize("text", ["5m", "1h30m", "30s", "500ms", "0", "-1", "2h45m30.5s"])
def test_keep_alive_round_trips(text: str) -> None:
    seconds = parse_keep_alive(text)
    assert parse_keep_alive(format_keep_alive(seconds)) == seconds
