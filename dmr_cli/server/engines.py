"""`/engines/*`: inference proxied to runners, and the scheduler's administration routes
(spec §2.6, §2.7)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from dmr_cli.errors import BadRequest, DmrError
from dmr_cli.server.http import json_response, read_body, read_json, text_error
from dmr_cli.server.relay import UpstreamError, relay
from dmr_cli.server.scheduler import BACKENDS, DEFAULT_BACKEND, Scheduler
from dmr_cli.server.state import State

# Path suffix → runner mode (spec §2.6 step 2).
MODES = {
    "/v1/chat/completions": "completion",
    "/v1/completions": "completion",
    "/v1/messages": "completion",
    "/v1/messages/count_tokens": "completion",
    "/v1/embeddings": "embedding",
    "/rerank": "reranking",
    "/score": "reranking",
    "/v1/rerank": "reranking",
    "/v1/images/generations": "image-generation",
}


def split_inference_path(rest: str) -> tuple[str, str] | None:
    """`llama.cpp/v1/chat/completions` → (backend, `/v1/chat/completions`); None if not
    an inference route."""
    path = "/" + rest
    if path in MODES:
        return DEFAULT_BACKEND, path
    backend, _, tail = rest.partition("/")
    if "/" + tail in MODES:
        return backend, "/" + tail
    return None


async def inference(request: Request) -> Response:
    state: State = request.app.state.dmr
    split = split_inference_path(request.path_params["rest"])
    if split is None:
        return text_error(404, "not found")
    backend, upstream_path = split
    if request.method != "POST":
        return text_error(404, "not found")
    if backend not in BACKENDS:
        return text_error(404, "backend not found")
    if backend != DEFAULT_BACKEND:
        return text_error(
            412, f'backend "{backend}" is not installed; dmr serves GGUF models with llama.cpp'
        )
    body = bytes(await read_body(request))
    try:
        payload = json.loads(body)
    except ValueError:
        return text_error(400, "invalid request")
    model = payload.get("model") if isinstance(payload, dict) else None
    if not model or not isinstance(model, str):
        return text_error(400, "model is required")
    mode = MODES[upstream_path]
    scheduler = state.scheduler
    runner = await scheduler.acquire(model, mode, backend, scheduler.store.get(model))
    if request.headers.get("x-preload-only", "").lower() == "true":
        scheduler.release(runner)
        return Response(status_code=200)
    return RelayResponse(scheduler, runner, upstream_path, body)


class RelayResponse(Response):
    """Streams the runner's answer; releases the runner when the exchange is over."""

    def __init__(self, scheduler: Scheduler, runner: Any, path: str, body: bytes) -> None:
        self.scheduler, self.runner, self.path, self.payload = scheduler, runner, path, body
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if self.runner.embedded:
                async with self.runner.turn:
                    await self._relay(headers, send, receive)
            else:
                await self._relay(headers, send, receive)
        finally:
            self.scheduler.release(self.runner)

    async def _relay(self, headers: dict[str, str], send: Send, receive: Receive) -> None:
        try:
            await relay(self.runner.socket, "POST", self.path, headers, self.payload, send, receive)
        except UpstreamError as exc:
            message = json.dumps(
                {
                    "type": "error",
                    "code": None,
                    "message": f"the runner for {self.runner.model_ref} failed: {exc}",
                    "param": None,
                    "sequence_number": 1,
                }
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": message})


async def status(request: Request) -> Response:
    state: State = request.app.state.dmr
    return json_response(await asyncio.to_thread(backend_status, state))


def backend_status(state: State) -> dict[str, str]:
    from dmr_cli.runtime import install

    try:
        binary = install.discover(state.detection())
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
            llama = f"Running: llama.cpp {binary.version}-{binary.variant}{commit}"
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
    detection = await asyncio.to_thread(state.detection)
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
