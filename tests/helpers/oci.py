"""Hand-built OCI model artifacts for tests, independent of dmr's own packaging code."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import httpx

GGUF_LAYER = "application/vnd.docker.ai.gguf.v3"
CONFIG_V01 = "application/vnd.docker.ai.model.config.v0.1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class HandArtifact:
    manifest: bytes
    config: bytes
    layers: list[bytes]

    @property
    def id(self) -> str:
        return digest_of(self.manifest)


def hand_artifact(
    layers: list[bytes],
    *,
    inner_config: dict[str, object] | None = None,
    config_media_type: str = CONFIG_V01,
    layer_media_type: str = GGUF_LAYER,
) -> HandArtifact:
    config = json.dumps(
        {
            "config": inner_config or {"format": "gguf", "architecture": "llama"},
            "descriptor": {"created": "2025-03-24T12:09:41Z"},
            "rootfs": {"type": "rootfs", "diff_ids": [digest_of(b) for b in layers]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": config_media_type,
                "digest": digest_of(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": layer_media_type, "digest": digest_of(b), "size": len(b)}
                for b in layers
            ],
        }
    ).encode()
    return HandArtifact(manifest=manifest, config=config, layers=layers)


def push_blob(client: httpx.Client, repo: str, blob: bytes) -> None:
    """A monolithic upload through the distribution API, independent of dmr's client."""
    start = client.post(f"/v2/{repo}/blobs/uploads/")
    assert start.status_code == 202, start.text
    location = start.headers["location"]
    separator = "&" if "?" in location else "?"
    put = client.put(
        f"{location}{separator}digest={digest_of(blob)}",
        content=blob,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert put.status_code == 201, put.text


def put_manifest(
    client: httpx.Client, repo: str, reference: str, manifest: bytes, media_type: str
) -> None:
    put = client.put(
        f"/v2/{repo}/manifests/{reference}", content=manifest, headers={"Content-Type": media_type}
    )
    assert put.status_code == 201, put.text


def push_hand_artifact(registry_url: str, repo: str, tag: str, art: HandArtifact) -> None:
    """A minimal pusher speaking the distribution API directly (monolithic uploads)."""
    with httpx.Client(base_url=registry_url, timeout=60) as client:
        for blob in [*art.layers, art.config]:
            push_blob(client, repo, blob)
        put_manifest(client, repo, tag, art.manifest, OCI_MANIFEST)
