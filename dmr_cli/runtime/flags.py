"""Runtime-flag validation and keep_alive parsing for `_configure` (DMR spec §2.7, §7.5).

The allow-lists are DMR's (mr:pkg/inference/runtime_flags_allowlist.go): only flags known to be
safe reach an inference engine, and flags that take file paths are left out on purpose.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Sequence
from typing import Any

from dmr_cli.errors import BadRequest

LLAMACPP_ALLOWED_FLAGS: frozenset[str] = frozenset(
    {
        # Threading and CPU control
        "-t", "--threads", "-tb", "--threads-batch", "-C", "--cpu-mask", "-Cr", "--cpu-range",
        "--cpu-strict", "--prio", "--poll", "-Cb", "--cpu-mask-batch", "-Crb", "--cpu-range-batch",
        "--cpu-strict-batch", "--prio-batch", "--poll-batch",
        # Context and prediction
        "-c", "--ctx-size", "-n", "--predict", "--n-predict", "--keep",
        # Batching and performance
        "-b", "--batch-size", "-ub", "--ubatch-size", "--swa-full", "-fa", "--flash-attn",
        "--perf", "--no-perf",
        # Sampling
        "--samplers", "-s", "--seed", "--temp", "--temperature", "--top-k", "--top-p", "--min-p",
        "--top-nsigma", "--xtc-probability", "--xtc-threshold", "--typical", "--repeat-last-n",
        "--repeat-penalty", "--presence-penalty", "--frequency-penalty", "--dry-multiplier",
        "--dry-base", "--dry-allowed-length", "--dry-penalty-last-n", "--mirostat",
        "--mirostat-lr", "--mirostat-ent", "--ignore-eos", "--dynatemp-range", "--dynatemp-exp",
        # GPU and devices
        "-dev", "--device", "-ngl", "--gpu-layers", "--n-gpu-layers", "-sm", "--split-mode",
        "-ts", "--tensor-split", "-mg", "--main-gpu", "-fit", "--fit", "-fitt", "--fit-target",
        "-fitc", "--fit-ctx",
        # Memory and caching
        "-kvo", "--kv-offload", "-nkvo", "--no-kv-offload", "--repack", "-nr", "--no-repack",
        "--no-host", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v", "--mlock", "--mmap",
        "--no-mmap", "-dio", "--direct-io", "-ndio", "--no-direct-io", "-cram", "--cache-ram",
        "-kvu", "--kv-unified", "--context-shift", "--no-context-shift",
        # RoPE scaling
        "--rope-scaling", "--rope-scale", "--rope-freq-base", "--rope-freq-scale",
        "--yarn-orig-ctx", "--yarn-ext-factor", "--yarn-attn-factor", "--yarn-beta-slow",
        "--yarn-beta-fast",
        # Server
        "-np", "--parallel", "-cb", "--cont-batching", "-nocb", "--no-cont-batching",
        "--warmup", "--no-warmup", "-to", "--timeout", "--threads-http", "--cache-prompt",
        "--no-cache-prompt", "--cache-reuse", "--sleep-idle-seconds",
        # Multimodal (no file paths)
        "--mmproj-auto", "--no-mmproj", "--no-mmproj-auto", "--mmproj-offload",
        "--no-mmproj-offload", "--image-min-tokens", "--image-max-tokens", "--spm-infill",
        # Speculative decoding (no file paths): canonical --spec-draft-* names and legacy aliases
        "--spec-draft-threads", "-td", "--threads-draft",
        "--spec-draft-threads-batch", "-tbd", "--threads-batch-draft",
        "--spec-draft-cpu-mask", "-Cd", "--cpu-mask-draft",
        "--spec-draft-cpu-range", "-Crd", "--cpu-range-draft",
        "--spec-draft-cpu-strict", "--cpu-strict-draft",
        "--spec-draft-prio", "--prio-draft",
        "--spec-draft-poll", "--poll-draft",
        "--spec-draft-cpu-mask-batch", "-Cbd", "--cpu-mask-batch-draft",
        "--spec-draft-cpu-strict-batch", "--cpu-strict-batch-draft",
        "--spec-draft-prio-batch", "--prio-batch-draft",
        "--spec-draft-poll-batch", "--poll-batch-draft",
        "--spec-draft-override-tensor", "-otd", "--override-tensor-draft",
        "--spec-draft-cpu-moe", "-cmoed", "--cpu-moe-draft",
        "--spec-draft-n-cpu-moe", "--spec-draft-ncmoe", "-ncmoed", "--n-cpu-moe-draft",
        "--spec-draft-n-max", "--draft-n-max", "--draft-max",
        "--spec-draft-n-min", "--draft-n-min", "--draft-min",
        "--spec-draft-p-split", "--draft-p-split",
        "--spec-draft-p-min", "--draft-p-min",
        "--spec-draft-backend-sampling", "--no-spec-draft-backend-sampling",
        "--spec-draft-device", "-devd", "--device-draft",
        "--spec-draft-ngl", "-ngld", "--gpu-layers-draft", "--n-gpu-layers-draft",
        "--spec-type", "--spec-ngram-mod-n-min", "--spec-ngram-mod-n-max",
        "--spec-ngram-mod-n-match", "--spec-ngram-simple-size-n", "--spec-ngram-simple-size-m",
        "--spec-ngram-simple-min-hits", "--spec-ngram-map-k-size-n", "--spec-ngram-map-k-size-m",
        "--spec-ngram-map-k-min-hits", "--spec-ngram-map-k4v-size-n",
        "--spec-ngram-map-k4v-size-m", "--spec-ngram-map-k4v-min-hits",
        "--spec-draft-type-k", "-ctkd", "--cache-type-k-draft",
        "--spec-draft-type-v", "-ctvd", "--cache-type-v-draft",
        "-cd", "--ctx-size-draft",
        # LoRA and control vectors (no file paths)
        "--lora-init-without-apply", "--control-vector-layer-range",
        # Grammar and constraints (no file paths)
        "--grammar", "-j", "--json-schema", "-bs", "--backend-sampling",
        # Templates and formats (no file paths)
        "--chat-template", "--chat-template-kwargs", "--jinja", "--no-jinja", "--pooling",
        "--reasoning", "--reasoning-format", "--reasoning-budget", "--prefill-assistant",
        "--no-prefill-assistant",
        # Web UI and API (no file paths)
        "--api-prefix", "--webui", "--no-webui", "--webui-config", "--api-key", "--metrics",
        "--no-metrics", "--props", "--slots", "--no-slots",
        # Embedding and specialised
        "--embedding", "--embeddings", "--rerank", "--reranking", "-sps",
        "--slot-prompt-similarity",
        # Tensors and computation
        "-cmoe", "--cpu-moe", "-ncmoe", "--n-cpu-moe", "--check-tensors", "--op-offload",
        "--no-op-offload",
        # Verbose/debug
        "-v", "--verbose",
    }
)  # fmt: skip

VLLM_ALLOWED_FLAGS: frozenset[str] = frozenset(
    {
        "--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "-pp",
        "--max-model-len", "--max-num-batched-tokens", "--max-num-seqs", "--block-size",
        "--swap-space", "--seed",
        "--dtype", "--quantization", "-q", "--kv-cache-dtype",
        "--enforce-eager", "--enable-prefix-caching", "--enable-chunked-prefill",
        "--disable-custom-all-reduce", "--use-v2-block-manager",
        "--tokenizer-mode", "--max-logprobs",
        "--revision", "--load-format", "--disable-log-stats", "--served-model-name",
        "--gpu-memory-utilization",
    }
)  # fmt: skip

# Backends without an entry (mlx, sglang, diffusers) accept no runtime flags at all.
ALLOWED_FLAGS: dict[str, frozenset[str]] = {
    "llama.cpp": LLAMACPP_ALLOWED_FLAGS,
    "vllm": VLLM_ALLOWED_FLAGS,
}

_NEGATIVE_NUMBER = re.compile(r"-\d+(\.\d*)?([eE][-+]?\d+)?")
_HF_KEY = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_KEY_RULE = (
    "must contain only alphanumeric characters and underscores, "
    "and start with a letter or underscore"
)


def parse_flag_key(flag: str) -> str:
    """The flag name of an argument: `--threads=4` → `--threads`; a value → ``""``."""
    if not flag.startswith("-"):
        return ""
    return flag.split("=", 1)[0]


def validate_runtime_flags(backend: str, flags: Sequence[str]) -> None:
    """Raise BadRequest (DMR's texts) unless every flag is allowed and safe for `backend`.

    Checks run in DMR's order: the allow-list, values smuggling a flag through `=`, then
    paths. One deliberate difference: a standalone negative number (`--seed -1`) is a value
    here, where DMR reads it as the unknown flag "-1" and rejects it.
    """
    allowed = ALLOWED_FLAGS.get(backend, frozenset())
    for flag in flags:
        key = parse_flag_key(flag)
        if not key or _NEGATIVE_NUMBER.fullmatch(flag):
            continue
        if key not in allowed:
            raise BadRequest(
                f"runtime flag {_go_quote(key)} is not allowed for backend {_go_quote(backend)}"
            )
    for flag in flags:
        _, equals, value = flag.partition("=")
        # A value may start with '-' only as a negative number: `--seed=-l` would smuggle a flag.
        if equals and value.startswith("-") and not value[1:2].isdigit():
            raise BadRequest(
                f"invalid flag {_go_quote(flag)}: "
                "value cannot start with '-' unless followed by a digit"
            )
    for flag in flags:
        if "/" in flag or "\\" in flag:
            raise BadRequest(
                f"invalid runtime flag {_go_quote(flag)}: "
                "paths are not allowed (contains '/' or '\\\\')"
            )


def split_raw_flags(raw: str) -> list[str]:
    """Split `raw-runtime-flags` into words the way a POSIX shell would (quotes, escapes)."""
    try:
        return shlex.split(raw)
    except ValueError as exc:
        raise BadRequest(f"invalid runtime flags: {exc}") from exc


def validate_hf_overrides(value: Any) -> None:
    """Raise BadRequest unless `value` is a JSON object whose keys, at every depth, are safe."""
    if not isinstance(value, dict):
        raise BadRequest("invalid hf-overrides: expected a JSON object")
    for key, item in value.items():
        if not isinstance(key, str) or not _HF_KEY.fullmatch(key):
            raise BadRequest(f"invalid hf_overrides key {_go_quote(str(key))}: {_KEY_RULE}")
        _validate_hf_value(key, item)


def _validate_hf_value(path: str, value: Any) -> None:
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _validate_hf_value(f"{path}[{index}]", item)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not _HF_KEY.fullmatch(key):
                raise BadRequest(
                    f"invalid hf_overrides nested key {_go_quote(str(key))} in "
                    f"{_go_quote(path)}: {_KEY_RULE}"
                )
            _validate_hf_value(f"{path}.{key}", item)
        return
    raise BadRequest(
        f"invalid hf_overrides value for key {_go_quote(path)}: "
        f"unsupported type {type(value).__name__}"
    )


# -- keep_alive -----------------------------------------------------------------------------

_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_MAX_NS = 2**63 - 1
_DURATION_PART = re.compile(r"(\d*)(?:\.(\d*))?([^\d.]*)")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string (`5m`, `1h30m`, `-1.5h`, `300ms`); ValueError if invalid.

    Same grammar as Go's time.ParseDuration: a sign, then number+unit pairs; a bare `0` needs
    no unit.
    """
    rest = text
    negative = rest.startswith("-")
    if rest and rest[0] in "-+":
        rest = rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(f"invalid duration {text!r}")
    total = 0  # nanoseconds, as Go counts them
    while rest:
        match = _DURATION_PART.match(rest)
        assert match is not None  # every group may be empty, so it always matches
        whole, frac, unit = match.groups()
        if not whole and not frac:
            raise ValueError(f"invalid duration {text!r}")
        if not unit:
            raise ValueError(f"missing unit in duration {text!r}")
        if unit not in _UNIT_NS:
            raise ValueError(f"unknown unit {unit!r} in duration {text!r}")
        scale = _UNIT_NS[unit]
        total += int(whole or "0") * scale
        if frac:
            total += int(frac) * scale // 10 ** len(frac)
        if total > _MAX_NS:
            raise ValueError(f"invalid duration {text!r}")
        rest = rest[match.end() :]
    return (-total if negative else total) / 1e9


def parse_keep_alive(value: str | int | float | None) -> float | None:
    """keep_alive in seconds: None when unset, 0 to unload after each request, -1 for never.

    Accepts Go durations (`5m`, `1h30m`, `30s`, `500ms`), `"0"`, `"-1"` and any negative
    duration (never unload), and numbers of seconds, which is what Ollama clients send.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest(f"invalid keep_alive {value!r}: expected a duration such as 5m, 0 or -1")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise BadRequest(
                f"invalid keep_alive {value!r}: expected a duration such as 5m, 0 or -1"
            )
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = (
                float(int(text)) if re.fullmatch(r"[-+]?\d+", text) else parse_go_duration(text)
            )
        except ValueError as exc:
            raise BadRequest(
                f"invalid keep_alive {value!r}: expected a duration such as 5m, 1h30m, 30s, "
                "0 (unload after each request) or -1 (never unload)"
            ) from exc
    else:
        raise BadRequest(f"invalid keep_alive {value!r}: expected a string or a number of seconds")
    return -1.0 if seconds < 0 else seconds


def format_keep_alive(seconds: float | None) -> str | None:
    """keep_alive as DMR writes it: Go's Duration.String() (`5m0s`), or `-1` for never."""
    if seconds is None:
        return None
    if seconds < 0:
        return "-1"
    return go_duration_string(round(seconds * 1e9))


def go_duration_string(ns: int) -> str:
    """Go's time.Duration.String() for a non-negative count of nanoseconds."""
    if ns == 0:
        return "0s"
    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return _fixed(ns, 1_000) + "µs"
    if ns < 1_000_000_000:
        return _fixed(ns, 1_000_000) + "ms"
    hours, ns = divmod(ns, 3_600_000_000_000)
    minutes, ns = divmod(ns, 60_000_000_000)
    text = _fixed(ns, 1_000_000_000) + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


def _fixed(value: int, unit: int) -> str:
    """`value / unit` in decimal without trailing zeros (Go prints 1.5s, not 1.500000000s)."""
    whole, frac = divmod(value, unit)
    if not frac:
        return str(whole)
    digits = str(frac).rjust(len(str(unit)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"


def _go_quote(text: str) -> str:
    """Go's %q for the strings these messages quote (escapes backslashes and quotes)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f'"{escaped}"'
