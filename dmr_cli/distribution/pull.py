"""Pull orchestration: registry client + store, with DMR's progress events (spec §2.4, §6).

Everything here is synchronous and runs in worker threads; `progress` may be called from
several threads at once and must be thread-safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from dmr_cli import config
from dmr_cli.errors import Cancelled, InvalidReference
from dmr_cli.reference import Reference, is_model_id, normalize_model_name, parse_reference
from dmr_cli.store import Model, Store

Progress = Callable[[dict[str, Any]], None]
MiB = 1024 * 1024


@dataclass
class PullResult:
    model_id: str
    message: str
    cached: bool


def event(
    kind: str,
    message: str,
    *,
    mode: str,
    total: int = 0,
    layer_id: str | None = None,
    size: int = 0,
    current: int = 0,
) -> dict[str, Any]:
    layer: dict[str, Any] = {"size": size, "current": current}
    if layer_id:
        layer = {"id": layer_id, **layer}
    return {"type": kind, "message": message, "total": total, "layer": layer, "mode": mode}


class LayerProgress:
    """DMR's per-layer throttle: report after 100 ms, 1 MiB more, or completion."""

    def __init__(
        self, progress: Progress, *, mode: str, verb: str, total: int, digest: str, size: int
    ) -> None:
        self._progress, self._mode, self._verb = progress, mode, verb
        self._total, self._digest, self._size = total, digest, size
        self._current = 0
        self._reported = -1
        self._last = 0.0
        self._lock = threading.Lock()

    def start_at(self, offset: int) -> None:
        self._current = offset

    def __call__(self, n: int) -> None:
        with self._lock:
            self._current += n
            now = time.monotonic()
            done = self._current >= self._size
            if not (done or now - self._last >= 0.1 or self._current - self._reported >= MiB):
                return
            if done and self._reported >= self._size:
                return
            self._last, self._reported = now, self._current
            current = self._current
        self._progress(
            event(
                "progress",
                f"{self._verb}: {current / MiB:.2f} MB",
                mode=self._mode,
                total=self._total,
                layer_id=self._digest,
                size=self._size,
                current=current,
            )
        )


def registry_client(bearer_token: str | None) -> Any:
    from dmr_cli.distribution.registry import RegistryClient

    return RegistryClient(
        bearer_token=bearer_token, insecure_registries=config.insecure_registries()
    )


def parse_pull_reference(value: str) -> Reference:
    name = normalize_model_name(value)
    if not name:
        raise InvalidReference("model reference is required")
    if is_model_id(name):
        raise InvalidReference(
            f"cannot pull {value!r}: it is a model ID; pull by name, e.g. ai/smollm2"
        )
    return parse_reference(name)


def pull(
    store: Store,
    value: str,
    *,
    progress: Progress,
    bearer_token: str | None = None,
    cancel: threading.Event | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> PullResult:
    """ON_BYTES(n) is told the bytes each blob download received over the network."""
    ref = parse_pull_reference(value)
    store.ensure_layout()
    if ref.is_huggingface:
        return _pull_huggingface(store, ref, progress, bearer_token, cancel)
    from dmr_cli.distribution.artifact import check_config_media_type

    client = registry_client(bearer_token)
    try:
        digest, raw, _ = client.get_manifest(ref)
        manifest = json.loads(raw)
        check_config_media_type(manifest["config"]["mediaType"])
        tag = ref.tag_string
        if store.find(digest) is not None:
            store.write_model(raw, [tag])
            return _cached(store.get(digest), progress)
        layers: list[dict[str, Any]] = manifest.get("layers") or []
        config_digest = manifest["config"]["digest"]
        with store.pinned([config_digest, *(layer["digest"] for layer in layers)]):
            if not store.has_blob(config_digest):
                config_blob = client.get_blob(ref, config_digest)
                store.write_blob_bytes(config_blob, config_digest)
                if on_bytes is not None:
                    on_bytes(len(config_blob))
            _warn_if_no_format(store, config_digest, progress)
            _download_layers(store, client, ref, layers, progress, cancel, on_bytes)
            model_id = store.write_model(raw, [tag])
    finally:
        client.close()
    message = "Model pulled successfully"
    progress(event("success", message, mode="pull"))
    return PullResult(model_id=model_id, message=message, cached=False)


def _cached(model: Model, progress: Progress) -> PullResult:
    message = f"Using cached model: {model.config.get('size', '')}".rstrip(": ")
    progress(event("success", message, mode="pull"))
    return PullResult(model_id=model.id, message=message, cached=True)


def _warn_if_no_format(store: Store, config_digest: str, progress: Progress) -> None:
    with contextlib.suppress(ValueError, OSError):
        inner = json.loads(store.blob_path(config_digest).read_bytes()).get("config") or {}
        if not inner.get("format"):
            progress(event("warning", "model config has no format", mode="pull"))


def _download_layers(
    store: Store,
    client: Any,
    ref: Reference,
    layers: Sequence[dict[str, Any]],
    progress: Progress,
    cancel: threading.Event | None,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    total = sum(int(layer["size"]) for layer in layers)

    def fetch(layer: dict[str, Any]) -> None:
        digest, size = layer["digest"], int(layer["size"])
        report = LayerProgress(
            progress, mode="pull", verb="Downloaded", total=total, digest=digest, size=size
        )
        with store.blob_lock(digest):
            if cancel is not None and cancel.is_set():
                raise Cancelled("pull cancelled; run it again to resume")
            if not store.has_blob(digest):
                final = store.blob_path(digest)
                final.parent.mkdir(parents=True, exist_ok=True)
                received = client.download_blob(
                    ref, digest, size, store.incomplete_path(digest), final, report, cancel
                )
                if on_bytes is not None:
                    on_bytes(received)
        report.start_at(size - 1)
        report(1)  # reports completion once, also for blobs already present

    # One thread per layer, as DMR; each large layer fans out into ranged chunks itself.
    with ThreadPoolExecutor(max_workers=max(1, min(len(layers), 8))) as pool:
        futures = [pool.submit(fetch, layer) for layer in layers]
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


def _pull_huggingface(
    store: Store,
    ref: Reference,
    progress: Progress,
    token: str | None,
    cancel: threading.Event | None,
) -> PullResult:
    from dmr_cli.distribution.artifact import build_gguf_artifact
    from dmr_cli.distribution.huggingface import pull_huggingface

    existing = store.find(ref.tag_string)
    if existing is not None:
        return _cached(existing, progress)
    # A staging folder per reference, kept on failure, so a retried pull resumes its files.
    key = hashlib.sha256(ref.tag_string.encode()).hexdigest()[:16]
    staging = store.root / "tmp" / f"hf-{key}"
    staging.mkdir(parents=True, exist_ok=True)
    result = pull_huggingface(ref, staging, token=token, progress=progress, cancel=cancel)
    progress(event("progress", "Building model artifact...", mode="pull"))
    artifact = build_gguf_artifact(
        result.weights[0],
        licenses=result.licenses,
        chat_template=result.chat_template,
        mmproj=result.mmproj,
        created=result.last_modified,
    )
    model_id = store_artifact(store, artifact, [ref.tag_string])
    shutil.rmtree(staging, ignore_errors=True)
    message = "Model pulled successfully"
    progress(event("success", message, mode="pull"))
    return PullResult(model_id=model_id, message=message, cached=False)


def store_artifact(store: Store, artifact: Any, tags: Sequence[str]) -> str:
    """Move a locally built artifact's files into the store (same filesystem: no copy)."""
    store.ensure_layout()
    with store.pinned([artifact.config_digest, *(layer.digest for layer in artifact.layers)]):
        store.write_blob_bytes(artifact.config, artifact.config_digest)
        for layer in artifact.layers:
            if store.has_blob(layer.digest):
                continue
            if layer.data is not None:
                store.write_blob_bytes(layer.data, layer.digest)
                continue
            final = store.blob_path(layer.digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(layer.path, final)
            except OSError:
                shutil.copyfile(layer.path, store.incomplete_path(layer.digest))
                os.replace(store.incomplete_path(layer.digest), final)
        return store.write_model(artifact.manifest, tags)
