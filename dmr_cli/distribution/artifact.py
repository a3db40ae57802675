"""Model artifacts: media types, packaging a GGUF, repackaging, and bundle placement.

The manifest and config are built as DMR's builder builds them (spec §4): an OCI image
manifest whose config has media type `application/vnd.docker.ai.model.config.v0.1+json`,
one layer per GGUF shard then licenses, projector and chat template, each annotated with
its file path and metadata. JSON is compact and written as Go's encoding/json writes it
(struct field order, sorted maps, `<>&` escaped), so the same inputs give the same ID.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dmr_cli.errors import BadRequest, UnsupportedMediaType

MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"

MEDIA_TYPE_CONFIG_V01 = "application/vnd.docker.ai.model.config.v0.1+json"
MEDIA_TYPE_CONFIG_V02 = "application/vnd.docker.ai.model.config.v0.2+json"
MEDIA_TYPE_GGUF = "application/vnd.docker.ai.gguf.v3"
MEDIA_TYPE_SAFETENSORS = "application/vnd.docker.ai.safetensors"
MEDIA_TYPE_DDUF = "application/vnd.docker.ai.dduf"
MEDIA_TYPE_LICENSE = "application/vnd.docker.ai.license"
MEDIA_TYPE_MMPROJ = "application/vnd.docker.ai.mmproj"
MEDIA_TYPE_CHAT_TEMPLATE = "application/vnd.docker.ai.chat.template.jinja"
MEDIA_TYPE_MODEL_FILE = "application/vnd.docker.ai.model.file"
MEDIA_TYPE_VLLM_CONFIG_TAR = "application/vnd.docker.ai.vllm.config.tar"
MEDIA_TYPE_DIR_TAR = "application/vnd.docker.ai.dir.tar"

MEDIA_TYPE_CNCF_MANIFEST = "application/vnd.cncf.model.manifest.v1+json"
MEDIA_TYPE_CNCF_CONFIG_V1 = "application/vnd.cncf.model.config.v1+json"
MEDIA_TYPE_CNCF_WEIGHT_GGUF = "application/vnd.cncf.model.weight.v1.gguf"
MEDIA_TYPE_CNCF_WEIGHT_SAFETENSORS = "application/vnd.cncf.model.weight.v1.safetensors"
MEDIA_TYPE_CNCF_WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
MEDIA_TYPE_CNCF_WEIGHT_CONFIG_RAW = "application/vnd.cncf.model.weight.config.v1.raw"
MEDIA_TYPE_CNCF_DOC_RAW = "application/vnd.cncf.model.doc.v1.raw"

SUPPORTED_CONFIG_MEDIA_TYPES = (
    MEDIA_TYPE_CONFIG_V01,
    MEDIA_TYPE_CONFIG_V02,
    MEDIA_TYPE_CNCF_CONFIG_V1,
)

ANNOTATION_FILEPATH = "org.cncf.model.filepath"
ANNOTATION_FILE_METADATA = "org.cncf.model.file.metadata+json"
ANNOTATION_MEDIATYPE_UNTESTED = "org.cncf.model.file.mediatype.untested"

MAX_CONTEXT_SIZE = 2**31 - 1  # DMR keeps context_size in an int32

# Go struct order of DMR's types.Config: the order its JSON fields come out in.
_CONFIG_FIELDS = (
    "format", "quantization", "parameters", "architecture", "size",
    "gguf", "safetensors", "diffusers", "context_size",
)  # fmt: skip
_CHUNK = 1 << 20


@dataclass
class Layer:
    """One layer: its descriptor fields and where its bytes are (a file or memory)."""

    media_type: str
    digest: str
    size: int
    path: Path | None = None
    data: bytes | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    def descriptor(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "size": self.size,
            "digest": self.digest,
        }
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        return out


@dataclass
class Artifact:
    manifest: bytes
    config: bytes
    layers: list[Layer]

    @property
    def id(self) -> str:
        return _sha256(self.manifest)

    @property
    def config_digest(self) -> str:
        return _sha256(self.config)

    def blobs(self) -> list[tuple[str, Path | bytes]]:
        """Layers then config, as `write_model_tar` and a store want them."""
        out: list[tuple[str, Path | bytes]] = []
        for layer in self.layers:
            source = layer.data if layer.data is not None else layer.path
            if source is None:
                raise ValueError(f"layer {layer.digest} has neither a path nor data")
            out.append((layer.digest, source))
        out.append((self.config_digest, self.config))
        return out


def build_gguf_artifact(
    gguf: Path,
    *,
    licenses: Sequence[Path] = (),
    chat_template: Path | None = None,
    mmproj: Path | None = None,
    context_size: int | None = None,
    created: datetime | None = None,
) -> Artifact:
    """Package a GGUF file (the first shard of a split model finds the others)."""
    from dmr_cli.distribution.gguf_meta import read_gguf_config, shard_paths

    shards = shard_paths(gguf)
    missing = [p.name for p in shards if p.name != gguf.name and not p.exists()]
    if missing:
        raise BadRequest(
            f"shard {missing[0]} of {gguf.name} is missing",
            hint=f"all {len(shards)} shards must sit next to the first one",
        )
    layers = [file_layer(p, MEDIA_TYPE_GGUF) for p in shards]
    layers += [file_layer(p, MEDIA_TYPE_LICENSE) for p in licenses]
    if mmproj is not None:
        layers.append(file_layer(mmproj, MEDIA_TYPE_MMPROJ))
    if chat_template is not None:
        layers.append(file_layer(chat_template, MEDIA_TYPE_CHAT_TEMPLATE))
    inner = read_gguf_config(shards[0])
    if context_size is not None:
        inner["context_size"] = _check_context_size(context_size)
    config = go_json(
        {
            "config": _ordered_config(inner),
            "descriptor": {"created": rfc3339(created or datetime.now(timezone.utc))},
            "rootfs": {"type": "rootfs", "diff_ids": [layer.digest for layer in layers]},
        }
    )
    return Artifact(manifest=_manifest(config, layers), config=config, layers=layers)


def file_layer(path: Path, media_type: str) -> Layer:
    """A layer for a file: its digest (read streaming) and DMR's file annotations."""
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            hasher = hashlib.sha256()
            while chunk := f.read(_CHUNK):
                hasher.update(chunk)
    except FileNotFoundError as exc:
        raise BadRequest(f"file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise BadRequest(f"{path} is a directory, not a file") from exc
    except OSError as exc:
        raise BadRequest(f"cannot read {path}: {exc.strerror or exc}") from exc
    metadata = {
        "name": path.name,
        "mode": info.st_mode & 0o777,
        "uid": 0,
        "gid": 0,
        "size": info.st_size,
        "mtime": rfc3339(datetime.fromtimestamp(info.st_mtime, timezone.utc)),
        "typeflag": 0,
    }
    return Layer(
        media_type=media_type,
        digest="sha256:" + hasher.hexdigest(),
        size=info.st_size,
        path=path,
        annotations={
            ANNOTATION_FILEPATH: path.name,
            ANNOTATION_FILE_METADATA: go_json(metadata).decode(),
            ANNOTATION_MEDIATYPE_UNTESTED: "false",
        },
    )


def with_context_size(manifest: bytes, config: bytes, context_size: int) -> tuple[bytes, bytes]:
    """Repackage: a new config with `context_size` and a manifest pointing at it (same layers)."""
    raw = _load_object(config, "model config")
    if is_modelpack_config(raw):
        raise BadRequest(
            "context size is not supported for CNCF ModelPack models: "
            "the ModelPack specification does not define a context size field"
        )
    inner = dict(raw.get("config") or {})
    inner["context_size"] = _check_context_size(context_size)
    raw["config"] = _ordered_config(inner)
    new_config = go_json(raw)
    parsed = _load_object(manifest, "manifest")
    try:
        descriptor = dict(parsed["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest("invalid manifest: it has no config descriptor") from exc
    descriptor.update(size=len(new_config), digest=_sha256(new_config))
    parsed["config"] = descriptor
    return go_json(parsed), new_config


def check_config_media_type(media_type: str) -> None:
    """Refuse a config this version cannot read, with DMR's text (answered with 422)."""
    if media_type not in SUPPORTED_CONFIG_MEDIA_TYPES:
        supported = ", ".join(_go_quote(m) for m in SUPPORTED_CONFIG_MEDIA_TYPES)
        raise UnsupportedMediaType(
            f"config type {_go_quote(media_type)} is not supported (supported: {supported})"
            " - try upgrading: unsupported model config media type",
            hint="upgrade dmr to run models packaged in this newer format",
        )


def parse_config(config_bytes: bytes) -> dict[str, Any]:
    """The inner Docker-format config; a CNCF ModelPack config is converted (spec §2.3)."""
    return inner_config(_load_object(config_bytes, "model config"))


def inner_config(raw: dict[str, Any]) -> dict[str, Any]:
    """`parse_config` for an already-decoded config blob."""
    if is_modelpack_config(raw):
        pack = raw.get("config")
        pack = pack if isinstance(pack, dict) else {}
        converted = {
            "format": str(pack.get("format") or "").lower(),
            "quantization": pack.get("quantization") or "",
            "parameters": pack.get("paramSize") or "",
            "architecture": pack.get("architecture") or "",
            # DMR reports ModelPack's paramSize as the size too (modelpack.Model.GetSize).
            "size": pack.get("paramSize") or "",
        }
        return {k: v for k, v in converted.items() if v}
    inner = raw.get("config")
    return dict(inner) if isinstance(inner, dict) else {}


def is_modelpack_config(raw: dict[str, Any]) -> bool:
    """DMR's IsModelPackConfig: `config.paramSize`, `descriptor.createdAt` or `modelfs`."""
    inner, descriptor = raw.get("config"), raw.get("descriptor")
    return (
        (isinstance(inner, dict) and "paramSize" in inner)
        or (isinstance(descriptor, dict) and "createdAt" in descriptor)
        or "modelfs" in raw
    )


def model_files(manifest: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """Where each layer goes in a bundle: (layer descriptor, path relative to the bundle).

    v0.1 configs place files by media type (`model/model.gguf`, shards as
    `model/model-0000i-of-0000N.gguf`, `model/model.mmproj`, `model/template.jinja`);
    licenses and tar layers get no file. v0.2 and CNCF configs place every layer at its
    `org.cncf.model.filepath` annotation under `model/`.
    """
    layers: list[dict[str, Any]] = list(manifest.get("layers") or [])
    config_type = (manifest.get("config") or {}).get("mediaType")
    if config_type in (MEDIA_TYPE_CONFIG_V02, MEDIA_TYPE_CNCF_CONFIG_V1):
        annotated = [
            layer for layer in layers if (layer.get("annotations") or {}).get(ANNOTATION_FILEPATH)
        ]
        placed = [(layer, "model/" + _safe_relative_path(layer)) for layer in annotated]
        placed += _by_media_type([layer for layer in layers if layer not in annotated])
    else:
        placed = _by_media_type(layers)
    seen: set[str] = set()
    for _, rel in placed:
        if rel in seen:
            raise BadRequest(f"invalid model: two layers are both placed at {rel!r}")
        seen.add(rel)
    return placed


def _by_media_type(layers: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """DMR's v0.1 bundle rules (internal/bundle/unpack.go)."""

    def of_type(*media_types: str) -> list[dict[str, Any]]:
        return [layer for layer in layers if layer.get("mediaType") in media_types]

    placed: list[tuple[dict[str, Any], str]] = []
    weights = (
        ("gguf", of_type(MEDIA_TYPE_GGUF, MEDIA_TYPE_CNCF_WEIGHT_GGUF)),
        ("safetensors", of_type(MEDIA_TYPE_SAFETENSORS, MEDIA_TYPE_CNCF_WEIGHT_SAFETENSORS)),
    )
    for extension, found in weights:
        if len(found) == 1:
            placed.append((found[0], f"model/model.{extension}"))
        else:
            total = len(found)
            placed += [
                (layer, f"model/model-{i:05d}-of-{total:05d}.{extension}")
                for i, layer in enumerate(found, 1)
            ]
        if found:  # one weights format per bundle, GGUF first
            break
    else:
        dduf = of_type(MEDIA_TYPE_DDUF)
        if dduf:
            name = posixpath.basename(_safe_relative_path(dduf[0], required=False))
            placed.append((dduf[0], f"model/{name or 'model.dduf'}"))
    # DMR unpacks a projector or template only when there is exactly one.
    extras = ((MEDIA_TYPE_MMPROJ, "model.mmproj"), (MEDIA_TYPE_CHAT_TEMPLATE, "template.jinja"))
    for media_type, name in extras:
        found = of_type(media_type)
        if len(found) == 1:
            placed.append((found[0], f"model/{name}"))
    return placed


def _safe_relative_path(layer: dict[str, Any], *, required: bool = True) -> str:
    """The layer's file-path annotation, refused if it could leave the bundle."""
    raw = (layer.get("annotations") or {}).get(ANNOTATION_FILEPATH) or ""
    if not raw and not required:
        return ""
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if not raw or raw.startswith("/") or "\\" in raw or "\x00" in raw or ".." in parts or not parts:
        raise BadRequest(
            f"invalid file path {raw!r} in model layer {layer.get('digest')}: "
            "it must be a relative path inside the model"
        )
    return "/".join(parts)


def _manifest(config: bytes, layers: Sequence[Layer]) -> bytes:
    return go_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_MANIFEST,
            "config": {
                "mediaType": MEDIA_TYPE_CONFIG_V01,
                "size": len(config),
                "digest": _sha256(config),
            },
            "layers": [layer.descriptor() for layer in layers],
        }
    )


def _ordered_config(inner: dict[str, Any]) -> dict[str, Any]:
    """Known fields in DMR's order, maps sorted, unknown fields kept after them."""
    out = {k: inner[k] for k in _CONFIG_FIELDS if k in inner}
    out.update((k, v) for k, v in inner.items() if k not in out)
    for key in ("gguf", "safetensors", "diffusers"):
        if isinstance(out.get(key), dict):
            out[key] = dict(sorted(out[key].items()))
    return out


def _check_context_size(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_CONTEXT_SIZE:
        raise BadRequest(f"invalid context size {value!r}: expected 1 to {MAX_CONTEXT_SIZE} tokens")
    return value


def go_json(value: Any) -> bytes:
    """Compact JSON as Go's encoding/json writes it: UTF-8, `<`, `>`, `&` escaped."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for char, escape in (
        ("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
        ("\u2028", "\\u2028"), ("\u2029", "\\u2029"),
    ):  # fmt: skip
        text = text.replace(char, escape)
    return text.encode()


def rfc3339(moment: datetime) -> str:
    """Go's time.RFC3339Nano in UTC: fractional seconds without trailing zeros."""
    utc = moment.astimezone(timezone.utc)
    fraction = f"{utc.microsecond:06d}".rstrip("0")
    return utc.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"


def _go_quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _load_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"invalid {what}: {exc}") from exc
    if not isinstance(value, dict):
        raise BadRequest(f"invalid {what}: expected a JSON object")
    return value


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
