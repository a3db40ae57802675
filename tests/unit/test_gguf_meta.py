from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from dmr_cli.distribution.gguf_meta import (
    format_parameters,
    format_size,
    read_gguf_config,
    shard_paths,
)
from tests.helpers.gguf_factory import (
    CHATML_TEMPLATE,
    make_large_gguf,
    make_sharded,
    make_tiny_llama,
)

# Element count of the default tiny llama, worked out by hand from its shapes:
# vocab 296 x embd 64 for token_embd and output, output_norm 64, and per layer two norms
# (64 each), q and o (64x64), k and v (32x64), gate, up, down (128x64).
TINY_PARAMETERS = 2 * 296 * 64 + 64 + 2 * (2 * 64 + 2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)


def write_gguf(
    path: Path,
    build: Callable[[gguf.GGUFWriter], None],
    tensors: Sequence[tuple[str, np.ndarray[Any, Any], gguf.GGMLQuantizationType | None]] = (),
    arch: str = "llama",
) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    build(writer)
    for name, array, raw_dtype in tensors:
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantized(ggml_type: gguf.GGMLQuantizationType, n_elements: int = 256) -> np.ndarray[Any, Any]:
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    return np.zeros((1, n_elements // block_size * type_size), dtype=np.uint8)


def test_tiny_f32_model(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "tiny.gguf")
    config = read_gguf_config(path)
    assert list(config) == [
        "format",
        "quantization",
        "parameters",
        "architecture",
        "size",
        "gguf",
        "context_size",
    ]
    assert config["format"] == "gguf"
    assert config["quantization"] == "F32"
    assert config["architecture"] == "llama"
    assert config["context_size"] == 256
    assert TINY_PARAMETERS == 111_936
    assert config["parameters"] == "111.94K"
    reader = gguf.GGUFReader(path)
    assert sum(int(t.n_elements) for t in reader.tensors) == TINY_PARAMETERS
    # Size is the tensor data: the file minus its header.
    assert config["size"] == format_size(path.stat().st_size - reader.data_offset)
    assert config["size"] == "437.25KiB"


def test_tiny_f16_model_and_metadata_strings(tmp_path: Path) -> None:
    config = read_gguf_config(make_tiny_llama(tmp_path / "tiny.gguf", ftype="F16", name="t16"))
    assert config["quantization"] == "F16"
    assert config["parameters"] == "111.94K"
    meta = config["gguf"]
    assert meta["general.name"] == "t16"
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == "1"
    assert meta["llama.context_length"] == "256"
    assert meta["llama.attention.layer_norm_rms_epsilon"] == "0.000010"
    assert meta["llama.rope.freq_base"] == "10000.000000"
    assert meta["tokenizer.ggml.add_bos_token"] == "true"
    assert meta["tokenizer.chat_template"] == CHATML_TEMPLATE
    # The vocabulary arrays (296 entries) are over DMR's 50-item limit.
    assert "tokenizer.ggml.tokens" not in meta
    assert "tokenizer.ggml.scores" not in meta
    assert list(meta) == sorted(meta)


def test_every_value_type_is_stringified_as_dmr_does(tmp_path: Path) -> None:
    """Expected strings are those of DMR's own builder test (gguf_model_test.go)."""

    def build(w: gguf.GGUFWriter) -> None:
        w.add_uint8("some.parameter.uint8", 0x12)
        w.add_int8("some.parameter.int8", -0x13)
        w.add_uint16("some.parameter.uint16", 0x1234)
        w.add_int16("some.parameter.int16", -0x1235)
        w.add_uint32("some.parameter.uint32", 0x12345678)
        w.add_int32("some.parameter.int32", -0x12345679)
        w.add_float32("some.parameter.float32", 0.123456789)
        w.add_uint64("some.parameter.uint64", 0x123456789ABCDEF0)
        w.add_int64("some.parameter.int64", -0x123456789ABCDEF1)
        w.add_float64("some.parameter.float64", 0.123456789)
        w.add_bool("some.parameter.bool", True)
        w.add_bool("some.parameter.false", False)
        w.add_string("some.parameter.string", "hello world")
        w.add_key_value(
            "some.parameter.arr.i16", [1, 2, 3, 4], gguf.GGUFValueType.ARRAY,
            sub_type=gguf.GGUFValueType.INT16,
        )  # fmt: skip
        w.add_array("some.parameter.arr.str", ["a", "b c"])
        w.add_array("some.parameter.arr.50", list(range(50)))
        w.add_array("some.parameter.arr.51", list(range(51)))
        w.add_array("some.parameter.arr.strings", [f"tok{i}" for i in range(60)])
        w.add_float32("some.parameter.inf", math.inf)
        w.add_float64("some.parameter.neginf", -math.inf)
        w.add_float32("some.parameter.nan", math.nan)
        w.add_uint16("split.no", 0)
        w.add_string("some.parameter.after", "still read")

    meta = read_gguf_config(write_gguf(tmp_path / "kv.gguf", build))["gguf"]
    assert meta["some.parameter.uint8"] == "18"
    assert meta["some.parameter.int8"] == "-19"
    assert meta["some.parameter.uint16"] == "4660"
    assert meta["some.parameter.int16"] == "-4661"
    assert meta["some.parameter.uint32"] == "305419896"
    assert meta["some.parameter.int32"] == "-305419897"
    assert meta["some.parameter.float32"] == "0.123457"
    assert meta["some.parameter.uint64"] == "1311768467463790320"
    assert meta["some.parameter.int64"] == "-1311768467463790321"
    assert meta["some.parameter.float64"] == "0.123457"
    assert meta["some.parameter.bool"] == "true"
    assert meta["some.parameter.false"] == "false"
    assert meta["some.parameter.string"] == "hello world"
    assert meta["some.parameter.arr.i16"] == "1, 2, 3, 4"
    assert meta["some.parameter.arr.str"] == "a, b c"
    assert meta["some.parameter.arr.50"] == ", ".join(str(i) for i in range(50))
    assert "some.parameter.arr.51" not in meta
    assert "some.parameter.arr.strings" not in meta
    assert meta["some.parameter.inf"] == "+Inf"
    assert meta["some.parameter.neginf"] == "-Inf"
    assert meta["some.parameter.nan"] == "NaN"
    assert "split.no" not in meta
    assert meta["some.parameter.after"] == "still read"


def test_sharded_model_reads_all_shards(tmp_path: Path) -> None:
    single = read_gguf_config(make_tiny_llama(tmp_path / "single.gguf"))
    shards = make_sharded(tmp_path / "tiny", 3)
    assert [p.name for p in shards] == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert shard_paths(shards[0]) == shards
    assert shard_paths(shards[1]) == shards

    config = read_gguf_config(shards[0])
    assert config["parameters"] == single["parameters"] == format_parameters(TINY_PARAMETERS)
    assert config["quantization"] == "F32"
    assert config["context_size"] == 256
    data = 0
    for shard in shards:
        data += shard.stat().st_size - gguf.GGUFReader(shard).data_offset
    assert config["size"] == format_size(data)
    meta = config["gguf"]
    assert meta["split.count"] == "3"
    assert meta["split.tensors.count"] == "21"
    assert "split.no" not in meta
    assert meta["general.name"] == "tiny-llama"


def test_missing_shard_or_broken_file_gives_the_bare_config(tmp_path: Path) -> None:
    shards = make_sharded(tmp_path / "m", 2)
    shards[1].unlink()
    assert read_gguf_config(shards[0]) == {"format": "gguf"}

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    assert read_gguf_config(garbage) == {"format": "gguf"}

    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert read_gguf_config(empty) == {"format": "gguf"}

    whole = make_tiny_llama(tmp_path / "whole.gguf").read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(whole[:2000])  # cut inside the vocabulary
    assert read_gguf_config(truncated) == {"format": "gguf"}

    assert read_gguf_config(tmp_path / "absent.gguf") == {"format": "gguf"}


@pytest.mark.parametrize(
    ("tensor_types", "expected"),
    [
        ([gguf.GGMLQuantizationType.F32] * 3, "F32"),
        ([gguf.GGMLQuantizationType.F16] * 2 + [gguf.GGMLQuantizationType.F32] * 3, "F16"),
        ([gguf.GGMLQuantizationType.Q8_0] * 3 + [gguf.GGMLQuantizationType.F32], "Q8_0"),
        ([gguf.GGMLQuantizationType.Q4_K] * 4 + [gguf.GGMLQuantizationType.Q6_K] * 2, "Q4_K_M"),
        ([gguf.GGMLQuantizationType.Q4_K] * 4 + [gguf.GGMLQuantizationType.Q6_K], "Q4_K_S"),
        ([], "Unknown"),
    ],
)
def test_file_type_is_guessed_from_tensors_without_general_file_type(
    tmp_path: Path, tensor_types: list[gguf.GGMLQuantizationType], expected: str
) -> None:
    tensors = []
    for i, ggml_type in enumerate(tensor_types):
        if ggml_type == gguf.GGMLQuantizationType.F32:
            tensors.append((f"blk.{i}.x.weight", np.zeros(256, dtype=np.float32), None))
        elif ggml_type == gguf.GGMLQuantizationType.F16:
            tensors.append((f"blk.{i}.x.weight", np.zeros(256, dtype=np.float16), None))
        else:
            tensors.append((f"blk.{i}.x.weight", quantized(ggml_type), ggml_type))
    config = read_gguf_config(write_gguf(tmp_path / "m.gguf", lambda w: None, tensors))
    assert config["quantization"] == expected
    assert config["parameters"] == format_parameters(256 * len(tensor_types))


@pytest.mark.parametrize(
    ("file_type", "expected"),
    [(0, "F32"), (1, "F16"), (7, "Q8_0"), (15, "Q4_K_M"), (32, "BF16"), (38, "MXFP4")],
)
def test_declared_file_type_names(tmp_path: Path, file_type: int, expected: str) -> None:
    # The tensor is F16 on purpose: a declared general.file_type wins over the tensors.
    tensors = [("blk.0.x.weight", np.zeros(32, dtype=np.float16), None)]
    path = write_gguf(tmp_path / "m.gguf", lambda w: w.add_file_type(file_type), tensors)
    assert read_gguf_config(path)["quantization"] == expected


def test_file_type_past_the_known_ones(tmp_path: Path) -> None:
    tensors = [("blk.0.x.weight", np.zeros(32, dtype=np.float16), None)]
    # 39 is gguf-parser-go's "count": treated as absent, so the tensors decide.
    guessed = write_gguf(tmp_path / "a.gguf", lambda w: w.add_file_type(39), tensors)
    assert read_gguf_config(guessed)["quantization"] == "F16"
    unknown = write_gguf(tmp_path / "b.gguf", lambda w: w.add_file_type(40), tensors)
    assert read_gguf_config(unknown)["quantization"] == "Unknown"


@pytest.mark.parametrize(
    ("context_length", "expected"),
    [(4096, 4096), (0, None), (2**31 - 1, 2**31 - 1), (2**31, None)],
)
def test_context_size_bounds(tmp_path: Path, context_length: int, expected: int | None) -> None:
    path = write_gguf(tmp_path / "m.gguf", lambda w: w.add_context_length(context_length))
    assert read_gguf_config(path).get("context_size") == expected


def test_context_size_follows_the_architecture(tmp_path: Path) -> None:
    def build(w: gguf.GGUFWriter) -> None:
        w.add_uint32("qwen2.context_length", 32768)
        w.add_uint32("llama.context_length", 1024)  # another architecture's key: ignored

    config = read_gguf_config(write_gguf(tmp_path / "q.gguf", build, arch="qwen2"))
    assert config["architecture"] == "qwen2"
    assert config["context_size"] == 32768


def test_header_ending_on_the_alignment_is_padded_as_gguf_parser_go_does(tmp_path: Path) -> None:
    """gguf-parser-go skips a whole alignment when the header already ends aligned.

    One of 32 consecutive name lengths puts the end of the header on a 32-byte boundary;
    for that file DMR reports 32 bytes less than the real tensor data.
    """
    tensor = [("blk.0.x.weight", np.zeros(64, dtype=np.float32), None)]  # 256 data bytes
    sizes = []
    for n in range(32):
        path = write_gguf(tmp_path / f"m{n}.gguf", lambda w, n=n: w.add_name("x" * n), tensor)
        sizes.append(read_gguf_config(path)["size"])
    assert sizes.count("224B") == 1
    assert sizes.count("256B") == 31


def test_large_file(tmp_path: Path) -> None:
    path = make_large_gguf(tmp_path / "large.gguf", 60_000_000, seed=3)
    assert 59_000_000 < path.stat().st_size <= 60_000_000
    config = read_gguf_config(path)
    n_elements = (60_000_000 - 4096) // 4
    assert config["parameters"] == format_parameters(n_elements) == "15M"
    assert config["size"] == format_size(n_elements * 4) == "57.22MiB"
    assert config["quantization"] == "F32"
    assert config["context_size"] == 2048
    assert config["gguf"]["general.name"] == "large-3"
    other = make_large_gguf(tmp_path / "other.gguf", 2_000_000, seed=4)
    assert other.read_bytes()[-100:] != path.read_bytes()[-100:]


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (0, "0"),
        (183, "183"),
        (1000, "1K"),
        (16_780_000, "16.78M"),
        (361_821_120, "361.82M"),
        (1_235_814_400, "1.24B"),
        (999_999, "1000K"),  # gguf-parser-go rounds without moving up a unit
        (7_000_000_000_000_000, "7Q"),
    ],
)
def test_format_parameters(count: int, expected: str) -> None:
    assert format_parameters(count) == expected


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, "0B"),
        (864, "864B"),
        (1010, "1.01KB"),  # 1000..1023 bytes are decimal kilobytes
        (1024, "1KiB"),
        (268_802_867, "256.35MiB"),
        (2**30, "1GiB"),
        (4_683_000_000, "4.36GiB"),
    ],
)
def test_format_size(size: int, expected: str) -> None:
    assert format_size(size) == expected
