"""Model management routes: `/models*` and `/engines/df` (spec §2.2–2.5)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from dmr_cli import config
from dmr_cli.errors import BadRequest, InvalidReference
from dmr_cli.reference import normalize_model_name, parse_reference
from dmr_cli.server.http import (
    json_response,
    progress_stream,
    query_bool,
    read_json,
    text_error,
)
from dmr_cli.server.state import State
from dmr_cli.store.fsutil import disk_used

POST_ACTIONS = ("tag", "push", "repackage")


async def list_models(request: Request) -> Response:
    state: State = request.app.state.dmr
    models = await asyncio.to_thread(state.store.models)
    return json_response([m.to_api() for m in models])


async def create_model(request: Request) -> Response:
    from dmr_cli.distribution import pull

    state: State = request.app.state.dmr
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("from", ""), str):
        raise BadRequest("invalid request body")
    source = body.get("from", "")
    token = body.get("bearer-token") or None
    try:
        pull.parse_pull_reference(source)
    except InvalidReference as exc:
        raise InvalidReference(f"Invalid model reference: {exc.message}") from exc

    def work(progress: Callable[[dict[str, Any]], None], cancel: threading.Event) -> None:
        pull.pull(
            state.store,
            source,
            progress=progress,
            bearer_token=token,
            cancel=cancel,
            on_bytes=state.metrics.pull_bytes,
        )

    return await progress_stream(request, work, gate=state.pull_slots)


async def load_model(request: Request) -> Response:
    from dmr_cli.distribution.pull import event
    from dmr_cli.distribution.tarball import read_model_tar

    state: State = request.app.state.dmr
    reader = AsyncBodyReader(request, asyncio.get_running_loop())

    def work(progress: Callable[[dict[str, Any]], None], cancel: threading.Event) -> None:
        state.store.ensure_layout()
        model_id = read_model_tar(reader, state.store)
        progress(event("success", "Model loaded successfully", mode="pull") | {"id": model_id})

    return await progress_stream(request, work)


async def purge(request: Request) -> Response:
    state: State = request.app.state.dmr
    await asyncio.to_thread(state.store.purge)
    return Response(status_code=200)


async def model_route(request: Request) -> Response:
    """`/models/{ref...}` with DMR's action detection on the last path segment."""
    path: str = request.path_params["rest"]
    ref, _, action = path.rpartition("/")
    if request.method == "GET" and action == "export" and ref:
        return await export_model(request, ref)
    if request.method == "POST":
        if not ref or action not in POST_ACTIONS:
            return text_error(404, f'unknown action "{action}"')
        handler = {"tag": tag_model, "push": push_model, "repackage": repackage_model}[action]
        return await handler(request, ref)
    if request.method == "GET":
        return await inspect_model(request, path)
    if request.method == "DELETE":
        return await delete_model(request, path)
    return text_error(404, "not found")


async def inspect_model(request: Request, ref: str) -> Response:
    state: State = request.app.state.dmr
    if "remote" in request.query_params and query_bool(request, "remote"):
        return json_response(await asyncio.to_thread(_inspect_remote, ref))
    model = await asyncio.to_thread(state.store.get, ref, partial=True)
    return json_response(model.to_api())


def _inspect_remote(value: str) -> dict[str, Any]:
    from dmr_cli.distribution.pull import parse_pull_reference, registry_client
    from dmr_cli.store.model import Model

    ref = parse_pull_reference(value)
    client = registry_client(None)
    try:
        digest, raw, _ = client.get_manifest(ref)
        manifest = json.loads(raw)
        raw_config = json.loads(client.get_blob(ref, manifest["config"]["digest"]))
    finally:
        client.close()
    model = Model(id=digest, tags=[], files=[], manifest=manifest, raw_config=raw_config)
    return model.to_api()


async def delete_model(request: Request, ref: str) -> Response:
    state: State = request.app.state.dmr
    force = query_bool(request, "force")
    result = await asyncio.to_thread(state.store.delete, ref, force=force)
    return json_response(result)


async def tag_model(request: Request, ref: str) -> Response:
    state: State = request.app.state.dmr
    repo = request.query_params.get("repo", "")
    tag = request.query_params.get("tag", "")
    if not repo or not tag:
        raise BadRequest("missing repo or tag query parameter")
    target = f"{repo}:{tag}"
    parse_reference(normalize_model_name(target))
    await asyncio.to_thread(state.store.tag, ref, target)
    return json_response(
        {"message": f'Model tagged successfully with "{target}"', "target": target}, status=201
    )


async def push_model(request: Request, ref: str) -> Response:
    from dmr_cli.distribution import pull, push

    state: State = request.app.state.dmr
    body = await read_json(request)
    token = body.get("bearer-token") if isinstance(body, dict) else None
    pull.parse_pull_reference(ref)
    await asyncio.to_thread(state.store.get, ref)

    def work(progress: Callable[[dict[str, Any]], None], cancel: threading.Event) -> None:
        push.push(state.store, ref, progress=progress, bearer_token=token)

    return await progress_stream(request, work)


async def repackage_model(request: Request, ref: str) -> Response:
    from dmr_cli.distribution.artifact import with_context_size

    state: State = request.app.state.dmr
    body = await read_json(request)
    target = body.get("target") if isinstance(body, dict) else None
    if not target:
        raise BadRequest("target is required")
    context_size = body.get("context_size")
    if context_size is not None and (not isinstance(context_size, int) or context_size <= 0):
        raise BadRequest("context_size must be a positive integer")
    parse_reference(normalize_model_name(target))

    def work() -> None:
        store = state.store
        model = store.get(ref)
        manifest = store.manifest_bytes(model.id)
        if context_size is not None:
            config_bytes = store.blob_path(model.config_digest).read_bytes()
            manifest, new_config = with_context_size(manifest, config_bytes, context_size)
            store.write_blob_bytes(new_config)
        store.write_model(manifest, [target])

    await asyncio.to_thread(work)
    return json_response(
        {
            "message": f'Model repackaged successfully as "{target}"',
            "source": ref,
            "target": target,
        },
        status=201,
    )


async def export_model(request: Request, ref: str) -> Response:
    from dmr_cli.distribution.tarball import write_model_tar

    state: State = request.app.state.dmr
    model = await asyncio.to_thread(state.store.get, ref)
    store = state.store
    blobs: list[tuple[str, Any]] = [
        (layer["digest"], store.blob_path(layer["digest"])) for layer in model.layers
    ]
    blobs.append((model.config_digest, store.blob_path(model.config_digest)))
    manifest = store.manifest_bytes(model.id)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=8)
    stop = threading.Event()

    class Writer:
        """A sync file object that hands chunks to the response, with backpressure."""

        def write(self, data: bytes) -> int:
            if stop.is_set():
                raise BrokenPipeError("client went away")
            asyncio.run_coroutine_threadsafe(queue.put(bytes(data)), loop).result()
            return len(data)

        def flush(self) -> None:
            pass

    def produce() -> None:
        try:
            write_model_tar(Writer(), manifest, blobs)
        finally:
            if not stop.is_set():
                asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()

    producer = asyncio.create_task(asyncio.to_thread(produce))

    async def body() -> AsyncIterator[bytes]:
        try:
            while (chunk := await queue.get()) is not None:
                yield chunk
        finally:
            stop.set()
            while not queue.empty():
                queue.get_nowait()
            producer.cancel()

    filename = ref.replace("/", "_").replace(":", "_")
    return StreamingResponse(
        body(),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{filename}.tar"'},
    )


async def disk_usage(request: Request) -> Response:
    state: State = request.app.state.dmr
    usage = await asyncio.to_thread(state.store.disk_usage)
    runners = await asyncio.to_thread(disk_used, config.runner_dir())
    return json_response(
        {
            "models_disk_usage": usage.models,
            "default_backend_disk_usage": runners,
            "reclaimable": usage.reclaimable,
        }
    )


class AsyncBodyReader:
    """A blocking file object over the request body, for sync code in a worker thread."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop) -> None:
        self._stream = request.stream().__aiter__()
        self._loop = loop
        self._buffer = bytearray()
        self._eof = False

    def _next(self) -> bytes | None:
        async def step() -> bytes | None:
            try:
                return await self._stream.__anext__()
            except StopAsyncIteration:
                return None

        return asyncio.run_coroutine_threadsafe(step(), self._loop).result()

    def read(self, size: int = -1) -> bytes:
        while not self._eof and (size < 0 or len(self._buffer) < size):
            chunk = self._next()
            if chunk is None:
                self._eof = True
            else:
                self._buffer += chunk
        if size < 0:
            size = len(self._buffer)
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out
