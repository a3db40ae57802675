"""How much memory a model needs before it is loaded: weights plus KV cache.

DMR removed its estimate and users lost machines to swapping; this one is deliberately
simple and errs on the high side: the weights (mapped whole), an f16 KV cache for the
context, and a fixed allowance for compute buffers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

GiB = 1024**3
COMPUTE_OVERHEAD = 256 * 1024**2
KV_BYTES_PER_ELEMENT = 2  # llama.cpp's default cache type is f16


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    context_size: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + COMPUTE_OVERHEAD

    def describe(self) -> str:
        return (
            f"{gib(self.total)} (weights {gib(self.weights)} + KV cache {gib(self.kv_cache)} "
            f"for a {self.context_size}-token context)"
        )


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _int(kv: Mapping[str, str], key: str) -> int | None:
    try:
        return int(kv[key].split(",")[0])  # per-layer arrays: the first layer stands for all
    except (KeyError, ValueError):
        return None


def estimate(gguf: Mapping[str, str], weights_bytes: int, context_size: int) -> MemoryEstimate:
    """`gguf` is the model config's `gguf` map (every header value as a string)."""
    arch = gguf.get("general.architecture", "llama")
    layers = _int(gguf, f"{arch}.block_count") or 0
    embd = _int(gguf, f"{arch}.embedding_length") or 0
    heads = _int(gguf, f"{arch}.attention.head_count") or 1
    heads_kv = _int(gguf, f"{arch}.attention.head_count_kv") or heads
    head_k = _int(gguf, f"{arch}.attention.key_length") or (embd // heads if heads else 0)
    head_v = _int(gguf, f"{arch}.attention.value_length") or head_k
    per_token = layers * heads_kv * (head_k + head_v) * KV_BYTES_PER_ELEMENT
    return MemoryEstimate(
        weights=weights_bytes, kv_cache=per_token * max(context_size, 0), context_size=context_size
    )
