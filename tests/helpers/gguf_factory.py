"""Tiny GGUF models for tests, written with the `gguf` package.

`make_tiny_llama` writes a random-weight llama that llama.cpp (llama-server,
llama-cpp-python) loads and generates from: every tensor the llama graph needs, a
SentencePiece-style byte-fallback vocabulary and a ChatML chat template. A few hundred KB.
`make_sharded` writes the same model in llama.cpp's split format, `make_large_gguf` a
valid GGUF of a chosen size for transfer tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = ("▁hello", "▁world", "▁the", "▁a", "▁is", "▁model", "▁tiny", "▁test")

_Writer = Callable[[gguf.GGUFWriter], None]


def make_tiny_llama(
    path: Path,
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    context_length: int = 256,
    ftype: Literal["F32", "F16"] = "F32",
    seed: int = 0,
    chat_template: bool = True,
    name: str = "tiny-llama",
) -> Path:
    """Write a loadable random-weight llama GGUF to `path` and return `path`."""
    write_metadata, tensors = _tiny_llama(
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        context_length=context_length,
        ftype=ftype,
        seed=seed,
        chat_template=chat_template,
        name=name,
    )
    writer = gguf.GGUFWriter(path, "llama")
    write_metadata(writer)
    for tensor_name, array in tensors:
        writer.add_tensor(tensor_name, array)
    _finish(writer)
    return path


def make_slow_llama(path: Path) -> Path:
    """The tiny llama made big enough (~16M parameters) to generate for seconds on a CPU: for
    tests that must catch a runner in the middle of a long answer."""
    return make_tiny_llama(
        path, n_embd=512, n_layer=4, n_head=8, n_head_kv=4, n_ff=2048, context_length=4096
    )


def make_sharded(path_prefix: Path, n_shards: int, **model: Any) -> list[Path]:
    """Write the tiny llama as `<prefix>-0000i-of-0000N.gguf` split files (llama.cpp format).

    The first shard carries all metadata; every shard carries `split.no`, `split.count`
    and `split.tensors.count`, as llama.cpp's gguf-split writes them. `model` takes the
    keyword arguments of `make_tiny_llama`.
    """
    write_metadata, tensors = _tiny_llama(**model)
    if not 1 <= n_shards <= len(tensors):
        raise ValueError(f"n_shards must be between 1 and {len(tensors)}")
    per_shard = [len(tensors) // n_shards + (i < len(tensors) % n_shards) for i in range(n_shards)]
    paths: list[Path] = []
    start = 0
    for index, count in enumerate(per_shard):
        shard = path_prefix.with_name(f"{path_prefix.name}-{index + 1:05d}-of-{n_shards:05d}.gguf")
        writer = gguf.GGUFWriter(shard, "llama")
        if index == 0:
            write_metadata(writer)
        writer.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_NO, index)
        writer.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, n_shards)
        writer.add_int32(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, len(tensors))
        for tensor_name, array in tensors[start : start + count]:
            writer.add_tensor(tensor_name, array)
        _finish(writer)
        paths.append(shard)
        start += count
    return paths


def make_large_gguf(
    path: Path, size_bytes: int, *, seed: int = 0, context_length: int = 2048
) -> Path:
    """Write a valid GGUF of about `size_bytes` (one F32 tensor), streaming its data.

    The data is one random MiB repeated, so 500 MB take about a second; `seed` changes
    the bytes (and so the digest).
    """
    n_elements = max(1, (size_bytes - 4096) // 4)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"large-{seed}")
    writer.add_context_length(context_length)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_tensor_info("blob.weight", (n_elements,), np.dtype(np.float32), n_elements * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    out = writer.fout[0]
    writer.write_padding(out, out.tell())
    block = np.random.default_rng(seed).bytes(1 << 20)
    remaining = n_elements * 4
    while remaining:
        chunk = block[: min(remaining, len(block))]
        out.write(chunk)
        remaining -= len(chunk)
    writer.close()
    return path


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _vocabulary() -> tuple[list[str], list[float], list[int]]:
    """SentencePiece layout: specials, the 256 byte-fallback tokens, then a few pieces."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [gguf.TokenType.CONTROL] * 2
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyz", *_WORDS]
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    # Longer pieces score higher so the SPM merge prefers whole words.
    scores = [0.0] * (len(tokens) - len(pieces)) + [-10.0 + len(p) for p in pieces]
    return tokens, scores, [int(t) for t in types]


def _tiny_llama(
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    context_length: int = 256,
    ftype: Literal["F32", "F16"] = "F32",
    seed: int = 0,
    chat_template: bool = True,
    name: str = "tiny-llama",
) -> tuple[_Writer, list[tuple[str, np.ndarray[Any, Any]]]]:
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    tokens, scores, types = _vocabulary()
    head_dim = n_embd // n_head
    n_embd_kv = head_dim * n_head_kv
    rng = np.random.default_rng(seed)
    matrix_type = np.float16 if ftype == "F16" else np.float32

    def matrix(rows: int, cols: int) -> np.ndarray[Any, Any]:
        # numpy shape (rows, cols) is ggml ne = [cols, rows]: llama.cpp's layout.
        scale = 1.0 / math.sqrt(cols)
        return (rng.standard_normal((rows, cols)) * scale).astype(matrix_type)

    def norm() -> np.ndarray[Any, Any]:
        return np.ones(n_embd, dtype=np.float32)  # llama.cpp expects F32 norms

    tensors: list[tuple[str, np.ndarray[Any, Any]]] = [
        ("token_embd.weight", matrix(len(tokens), n_embd))
    ]
    for i in range(n_layer):
        tensors += [
            (f"blk.{i}.attn_norm.weight", norm()),
            (f"blk.{i}.attn_q.weight", matrix(n_embd, n_embd)),
            (f"blk.{i}.attn_k.weight", matrix(n_embd_kv, n_embd)),
            (f"blk.{i}.attn_v.weight", matrix(n_embd_kv, n_embd)),
            (f"blk.{i}.attn_output.weight", matrix(n_embd, n_embd)),
            (f"blk.{i}.ffn_norm.weight", norm()),
            (f"blk.{i}.ffn_gate.weight", matrix(n_ff, n_embd)),
            (f"blk.{i}.ffn_up.weight", matrix(n_ff, n_embd)),
            (f"blk.{i}.ffn_down.weight", matrix(n_embd, n_ff)),
        ]
    tensors += [("output_norm.weight", norm()), ("output.weight", matrix(len(tokens), n_embd))]

    def write_metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_name(name)
        file_type = gguf.LlamaFileType.MOSTLY_F16 if ftype == "F16" else gguf.LlamaFileType.ALL_F32
        writer.add_file_type(int(file_type))
        writer.add_context_length(context_length)
        writer.add_embedding_length(n_embd)
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(n_ff)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_head_kv)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(len(tokens))
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        if chat_template:
            writer.add_chat_template(CHATML_TEMPLATE)

    return write_metadata, tensors


BERT_WORDS = (
    "hello", "world", "the", "is", "model", "tiny", "test", "cat", "dog", "paris", "france",
    "capital", "of", "what", "weather", "today",
)  # fmt: skip


def make_tiny_reranker(path: Path, *, seed: int = 0, name: str = "tiny-reranker") -> Path:
    """Write a random-weight BERT cross-encoder that llama-server serves with
    `--embeddings --reranking`, laid out as convert_hf_to_gguf.py writes bge-reranker:
    the encoder, a `cls` dense + `cls.output` one-label head and RANK pooling."""
    return _tiny_bert(path, pooling=gguf.PoolingType.RANK, seed=seed, name=name)


def make_tiny_embedder(path: Path, *, seed: int = 0, name: str = "tiny-embedder") -> Path:
    """Write a random-weight BERT sentence encoder with MEAN pooling (as bge-small or
    all-MiniLM convert), which llama-server (`--embeddings`) and llama-cpp-python
    (`embedding=True`) turn into one vector of 32 floats per input."""
    return _tiny_bert(path, pooling=gguf.PoolingType.MEAN, seed=seed, name=name)


def _tiny_bert(
    path: Path,
    *,
    pooling: gguf.PoolingType,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
    n_ff: int = 64,
    context_length: int = 128,
    seed: int,
    name: str,
) -> Path:
    """BERT in llama.cpp's layout: token, token-type and position embeddings, post-norm
    encoder layers with biases, and the classification head when `pooling` is RANK.

    The WordPiece vocabulary is in llama.cpp's phantom-space form: [PAD] [UNK] [CLS] [SEP]
    [MASK], every letter and digit as a word start ("▁x") and a continuation ("x"), and the
    words of BERT_WORDS, so any lowercase ASCII text tokenizes without [UNK].
    """
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    types = [gguf.TokenType.CONTROL] * len(tokens)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    pieces = [*(f"▁{c}" for c in letters), *letters, *(f"▁{w}" for w in BERT_WORDS)]
    pieces += ["▁.", "▁,", "▁?", "▁!"]
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int) -> np.ndarray[Any, Any]:
        return (rng.standard_normal((rows, cols)) / math.sqrt(cols)).astype(np.float32)

    def vector(n: int) -> np.ndarray[Any, Any]:
        return (rng.standard_normal(n) * 0.02).astype(np.float32)

    def ones() -> np.ndarray[Any, Any]:
        return np.ones(n_embd, dtype=np.float32)

    tensors: list[tuple[str, np.ndarray[Any, Any]]] = [
        ("token_embd.weight", matrix(len(tokens), n_embd)),
        ("token_types.weight", matrix(2, n_embd)),
        ("position_embd.weight", matrix(context_length, n_embd)),
        ("token_embd_norm.weight", ones()),
        ("token_embd_norm.bias", vector(n_embd)),
    ]
    for i in range(n_layer):
        for proj in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensors += [
                (f"blk.{i}.{proj}.weight", matrix(n_embd, n_embd)),
                (f"blk.{i}.{proj}.bias", vector(n_embd)),
            ]
        tensors += [
            (f"blk.{i}.attn_output_norm.weight", ones()),
            (f"blk.{i}.attn_output_norm.bias", vector(n_embd)),
            (f"blk.{i}.ffn_up.weight", matrix(n_ff, n_embd)),
            (f"blk.{i}.ffn_up.bias", vector(n_ff)),
            (f"blk.{i}.ffn_down.weight", matrix(n_embd, n_ff)),
            (f"blk.{i}.ffn_down.bias", vector(n_embd)),
            (f"blk.{i}.layer_output_norm.weight", ones()),
            (f"blk.{i}.layer_output_norm.bias", vector(n_embd)),
        ]
    if pooling == gguf.PoolingType.RANK:
        tensors += [
            ("cls.weight", matrix(n_embd, n_embd)),
            ("cls.bias", vector(n_embd)),
            ("cls.output.weight", matrix(1, n_embd)),
            ("cls.output.bias", vector(1)),
        ]

    writer = gguf.GGUFWriter(path, "bert")
    writer.add_name(name)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    writer.add_pooling_type(pooling)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_type_count(2)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_pad_token_id(0)
    writer.add_unk_token_id(1)
    writer.add_bos_token_id(2)  # [CLS]: llama.cpp folds BERT's CLS into BOS
    writer.add_sep_token_id(3)
    writer.add_mask_token_id(4)
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)
    for tensor_name, array in tensors:
        writer.add_tensor(tensor_name, array)
    _finish(writer)
    return path
