"""Per-model runner configuration: the `_configure` body (DMR spec §2.7) and its stored form.

`RunnerConfig.to_json` writes DMR's BackendConfiguration JSON, so `GET /engines/_configure`
answers what DMR answers and the store can persist it as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dmr_cli.errors import BadRequest
from dmr_cli.runtime.flags import (
    format_keep_alive,
    parse_keep_alive,
    split_raw_flags,
    validate_hf_overrides,
    validate_runtime_flags,
)

MODES = ("completion", "embedding", "reranking", "image-generation")
UNLIMITED_CONTEXT = -1  # DMR's "as large as the model allows"
_INT32_MAX = 2**31 - 1


@dataclass
class SpeculativeConfig:
    draft_model: str
    num_tokens: int = 0
    min_acceptance_rate: float = 0.0

    def to_json(self) -> dict[str, Any]:
        # Zero values are left out, as Go's omitempty does.
        out: dict[str, Any] = {"draft_model": self.draft_model}
        if self.num_tokens:
            out["num_tokens"] = self.num_tokens
        if self.min_acceptance_rate:
            out["min_acceptance_rate"] = self.min_acceptance_rate
        return out


@dataclass
class RunnerConfig:
    context_size: int | None = None
    runtime_flags: list[str] = field(default_factory=list)
    keep_alive: float | None = None  # seconds; 0 = after each request; -1 = never
    reasoning_budget: int | None = None
    speculative: SpeculativeConfig | None = None
    vllm: dict[str, Any] | None = None  # {"hf-overrides": {...}, "gpu-memory-utilization": f}

    def to_json(self) -> dict[str, Any]:
        """DMR's BackendConfiguration JSON; unset fields are left out."""
        out: dict[str, Any] = {}
        if self.context_size is not None:
            out["context-size"] = self.context_size
        if self.runtime_flags:
            out["runtime-flags"] = list(self.runtime_flags)
        if self.keep_alive is not None:
            out["keep_alive"] = format_keep_alive(self.keep_alive)
        if self.speculative is not None:
            out["speculative"] = self.speculative.to_json()
        if self.vllm:
            out["vllm"] = dict(self.vllm)
        if self.reasoning_budget is not None:
            out["llamacpp"] = {"reasoning-budget": self.reasoning_budget}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunnerConfig:
        """Read what `to_json` wrote (or a DMR BackendConfiguration), validating it again."""
        return _parse_config(data)


@dataclass
class ConfigureRequest:
    model: str
    mode: str  # always resolved: the body's mode, else embedding for --embeddings, else completion
    config: RunnerConfig


def parse_configure(body: Any, backend: str = "llama.cpp") -> ConfigureRequest:
    """Validate a POST /engines/_configure body; raise BadRequest with DMR's texts.

    `runtime-flags` and `raw-runtime-flags` together is an error (issue 5): DMR would silently
    prefer the former, hiding the other from the user.
    """
    if not isinstance(body, dict):
        raise BadRequest("invalid request")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("model is required")
    flags = body.get("runtime-flags")
    raw = body.get("raw-runtime-flags")
    if raw is not None and not isinstance(raw, str):
        raise BadRequest("invalid request: raw-runtime-flags must be a string")
    if flags and raw and raw.strip():
        raise BadRequest(
            "runtime-flags and raw-runtime-flags cannot be used together: send one of them"
        )
    data = dict(body)
    if raw and raw.strip():
        data["runtime-flags"] = split_raw_flags(raw)
    config = _parse_config(data)
    validate_runtime_flags(backend, config.runtime_flags)
    return ConfigureRequest(
        model=model.strip(), mode=_mode(body.get("mode"), config), config=config
    )


def _mode(value: Any, config: RunnerConfig) -> str:
    if value is None or value == "":
        embeddings = {"--embeddings", "--embedding"}
        return "embedding" if embeddings & set(config.runtime_flags) else "completion"
    if value not in MODES:
        raise BadRequest(
            f"invalid request: unknown mode {value!r}; expected one of {', '.join(MODES)}"
        )
    return str(value)


def _parse_config(data: dict[str, Any]) -> RunnerConfig:
    config = RunnerConfig()
    context = data.get("context-size")
    if context is not None:
        config.context_size = _int(context, "context-size")
        if config.context_size <= 0 and config.context_size != UNLIMITED_CONTEXT:
            raise BadRequest(
                f"invalid context-size {config.context_size}: must be a positive number of "
                "tokens, or -1 for the largest the model supports"
            )
    flags = data.get("runtime-flags")
    if flags is not None:
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise BadRequest("invalid request: runtime-flags must be a list of strings")
        config.runtime_flags = list(flags)
    config.keep_alive = parse_keep_alive(data.get("keep_alive"))
    config.speculative = _speculative(data.get("speculative"))
    llamacpp = _object(data.get("llamacpp"), "llamacpp")
    budget = llamacpp.get("reasoning-budget")
    if budget is not None:
        config.reasoning_budget = _int(budget, "llamacpp.reasoning-budget")
    config.vllm = _vllm(data.get("vllm"))
    return config


def _speculative(value: Any) -> SpeculativeConfig | None:
    spec = _object(value, "speculative")
    if not spec:
        return None
    draft = spec.get("draft_model") or ""
    if not isinstance(draft, str):
        raise BadRequest("invalid speculative.draft_model: expected a model reference")
    num_tokens = _int(spec.get("num_tokens") or 0, "speculative.num_tokens")
    if num_tokens < 0:
        raise BadRequest(f"invalid speculative.num_tokens {num_tokens}: must be 0 or more")
    rate = _number(spec.get("min_acceptance_rate") or 0, "speculative.min_acceptance_rate")
    if not 0.0 <= rate <= 1.0:
        raise BadRequest(f"invalid speculative.min_acceptance_rate {rate}: must be between 0 and 1")
    if not draft.strip():
        if num_tokens or rate:
            raise BadRequest("speculative.draft_model is required to use speculative decoding")
        return None
    return SpeculativeConfig(
        draft_model=draft.strip(), num_tokens=num_tokens, min_acceptance_rate=rate
    )


def _vllm(value: Any) -> dict[str, Any] | None:
    vllm = _object(value, "vllm")
    out: dict[str, Any] = {}
    overrides = vllm.get("hf-overrides")
    if overrides is not None:
        validate_hf_overrides(overrides)
        out["hf-overrides"] = overrides
    utilization = vllm.get("gpu-memory-utilization")
    if utilization is not None:
        fraction = _number(utilization, "vllm.gpu-memory-utilization")
        if not 0.0 <= fraction <= 1.0:
            raise BadRequest(
                f"invalid vllm.gpu-memory-utilization {fraction}: must be between 0 and 1"
            )
        out["gpu-memory-utilization"] = fraction
    return out or None


def _object(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"invalid request: {name} must be a JSON object")
    return value


def _int(value: Any, name: str) -> int:
    # JSON has one number type: accept 8192.0 but not 8192.5, and never true/false.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"invalid {name} {value!r}: expected an integer")
    if isinstance(value, float) and not value.is_integer():
        raise BadRequest(f"invalid {name} {value!r}: expected an integer")
    number = int(value)
    if not -_INT32_MAX - 1 <= number <= _INT32_MAX:
        raise BadRequest(f"invalid {name} {number}: out of range")
    return number


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"invalid {name} {value!r}: expected a number")
    return float(value)
