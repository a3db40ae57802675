"""`/engines/*` administration routes: status, ps, unload, configure (spec §2.7).

Inference on `/engines/*` is served by `server/inference.py`, ahead of the router."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from dmr_cli.errors import BadRequest, DmrError
from dmr_cli.server.http import json_response, read_json, text_error
from dmr_cli.server.scheduler import BACKENDS, DEFAULT_BACKEND
from dmr_cli.server.state import State


async def status(request: Request) -> Response:
    state: State = request.app.state.dmr
    return json_response(await asyncio.to_thread(backend_status, state))


def backend_status(state: State) -> dict[str, str]:
    from dmr_cli.runtime import install

    try:
        binary = install.discover(state.scheduler.detection)
    except DmrError as exc:
        llama = f"Not Installed: {exc.message}"
    else:
        if binary.kind == "embedded":
            llama = (
                f"Running: embedded llama-cpp-python {binary.version} (serves one request at "
                "a time; install a native runner for concurrency: dmr install-runner)"
            )
        else:
            commit = f" {binary.commit}" if binary.commit else ""
            accelerator = state.scheduler.detection.accelerator
            llama = (
                f"Running: llama.cpp {binary.version}-{binary.variant} "
                f"(accelerator: {accelerator}){commit}"
            )
    return {
        "llama.cpp": llama,
        "vllm": "Not Installed: binary not found",
        "mlx": "Not Installed: only supported on Apple Silicon",
        "sglang": "Not Installed: package not installed",
        "diffusers": "Not Installed: package not installed",
    }


async def runtime(request: Request) -> Response:
    """dmr's extension: the accelerator found, with every rejected candidate's reason."""
    from dmr_cli.runtime import install

    state: State = request.app.state.dmr
    detection = state.scheduler.detection
    runner: dict[str, Any] | None
    try:
        binary = await asyncio.to_thread(install.discover, detection)
        runner = {
            "kind": binary.kind,
            "variant": binary.variant,
            "version": binary.version,
            "commit": binary.commit,
            "path": str(binary.path) if binary.path else None,
            "source": binary.source,
        }
    except DmrError as exc:
        runner = {"kind": None, "error": exc.message}
    return json_response(
        {"accelerator": detection.to_json(), "runner": runner, "slots": state.scheduler.slots}
    )


async def ps(request: Request) -> Response:
    state: State = request.app.state.dmr
    return json_response(state.scheduler.ps())


async def unload(request: Request) -> Response:
    state: State = request.app.state.dmr
    body = await read_json(request, message="invalid request")
    if not isinstance(body, dict):
        raise BadRequest("invalid request")
    models = body.get("models") or []
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise BadRequest("invalid request: models must be a list of model references")
    count = await state.scheduler.unload(
        models, backend=str(body.get("backend") or ""), unload_all=bool(body.get("all"))
    )
    return json_response({"unloaded_runners": count})


async def configure(request: Request) -> Response:
    from dmr_cli.runtime.config import parse_configure

    state: State = request.app.state.dmr
    backend = request.path_params.get("backend") or DEFAULT_BACKEND
    if backend not in BACKENDS:
        return text_error(404, "backend not found")
    body = await read_json(request, message="invalid request")
    parsed = parse_configure(body, backend)
    mode = parsed.mode or "completion"
    await state.scheduler.configure(backend, parsed.model, mode, parsed.config)
    return Response(status_code=202)


async def list_configs(request: Request) -> Response:
    state: State = request.app.state.dmr
    wanted = request.query_params.get("model")
    wanted_id = None
    if wanted:
        model = await asyncio.to_thread(state.store.find, wanted)
        wanted_id = model.id if model else wanted
    out = []
    for stored in state.scheduler.configs.all():
        if wanted_id and stored.key.model_id != wanted_id:
            continue
        model = await asyncio.to_thread(state.store.find, stored.key.model_id)
        if model is None:
            continue  # no longer local (spec §2.7)
        out.append(
            {
                "Backend": stored.key.backend,
                "Model": model.tags[0] if model.tags else model.id,
                "ModelID": model.id,
                "Mode": stored.key.mode,
                "Config": stored.config.to_json(),
            }
        )
    return json_response(out)
