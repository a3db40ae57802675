"""Push: a stored model, or an artifact `dmr package --push` just built, to an OCI registry."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dmr_cli.distribution.pull import (
    LayerProgress,
    Progress,
    event,
    parse_pull_reference,
    registry_client,
)
from dmr_cli.errors import InvalidReference, StoreError
from dmr_cli.reference import Reference
from dmr_cli.store import Store


def push(
    store: Store,
    value: str,
    *,
    progress: Progress,
    bearer_token: str | None = None,
) -> None:
    """Push a stored model to the registry its reference names."""
    model = store.get(value)
    ref = parse_pull_reference(value)
    blobs: list[tuple[str, Path | bytes, int]] = [
        (layer["digest"], store.blob_path(layer["digest"]), int(layer["size"]))
        for layer in model.layers
    ]
    config_digest = model.config_digest
    config_bytes = store.blob_path(config_digest).read_bytes()
    blobs.append((config_digest, config_bytes, len(config_bytes)))
    _push_blobs(ref, blobs, store.manifest_bytes(model.id), progress, bearer_token)


def push_artifact(
    artifact: Any, target: str, progress: Progress, bearer_token: str | None = None
) -> None:
    """Push an artifact built by `dmr package` straight to a registry (no daemon involved)."""
    ref = parse_pull_reference(target)
    blobs: list[tuple[str, Path | bytes, int]] = [
        (layer.digest, layer.path if layer.data is None else layer.data, layer.size)
        for layer in artifact.layers
    ]
    blobs.append((artifact.config_digest, artifact.config, len(artifact.config)))
    _push_blobs(ref, blobs, artifact.manifest, progress, bearer_token)


def _push_blobs(
    ref: Reference,
    blobs: Sequence[tuple[str, Path | bytes, int]],
    manifest: bytes,
    progress: Progress,
    bearer_token: str | None,
) -> None:
    if ref.is_huggingface:
        raise InvalidReference("pushing to Hugging Face is not supported; push to an OCI registry")
    client = registry_client(bearer_token)
    total = sum(size for _, _, size in blobs)
    try:
        for digest, source, size in blobs:
            if isinstance(source, Path) and not source.is_file():
                raise StoreError(f"blob {digest} is missing from the store")
            report = LayerProgress(
                progress, mode="push", verb="Uploaded", total=total, digest=digest, size=size
            )
            client.upload_blob(ref, digest, source, size, report)
            report.start_at(size - 1)
            report(1)
        media_type = json.loads(manifest).get(
            "mediaType", "application/vnd.oci.image.manifest.v1+json"
        )
        client.put_manifest(ref, manifest, media_type)
    finally:
        client.close()
    progress(event("success", "Model pushed successfully", mode="push"))
