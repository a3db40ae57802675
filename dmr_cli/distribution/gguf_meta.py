"""GGUF metadata: DMR's inner model config, computed as gguf-parser-go computes it (spec §4.2).

Only the header, the key/values and the tensor infos are read (through mmap), so a
multi-gigabyte file costs milliseconds. Values follow gguf-parser-go and DMR's
`format/gguf.go`: the human `parameters`/`size` strings, the file-type name, every
key/value as a string (arrays over 50 items left out), `split.no` dropped, and shards
read together from the first one.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHARD_NAME = re.compile(r"^(?P<prefix>.*)-(?P<shard>\d{5})-of-(?P<total>\d{5})\.gguf$")

_GGUF_MAGIC = b"GGUF"
_MAX_ARRAY_ITEMS = 50  # DMR leaves longer arrays (vocabularies, merges) out of the config
_DEFAULT_ALIGNMENT = 32
_MAX_CONTEXT = 2**31 - 1

# GGUF metadata value types.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(8, 13)
_SCALARS: dict[int, struct.Struct] = {
    _UINT8: struct.Struct("B"),
    _INT8: struct.Struct("b"),
    _UINT16: struct.Struct("H"),
    _INT16: struct.Struct("h"),
    _UINT32: struct.Struct("I"),
    _INT32: struct.Struct("i"),
    _FLOAT32: struct.Struct("f"),
    _BOOL: struct.Struct("B"),
    _UINT64: struct.Struct("Q"),
    _INT64: struct.Struct("q"),
    _FLOAT64: struct.Struct("d"),
}

# gguf-parser-go's GGUFFileType names (= llama.cpp's llama_ftype), without its `MOSTLY_`
# prefix. Index 39 (one past MXFP4) is its "count": a file claiming it is guessed.
FILE_TYPES = (
    "F32", "F16", "Q4_0", "Q4_1", "Q4_1_SOME_F16", "Q4_2", "Q4_3", "Q8_0", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
    "IQ2_XXS", "IQ2_XS", "Q2_K_S", "IQ3_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ3_M",
    "IQ2_S", "IQ2_M", "IQ4_XS", "IQ1_M", "BF16", "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8",
    "TQ1_0", "TQ2_0", "MXFP4",
)  # fmt: skip
UNKNOWN_FILE_TYPE = "Unknown"

# ggml tensor type ids used by the file-type guess.
_F32, _F16, _Q4_0, _Q4_1, _Q4_2, _Q4_3, _Q5_0, _Q5_1, _Q8_0 = 0, 1, 2, 3, 4, 5, 6, 7, 8
_Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = 10, 11, 12, 13, 14
_IQ2_XXS, _IQ2_XS, _IQ3_XXS, _IQ1_S, _IQ4_NL, _IQ3_S, _IQ2_S, _IQ4_XS = range(16, 24)
_IQ1_M, _BF16 = 29, 30
_Q4_0_4_4, _Q4_0_4_8, _Q4_0_8_8, _TQ1_0, _TQ2_0 = range(31, 36)
_MXFP4 = 39
# Tensor type -> file type where no neighbouring counts matter (gguf-parser-go GetFileType).
_DIRECT_FILE_TYPE = {
    _F16: 1, _Q4_0: 2, _Q4_1: 3, _Q4_2: 5, _Q4_3: 6, _Q5_0: 8, _Q5_1: 9, _Q8_0: 7,
    _Q6_K: 18, _IQ2_XXS: 19, _IQ2_S: 29, _IQ3_XXS: 23, _IQ1_S: 24, _IQ4_NL: 25,
    _IQ4_XS: 30, _IQ1_M: 31, _BF16: 32, _Q4_0_4_4: 33, _Q4_0_4_8: 34, _Q4_0_8_8: 35,
    _TQ1_0: 36, _TQ2_0: 37, _MXFP4: 38,
}  # fmt: skip

_DIFFUSION_ARCHITECTURES = ("flux", "sd", "sd2.5", "sd3", "stable-diffusion")
_DIFFUSION_TENSORS = re.compile(
    r"^(model\.diffusion_model|double_blocks|joint_blocks|decoder|encoder|text_model)\."
)


def read_gguf_config(path: Path) -> dict[str, Any]:
    """DMR's config object for a GGUF file (or the first shard of a split model)."""
    try:
        parsed = [parse_file(p) for p in shard_paths(path)]
    except (OSError, ValueError, struct.error):
        return {"format": "gguf"}
    return _config(parsed)


def shard_paths(path: Path) -> list[Path]:
    """All shards of the split model `path` names (`-00001-of-00003.gguf`), else `[path]`."""
    match = SHARD_NAME.match(path.name)
    if not match or int(match["shard"]) <= 0 or int(match["total"]) <= 0:
        return [path]
    total = int(match["total"])
    prefix = match["prefix"]
    return [path.with_name(f"{prefix}-{i:05d}-of-{total:05d}.gguf") for i in range(1, total + 1)]


def format_parameters(count: int) -> str:
    """gguf-parser-go's GGUFParametersScalar, spaces removed: `361.82M`, `1.24B`, `183`."""
    return _scaled(count, ((1e15, "Q"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")), "0")


def format_size(size: int) -> str:
    """gguf-parser-go's GGUFBytesScalar, spaces removed: `256.35MiB`, `1.01KB`, `864B`."""
    units = (
        (2**50, "PiB"), (1e15, "PB"), (2**40, "TiB"), (1e12, "TB"), (2**30, "GiB"),
        (1e9, "GB"), (2**20, "MiB"), (1e6, "MB"), (2**10, "KiB"), (1e3, "KB"),
    )  # fmt: skip
    return _scaled(size, units, "0B", bare_unit="B")


def _scaled(
    value: int, units: tuple[tuple[float, str], ...], zero: str, bare_unit: str = ""
) -> str:
    if value == 0:
        return zero
    base, unit = next(((b, u) for b, u in units if value >= b), (1.0, bare_unit))
    return f"{value / base:.2f}".removesuffix(".00") + unit


@dataclass
class ParsedGGUF:
    kvs: list[tuple[str, int, Any]] = field(default_factory=list)  # key, type, value
    tensors: list[tuple[str, int, int]] = field(default_factory=list)  # name, type, elements
    model_size: int = 0


class _Cursor:
    """Bounds-checked little/big-endian reads over the mapped header."""

    def __init__(self, buf: mmap.mmap, order: str, wide: bool) -> None:
        self.buf, self.order, self.pos = buf, order, 0
        self.len_format = "Q" if wide else "I"  # GGUF v1 used 32-bit lengths and counts
        self._structs: dict[str, struct.Struct] = {}

    def unpack(self, fmt: str) -> Any:
        s = self._structs.get(fmt) or self._structs.setdefault(fmt, struct.Struct(self.order + fmt))
        if self.pos + s.size > len(self.buf):
            raise ValueError("truncated GGUF header")
        (value,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return value

    def length(self) -> int:
        n: int = self.unpack(self.len_format)
        if n > len(self.buf) - self.pos:
            raise ValueError("GGUF length runs past the end of the file")
        return n

    def string(self) -> str:
        n = self.length()
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool = True) -> Any:
        """A value of `vtype`; arrays come back as (item type, length, items or None)."""
        if vtype in _SCALARS:
            value = self.unpack(_SCALARS[vtype].format)
            return value != 0 if vtype == _BOOL else value
        if vtype == _STRING:
            if keep:
                return self.string()
            n = self.length()  # read before moving: `pos += length()` would drop the prefix
            self.pos += n
            return None
        if vtype == _ARRAY:
            item_type: int = self.unpack("I")
            count = self.length()
            keep_items = keep and count <= _MAX_ARRAY_ITEMS
            if item_type in _SCALARS and not keep_items:
                self.pos += count * _SCALARS[item_type].size  # skip vocab-sized arrays at once
                if self.pos > len(self.buf):
                    raise ValueError("truncated GGUF array")
                return (item_type, count, None)
            if not keep_items:
                for _ in range(count):
                    self.value(item_type, keep=False)
                return (item_type, count, None)
            return (item_type, count, [self.value(item_type) for _ in range(count)])
        raise ValueError(f"unknown GGUF value type {vtype}")


def parse_file(path: Path) -> ParsedGGUF:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != _GGUF_MAGIC:
            raise ValueError("not a GGUF file")
        (version,) = struct.unpack_from("<I", buf, 4)
        order = "<"
        if version & 0xFFFF == 0:  # written on a big-endian machine
            order, (version,) = ">", struct.unpack_from(">I", buf, 4)
        if version not in (1, 2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        cur = _Cursor(buf, order, wide=version > 1)
        cur.pos = 8
        tensor_count, kv_count = cur.length(), cur.length()
        out = ParsedGGUF()
        alignment = _DEFAULT_ALIGNMENT
        for _ in range(kv_count):
            key = cur.string()
            vtype: int = cur.unpack("I")
            value = cur.value(vtype)
            if key == "general.alignment" and vtype == _UINT32 and value > 0:
                alignment = value
            if key != "split.no":  # as gguf-parser-go: shards would disagree on it
                out.kvs.append((key, vtype, value))
        for _ in range(tensor_count):
            name = cur.string()
            n_dims: int = cur.unpack("I")
            dims = [cur.unpack(cur.len_format) for _ in range(n_dims)]
            ggml_type: int = cur.unpack("I")
            cur.unpack("Q")  # data offset
            out.tensors.append((name, ggml_type, math.prod(dims)))
        # gguf-parser-go pads by a full `alignment` when the header already ends aligned;
        # copied so `size` matches DMR's to the byte.
        data_start = cur.pos + alignment - cur.pos % alignment
        out.model_size = max(0, len(buf) - data_start)  # a file with no tensor data: 0B
        return out


def _config(shards: list[ParsedGGUF]) -> dict[str, Any]:
    kvs: dict[str, tuple[int, Any]] = {}
    for shard in shards:
        for key, vtype, value in shard.kvs:
            kvs[key] = (vtype, value)
    tensors = [t for shard in shards for t in shard.tensors]
    architecture = _architecture(kvs, tensors)
    config: dict[str, Any] = {
        "format": "gguf",
        "quantization": _file_type(kvs, tensors, architecture),
        "parameters": format_parameters(sum(elements for _, _, elements in tensors)),
        "architecture": architecture,
        "size": format_size(sum(shard.model_size for shard in shards)),
    }
    metadata = {k: s for k, (t, v) in sorted(kvs.items()) if (s := _stringify(t, v)) is not None}
    if metadata:
        config["gguf"] = metadata
    context = _number(kvs.get(f"{architecture}.context_length"))
    if context is not None and 0 < context <= _MAX_CONTEXT:
        config["context_size"] = int(context)
    return {k: v for k, v in config.items() if v != ""}


def _architecture(kvs: dict[str, tuple[int, Any]], tensors: list[tuple[str, int, int]]) -> str:
    """gguf-parser-go's Metadata().Architecture."""
    hint = kvs.get("controlvector.model_hint")
    if hint and hint[0] == _STRING:
        return str(hint[1]).strip()
    arch = kvs.get("general.architecture")
    if arch and arch[0] == _STRING and arch[1] not in _DIFFUSION_ARCHITECTURES:
        return str(arch[1]).strip()
    general_type = kvs.get("general.type")
    if general_type and general_type[1] == "imatrix":
        return "imatrix"
    if any(_DIFFUSION_TENSORS.match(name) for name, _, _ in tensors):
        return "diffusion"
    return "llama"


def _file_type(
    kvs: dict[str, tuple[int, Any]], tensors: list[tuple[str, int, int]], architecture: str
) -> str:
    declared = _number(kvs.get("general.file_type"))
    file_type = int(declared) if declared is not None and declared >= 0 else len(FILE_TYPES)
    if file_type == len(FILE_TYPES):
        file_type = _guess_file_type(tensors, architecture)
    return FILE_TYPES[file_type] if file_type < len(FILE_TYPES) else UNKNOWN_FILE_TYPE


def _guess_file_type(tensors: list[tuple[str, int, int]], architecture: str) -> int:
    """gguf-parser-go's GetFileType over the weight tensors: the dominant tensor type."""
    counts: dict[int, int] = {}
    for name, ggml_type, _ in tensors:
        if architecture == "diffusion":
            counted = name.endswith(".weight")
        else:
            counted = (
                name.startswith(("token_embd", "blk."))
                or "_norm" in name
                or name.endswith(".weight")
            )
        if counted:
            counts[ggml_type] = counts.get(ggml_type, 0) + 1
    if not counts:
        return len(FILE_TYPES)
    # Go sorts by count only (ties in random map order); ties go to the lower type id here.
    ranked = sorted(counts, key=lambda t: (-counts[t], t))
    if ranked[0] == _F32:
        if len(ranked) == 1:
            return 0
        ranked[0] = ranked[1]
    top = ranked[0]
    count = counts.get
    if top == _Q2_K:
        return 21 if ranked[-1] == _Q5_K else 10
    if top == _Q3_K:
        if count(_Q8_0, 0) > 0 or (count(_Q5_K, 0) > 1 and count(_Q4_K, 0) == 0):
            return 13
        return 12 if count(_Q4_K, 0) > 1 else 11
    if top == _Q4_K:
        if count(_Q6_K, 0) > 1:
            return 15
        return 12 if count(_Q3_K, 0) > 1 else 14
    if top == _Q5_K:
        return 17 if count(_Q6_K, 0) > 1 else 16
    if top == _IQ2_XS:
        return 28 if count(_IQ4_XS, 0) > 1 else 20
    if top == _IQ3_S:
        return 22 if count(_IQ3_XXS, 0) > 1 else 26
    return _DIRECT_FILE_TYPE.get(top, len(FILE_TYPES))


def _number(entry: tuple[int, Any] | None) -> float | None:
    if entry is None or entry[0] not in _SCALARS or entry[0] == _BOOL:
        return None
    value = entry[1]
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _stringify(vtype: int, value: Any) -> str | None:
    """DMR's extractGGUFMetadata: Go's %d, %f, %t; arrays joined; long arrays left out."""
    if vtype == _ARRAY:
        item_type, count, items = value
        if count > _MAX_ARRAY_ITEMS or items is None:
            return None
        # Nested arrays contribute nothing, as in DMR.
        return ", ".join(_scalar_string(item_type, v) for v in items if item_type != _ARRAY)
    return _scalar_string(vtype, value)


def _scalar_string(vtype: int, value: Any) -> str:
    if vtype == _BOOL:
        return "true" if value else "false"
    if vtype in (_FLOAT32, _FLOAT64):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return f"{value:f}"
    return str(value)
