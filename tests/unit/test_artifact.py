from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from dmr_cli.distribution.artifact import (
    MEDIA_TYPE_CHAT_TEMPLATE,
    MEDIA_TYPE_CNCF_CONFIG_V1,
    MEDIA_TYPE_CNCF_WEIGHT_GGUF,
    MEDIA_TYPE_CONFIG_V01,
    MEDIA_TYPE_CONFIG_V02,
    MEDIA_TYPE_GGUF,
    MEDIA_TYPE_LICENSE,
    MEDIA_TYPE_MMPROJ,
    MEDIA_TYPE_OCI_MANIFEST,
    MEDIA_TYPE_SAFETENSORS,
    SUPPORTED_CONFIG_MEDIA_TYPES,
    build_gguf_artifact,
    check_config_media_type,
    model_files,
    parse_config,
    with_context_size,
)
from dmr_cli.distribution.gguf_meta import read_gguf_config
from dmr_cli.errors import BadRequest, UnsupportedMediaType
from tests.helpers.gguf_factory import make_sharded, make_tiny_llama

CREATED = datetime(2025, 3, 24, 12, 9, 41, tzinfo=timezone.utc)


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Any]:
    return {
        "shards": make_sharded(tmp_path / "tiny", 3),
        "licenses": [write(tmp_path / "LICENSE", "MIT"), write(tmp_path / "NOTICE", "notice")],
        "mmproj": write(tmp_path / "proj.gguf", "projector bytes"),
        "template": write(tmp_path / "chat.jinja", "{{ messages }}"),
    }


def test_same_inputs_give_the_same_artifact(tmp_path: Path) -> None:
    gguf_path = make_tiny_llama(tmp_path / "tiny.gguf")
    first = build_gguf_artifact(gguf_path, created=CREATED)
    second = build_gguf_artifact(gguf_path, created=CREATED)
    assert first.manifest == second.manifest
    assert first.config == second.config
    assert first.id == second.id == "sha256:" + hashlib.sha256(first.manifest).hexdigest()
    assert first.config_digest == "sha256:" + hashlib.sha256(first.config).hexdigest()
    later = build_gguf_artifact(gguf_path, created=CREATED + timedelta(seconds=1))
    assert later.id != first.id


def test_manifest_layers_and_annotations(files: dict[str, Any]) -> None:
    shards: list[Path] = files["shards"]
    artifact = build_gguf_artifact(
        shards[0],
        licenses=files["licenses"],
        mmproj=files["mmproj"],
        chat_template=files["template"],
        created=CREATED,
    )
    manifest = json.loads(artifact.manifest)
    assert list(manifest) == ["schemaVersion", "mediaType", "config", "layers"]
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == MEDIA_TYPE_OCI_MANIFEST
    assert manifest["config"] == {
        "mediaType": MEDIA_TYPE_CONFIG_V01,
        "size": len(artifact.config),
        "digest": artifact.config_digest,
    }
    expected = [
        *((MEDIA_TYPE_GGUF, p) for p in shards),
        *((MEDIA_TYPE_LICENSE, p) for p in files["licenses"]),
        (MEDIA_TYPE_MMPROJ, files["mmproj"]),
        (MEDIA_TYPE_CHAT_TEMPLATE, files["template"]),
    ]
    layers = manifest["layers"]
    assert [(layer["mediaType"], layer["digest"], layer["size"]) for layer in layers] == [
        (media_type, sha256_file(p), p.stat().st_size) for media_type, p in expected
    ]
    for layer, (_, path) in zip(layers, expected, strict=True):
        annotations = layer["annotations"]
        assert list(annotations) == sorted(annotations)
        assert annotations["org.cncf.model.filepath"] == path.name
        assert annotations["org.cncf.model.file.mediatype.untested"] == "false"
        metadata = json.loads(annotations["org.cncf.model.file.metadata+json"])
        assert list(metadata) == ["name", "mode", "uid", "gid", "size", "mtime", "typeflag"]
        assert metadata["name"] == path.name
        assert metadata["mode"] == path.stat().st_mode & 0o777
        assert metadata["size"] == path.stat().st_size
        assert (metadata["uid"], metadata["gid"], metadata["typeflag"]) == (0, 0, 0)
        # Go's RFC3339Nano in UTC: fractional digits only when non-zero.
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d*[1-9])?Z", metadata["mtime"])
        seconds = datetime.strptime(metadata["mtime"][:19], "%Y-%m-%dT%H:%M:%S")
        assert seconds.replace(tzinfo=timezone.utc).timestamp() == int(path.stat().st_mtime)
    # Layer objects carry what a tar or a store needs.
    assert [layer.path for layer in artifact.layers] == [p for _, p in expected]
    assert artifact.blobs() == [
        *((sha256_file(p), p) for _, p in expected),
        (artifact.config_digest, artifact.config),
    ]


def test_config_blob(files: dict[str, Any]) -> None:
    shards: list[Path] = files["shards"]
    artifact = build_gguf_artifact(shards[0], licenses=files["licenses"][:1], created=CREATED)
    config = json.loads(artifact.config)
    assert list(config) == ["config", "descriptor", "rootfs"]
    assert config["config"] == read_gguf_config(shards[0])
    assert config["descriptor"] == {"created": "2025-03-24T12:09:41Z"}
    assert config["rootfs"] == {
        "type": "rootfs",
        "diff_ids": [sha256_file(p) for p in [*shards, files["licenses"][0]]],
    }
    # Compact, as Go's encoding/json writes it: no spaces, `<` and `>` escaped.
    raw = artifact.config.decode()
    assert ": " not in raw and ", " not in raw.replace('", "', "")
    assert "<|im_start|>" not in raw
    assert "\\u003c|im_start|\\u003e" in raw
    assert config["config"]["gguf"]["tokenizer.chat_template"].startswith("{% for message")


def test_created_keeps_fractions_and_converts_to_utc(tmp_path: Path) -> None:
    gguf_path = make_tiny_llama(tmp_path / "tiny.gguf")
    moment = datetime(2025, 3, 24, 14, 9, 41, 120000, tzinfo=timezone(timedelta(hours=2)))
    config = json.loads(build_gguf_artifact(gguf_path, created=moment).config)
    assert config["descriptor"]["created"] == "2025-03-24T12:09:41.12Z"


def test_context_size_override(tmp_path: Path) -> None:
    gguf_path = make_tiny_llama(tmp_path / "tiny.gguf", context_length=256)
    artifact = build_gguf_artifact(gguf_path, context_size=8192, created=CREATED)
    inner = json.loads(artifact.config)["config"]
    assert inner["context_size"] == 8192
    assert list(inner)[-1] == "context_size"  # after gguf, as DMR's struct order has it
    for bad in (0, -1, 2**31):
        with pytest.raises(BadRequest, match="invalid context size"):
            build_gguf_artifact(gguf_path, context_size=bad)


def test_with_context_size_repackages(tmp_path: Path) -> None:
    gguf_path = make_tiny_llama(tmp_path / "tiny.gguf")
    license_path = write(tmp_path / "LICENSE", "MIT")
    original = build_gguf_artifact(gguf_path, licenses=[license_path], created=CREATED)
    manifest, config = with_context_size(original.manifest, original.config, 4096)

    new_config = json.loads(config)
    old_config = json.loads(original.config)
    assert new_config["config"]["context_size"] == 4096
    assert new_config["descriptor"] == old_config["descriptor"]
    assert new_config["rootfs"] == old_config["rootfs"]
    assert {k: v for k, v in new_config["config"].items() if k != "context_size"} == {
        k: v for k, v in old_config["config"].items() if k != "context_size"
    }

    new_manifest = json.loads(manifest)
    old_manifest = json.loads(original.manifest)
    assert new_manifest["layers"] == old_manifest["layers"]
    assert new_manifest["config"] == {
        "mediaType": MEDIA_TYPE_CONFIG_V01,
        "size": len(config),
        "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
    }
    assert manifest != original.manifest
    # Repackaging again with the same size is stable.
    assert with_context_size(manifest, config, 4096) == (manifest, config)

    with pytest.raises(BadRequest):
        with_context_size(original.manifest, original.config, 0)
    modelpack = json.dumps({"config": {"paramSize": "8b"}, "modelfs": {}}).encode()
    with pytest.raises(BadRequest, match="ModelPack"):
        with_context_size(original.manifest, modelpack, 4096)


def test_missing_files_are_reported(tmp_path: Path) -> None:
    shards = make_sharded(tmp_path / "tiny", 2)
    shards[1].unlink()
    with pytest.raises(BadRequest, match=re.escape("shard tiny-00002-of-00002.gguf of")):
        build_gguf_artifact(shards[0])
    with pytest.raises(BadRequest, match=re.escape("absent.gguf")):
        build_gguf_artifact(tmp_path / "absent.gguf")
    with pytest.raises(BadRequest, match="NOLICENSE"):
        build_gguf_artifact(make_tiny_llama(tmp_path / "t.gguf"), licenses=[tmp_path / "NOLICENSE"])


def test_config_media_type_check() -> None:
    for media_type in SUPPORTED_CONFIG_MEDIA_TYPES:
        check_config_media_type(media_type)
    with pytest.raises(UnsupportedMediaType) as info:
        check_config_media_type("application/vnd.docker.ai.model.config.v9+json")
    assert info.value.status == 422
    assert str(info.value) == (
        'config type "application/vnd.docker.ai.model.config.v9+json" is not supported '
        '(supported: "application/vnd.docker.ai.model.config.v0.1+json", '
        '"application/vnd.docker.ai.model.config.v0.2+json", '
        '"application/vnd.cncf.model.config.v1+json") '
        "- try upgrading: unsupported model config media type"
    )


def test_parse_config(tmp_path: Path) -> None:
    artifact = build_gguf_artifact(make_tiny_llama(tmp_path / "t.gguf"), created=CREATED)
    assert parse_config(artifact.config) == json.loads(artifact.config)["config"]

    modelpack = {
        "descriptor": {"createdAt": "2025-01-01T00:00:00Z", "family": "llama"},
        "modelfs": {"type": "layers", "diffIds": []},
        "config": {"architecture": "llama", "format": "GGUF", "paramSize": "8b"},
    }
    assert parse_config(json.dumps(modelpack).encode()) == {
        "format": "gguf",
        "parameters": "8b",
        "architecture": "llama",
        "size": "8b",
    }
    for bad in (b"not json", b"[1, 2]"):
        with pytest.raises(BadRequest, match="invalid model config"):
            parse_config(bad)


def descriptor(media_type: str, n: int, filepath: str | None = None) -> dict[str, Any]:
    layer: dict[str, Any] = {"mediaType": media_type, "size": n, "digest": f"sha256:{n:064x}"}
    if filepath is not None:
        layer["annotations"] = {"org.cncf.model.filepath": filepath}
    return layer


def manifest_of(config_type: str, *layers: dict[str, Any]) -> dict[str, Any]:
    return {"config": {"mediaType": config_type}, "layers": list(layers)}


def placements(manifest: dict[str, Any]) -> list[tuple[int, str]]:
    return [(layer["size"], rel) for layer, rel in model_files(manifest)]


def test_bundle_placement_v01(tmp_path: Path) -> None:
    single = manifest_of(
        MEDIA_TYPE_CONFIG_V01,
        descriptor(MEDIA_TYPE_GGUF, 1, "weights.gguf"),
        descriptor(MEDIA_TYPE_LICENSE, 2, "LICENSE"),
        descriptor(MEDIA_TYPE_MMPROJ, 3, "proj.gguf"),
        descriptor(MEDIA_TYPE_CHAT_TEMPLATE, 4, "t.jinja"),
    )
    assert placements(single) == [
        (1, "model/model.gguf"),
        (3, "model/model.mmproj"),
        (4, "model/template.jinja"),
    ]
    sharded = manifest_of(
        MEDIA_TYPE_CONFIG_V01,
        *(descriptor(MEDIA_TYPE_GGUF, n) for n in (1, 2, 3)),
        descriptor(MEDIA_TYPE_SAFETENSORS, 9),  # GGUF wins: one weights format per bundle
        descriptor(MEDIA_TYPE_CHAT_TEMPLATE, 4),
        descriptor(MEDIA_TYPE_CHAT_TEMPLATE, 5),  # two templates: DMR unpacks neither
    )
    assert placements(sharded) == [
        (1, "model/model-00001-of-00003.gguf"),
        (2, "model/model-00002-of-00003.gguf"),
        (3, "model/model-00003-of-00003.gguf"),
    ]
    cncf_weights = manifest_of(MEDIA_TYPE_CONFIG_V01, descriptor(MEDIA_TYPE_CNCF_WEIGHT_GGUF, 7))
    assert placements(cncf_weights) == [(7, "model/model.gguf")]


def test_built_artifact_places_its_shards(files: dict[str, Any]) -> None:
    artifact = build_gguf_artifact(
        files["shards"][0], licenses=files["licenses"], chat_template=files["template"]
    )
    rels = [rel for _, rel in model_files(json.loads(artifact.manifest))]
    assert rels == [
        "model/model-00001-of-00003.gguf",
        "model/model-00002-of-00003.gguf",
        "model/model-00003-of-00003.gguf",
        "model/template.jinja",
    ]


@pytest.mark.parametrize("config_type", [MEDIA_TYPE_CONFIG_V02, MEDIA_TYPE_CNCF_CONFIG_V1])
def test_bundle_placement_by_file_path(config_type: str) -> None:
    manifest = manifest_of(
        config_type,
        descriptor(MEDIA_TYPE_SAFETENSORS, 1, "model-00001-of-00002.safetensors"),
        descriptor(MEDIA_TYPE_SAFETENSORS, 2, "./model-00002-of-00002.safetensors"),
        descriptor(MEDIA_TYPE_LICENSE, 3, "docs/LICENSE"),
        descriptor(MEDIA_TYPE_GGUF, 4),  # no annotation: placed by media type
    )
    assert placements(manifest) == [
        (1, "model/model-00001-of-00002.safetensors"),
        (2, "model/model-00002-of-00002.safetensors"),
        (3, "model/docs/LICENSE"),
        (4, "model/model.gguf"),
    ]


@pytest.mark.parametrize(
    "filepath", ["../escape", "a/../../b", "/etc/passwd", "a\\..\\b", "..", "./"]
)
def test_bundle_rejects_unsafe_paths(filepath: str) -> None:
    manifest = manifest_of(MEDIA_TYPE_CONFIG_V02, descriptor(MEDIA_TYPE_SAFETENSORS, 1, filepath))
    with pytest.raises(BadRequest, match="invalid file path"):
        model_files(manifest)


def test_bundle_rejects_collisions() -> None:
    manifest = manifest_of(
        MEDIA_TYPE_CONFIG_V02,
        descriptor(MEDIA_TYPE_SAFETENSORS, 1, "a/x.json"),
        descriptor(MEDIA_TYPE_SAFETENSORS, 2, "a//x.json"),
    )
    with pytest.raises(BadRequest, match=re.escape("model/a/x.json")):
        model_files(manifest)


def test_file_layer_mode_comes_from_the_file(tmp_path: Path) -> None:
    gguf_path = make_tiny_llama(tmp_path / "t.gguf")
    os.chmod(gguf_path, 0o600)
    layer = json.loads(build_gguf_artifact(gguf_path, created=CREATED).manifest)["layers"][0]
    metadata = json.loads(layer["annotations"]["org.cncf.model.file.metadata+json"])
    assert metadata["mode"] == 0o600
