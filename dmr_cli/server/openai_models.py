"""The OpenAI model list: GET `/engines[/{backend}]/v1/models[/{ref...}]` and the `/v1/models`
alias (spec §2.3).

Clients and gateways poll the list as a health check (Olla does), so it answers 200 with
whatever the store holds, an empty list included.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dmr_cli.server.http import text_error
from dmr_cli.server.scheduler import BACKENDS
from dmr_cli.store import Model


def context_window(config: dict[str, Any]) -> int | None:
    """The configured context size, else the GGUF `<arch>.context_length`."""
    size = config.get("context_size")
    if isinstance(size, int) and size > 0:
        return size
    gguf = config.get("gguf") or {}
    arch = config.get("architecture") or gguf.get("general.architecture") or ""
    with contextlib.suppress(TypeError, ValueError):
        value = int(str(gguf.get(f"{arch}.context_length", "")).strip())
        if value > 0:
            return value
    return None


def to_openai(model: Model) -> dict[str, Any]:
    """DMR's OpenAIModel: `id` is the first tag (the ID when untagged); the `dmr` object
    is left out without a config and each of its fields when empty."""
    out: dict[str, Any] = {
        "id": model.tags[0] if model.tags else model.id,
        "object": "model",
        "created": model.created,
        "owned_by": "docker",
    }
    config = model.config
    if config:
        dmr: dict[str, Any] = {"context_window": context_window(config)}
        for key in ("architecture", "parameters", "quantization", "size"):
            dmr[key] = config.get(key)
        out["dmr"] = {k: v for k, v in dmr.items() if v}
    return out


def _backend_error(request: Request) -> Response | None:
    backend = request.path_params.get("backend")
    if backend is not None and backend not in BACKENDS:
        return text_error(404, "backend not found")
    return None


async def list_models(request: Request) -> Response:
    """GET `/engines[/{backend}]/v1/models`, `/v1/models`."""
    error = _backend_error(request)
    if error is not None:
        return error
    store = request.app.state.dmr.store
    models = await asyncio.to_thread(store.models)
    return JSONResponse({"object": "list", "data": [to_openai(m) for m in models]})


async def get_model(request: Request) -> Response:
    """GET `/engines[/{backend}]/v1/models/{ref...}`, `/v1/models/{ref...}`: exact lookup
    (no partial-name match); a missing model raises ModelNotFound (404 as text)."""
    error = _backend_error(request)
    if error is not None:
        return error
    store = request.app.state.dmr.store
    model = await asyncio.to_thread(store.get, request.path_params["ref"])
    return JSONResponse(to_openai(model))
