"""The Ollama API on `/api/*` (spec §2.8), so Open WebUI and other Ollama clients work
unchanged against `dmr serve`.

Model management is answered from the store and the scheduler. Chat, generate and
embeddings are translated (`ollama_translate`) into OpenAI requests made in process through
`upstream.call`, so they load runners, log requests and count metrics exactly as the OpenAI
routes do. A request's keep_alive, num_ctx and think go through the scheduler's
configuration first, as a `_configure` would. Every error is Ollama's `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dmr_cli.errors import BadRequest, Conflict, DmrError, ModelNotFound
from dmr_cli.reference import normalize_model_name, parse_reference
from dmr_cli.runtime.config import RunnerConfig
from dmr_cli.server import ollama_translate as tr
from dmr_cli.server import upstream
from dmr_cli.server.configs import ConfigKey
from dmr_cli.server.http import read_body
from dmr_cli.server.openai_models import context_window
from dmr_cli.server.scheduler import DEFAULT_BACKEND, Runner, bundle_files
from dmr_cli.server.state import State
from dmr_cli.store import Model

log = logging.getLogger("dmr")

VERSION = "0.1.0"  # what DMR's /api/version answers
NDJSON = "application/x-ndjson"
CHAT_PATH = "/v1/chat/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
Handler = Callable[[Request], Awaitable[Response]]
_pulls: set[asyncio.Task[None]] = set()  # running pull tasks, referenced until they end


def routes() -> list[Route]:
    """The `/api/*` routes, for `create_app`."""
    table: list[tuple[str, Handler, str]] = [
        ("/api/version", version, "GET"),
        ("/api/tags", tags, "GET"),
        ("/api/ps", ps, "GET"),
        ("/api/show", show, "POST"),
        ("/api/chat", chat, "POST"),
        ("/api/generate", generate, "POST"),
        ("/api/embed", embed, "POST"),
        ("/api/embeddings", embeddings, "POST"),
        ("/api/pull", pull_model, "POST"),
        ("/api/delete", delete, "DELETE"),
        ("/api/copy", copy, "POST"),
    ]
    return [
        Route(path, _ollama_errors(handler), methods=[method]) for path, handler, method in table
    ]


class RunnerFailed(DmrError):
    """A runner (or dmr's inference route) answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def _ollama_errors(handler: Handler) -> Handler:
    """The error boundary of the Ollama routes: every failure in Ollama's shape."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except DmrError as exc:
            return error(exc.status, exc.message)
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.url.path)
            return error(500, f"internal error: {exc}")

    return wrapped


async def _body(request: Request) -> dict[str, Any]:
    raw = await read_body(request)
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise BadRequest(f"invalid JSON in request body: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("invalid request: expected a JSON object")
    return body


async def _model(state: State, name: str) -> Model:
    model = await asyncio.to_thread(state.store.find, name)
    if model is None:
        raise ModelNotFound(f'model "{name}" not found, try pulling it first')
    return model


# -- models ---------------------------------------------------------------------------------


async def version(request: Request) -> Response:
    return JSONResponse({"version": VERSION})


async def tags(request: Request) -> Response:
    """One entry per tag (the ID for an untagged model), with the model's real size."""
    state: State = request.app.state.dmr
    models = await asyncio.to_thread(state.store.models)
    entries = []
    for model in models:
        for tag in model.tags or [model.id]:
            name = tr.ollama_name(tag)
            entries.append(
                {
                    "name": name,
                    "model": name,
                    "modified_at": tr.rfc3339(model.created),
                    "size": model.size,
                    "digest": tr.digest(model.id),
                    "details": tr.details(model.config),
                }
            )
    return JSONResponse({"models": entries})


async def ps(request: Request) -> Response:
    """The runners: their estimated memory as `size`, and when an idle one will go."""
    state: State = request.app.state.dmr
    entries = []
    for runner in list(state.scheduler.runners.values()):
        model = await asyncio.to_thread(state.store.find, runner.key.model_id)
        entries.append(_ps_entry(state, runner, model))
    return JSONResponse({"models": entries})


def _ps_entry(state: State, runner: Runner, model: Model | None) -> dict[str, Any]:
    name = tr.ollama_name(model.tags[0]) if model and model.tags else runner.model_ref
    on_gpu = state.scheduler.detection.accelerator != "cpu" and not runner.embedded
    entry: dict[str, Any] = {
        "name": name,
        "model": name,
        "size": runner.memory,
        "digest": tr.digest(runner.key.model_id),
        "details": tr.details(model.config if model else {}),
        "expires_at": tr.rfc3339(runner.expires_at),
        "size_vram": runner.memory if on_gpu else 0,
    }
    context = _context_size(state, model, runner.key.mode) if model else None
    if context:
        entry["context_length"] = context
    return entry


def _context_size(state: State, model: Model, mode: str) -> int | None:
    """The configured context, else the packaged one, else the GGUF's training context."""
    config = state.scheduler.configs.lookup(DEFAULT_BACKEND, model.id, mode)
    if config is not None and config.context_size and config.context_size > 0:
        return config.context_size
    return context_window(model.config)


async def show(request: Request) -> Response:
    state: State = request.app.state.dmr
    body = await _body(request)
    name = tr.model_name(body)
    model = await _model(state, name)
    return JSONResponse(
        await asyncio.to_thread(_show, state, model, name, bool(body.get("verbose")))
    )


def _show(state: State, model: Model, name: str, verbose: bool) -> dict[str, Any]:
    # The GGUF reader is gguf_meta's own (header only, through mmap: milliseconds even for
    # large models); it hands back each value with its GGUF type, which model_info keeps.
    from dmr_cli.distribution.artifact import MEDIA_TYPE_LICENSE
    from dmr_cli.distribution.gguf_meta import parse_file, shard_paths

    files = bundle_files(state.store.bundle(model.id))
    shards = [parse_file(path) for path in shard_paths(files["model"])]
    kvs = {key: (vtype, value) for shard in shards for key, vtype, value in shard.kvs}
    parameter_count = sum(elements for shard in shards for _, _, elements in shard.tensors)
    if "template" in files:
        template = files["template"].read_text(encoding="utf-8", errors="replace")
    else:
        template = str(kvs.get("tokenizer.chat_template", (0, ""))[1])
    license = "\n".join(
        state.store.blob_path(layer["digest"]).read_text(encoding="utf-8", errors="replace")
        for layer in model.layers
        if layer.get("mediaType") == MEDIA_TYPE_LICENSE
    )
    context = _context_size(state, model, "completion")
    params: dict[str, Any] = {"num_ctx": context} if context else {}
    out: dict[str, Any] = {
        "license": license,
        "modelfile": tr.modelfile(name, str(files["model"]), template, params, license),
        "parameters": tr.parameters(params),
        "template": template,
        "details": tr.details(model.config),
        "model_info": tr.model_info(kvs, parameter_count, verbose=verbose),
        "capabilities": tr.capabilities(kvs, template, vision="mmproj" in files),
        "modified_at": tr.rfc3339(model.created),
    }
    return {k: v for k, v in out.items() if v != ""}


async def delete(request: Request) -> Response:
    """Unload the model's idle runners, then delete it (a tag: untag) as `dmr rm` does."""
    state: State = request.app.state.dmr
    name = tr.model_name(await _body(request))
    await _model(state, name)
    await state.scheduler.unload([name])
    await asyncio.to_thread(state.store.delete, name)
    return JSONResponse({})


async def copy(request: Request) -> Response:
    """Tag `source` as `destination` too."""
    state: State = request.app.state.dmr
    body = await _body(request)
    source, destination = body.get("source"), body.get("destination")
    if not (isinstance(source, str) and source.strip()) or not (
        isinstance(destination, str) and destination.strip()
    ):
        raise BadRequest("source and destination are required")
    await _model(state, source)
    parse_reference(normalize_model_name(destination))  # InvalidReference: 400
    await asyncio.to_thread(state.store.tag, source, destination)
    return JSONResponse({})


async def pull_model(request: Request) -> Response:
    """NDJSON status lines (spec §2.8) from the daemon's own pull; errors before the first
    line keep their status, later ones end the stream with an error line."""
    from dmr_cli.distribution.pull import parse_pull_reference

    state: State = request.app.state.dmr
    body = await _body(request)
    name = tr.model_name(body)
    stream = tr.stream_flag(body)
    parse_pull_reference(name)
    events = _pull_events(state, name)
    try:
        first = await anext(events)
        if not stream:
            async for _ in events:
                pass
            return JSONResponse({"status": "success"})
    except DmrError as exc:
        await events.aclose()
        return error(exc.status, f"Failed to pull model: {exc.message}")
    except BaseException:
        await events.aclose()
        raise

    async def lines() -> AsyncIterator[bytes]:
        try:
            yield _line({"status": "pulling manifest"})
            yield _line(tr.pull_status(first))
            async for event in events:
                yield _line(tr.pull_status(event))
        except Exception as exc:
            yield _line({"error": f"Failed to pull model: {_failure(exc)}"})
        finally:
            await events.aclose()

    return StreamingResponse(lines(), media_type=NDJSON)


async def _pull_events(state: State, name: str) -> AsyncGenerator[dict[str, Any], None]:
    """The pull's progress events (spec §2.4); it runs in a worker thread under the daemon's
    pull slots, and stops (keeping what it has for a resume) when the reader goes away."""
    from dmr_cli.distribution import pull

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancel = threading.Event()
    end = object()

    def emit(item: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> None:
        try:
            pull.pull(
                state.store,
                name,
                progress=emit,
                cancel=cancel,
                on_bytes=state.metrics.pull_bytes,
            )
            emit(end)
        except BaseException as exc:
            emit(exc)

    async def run() -> None:
        async with state.pull_slots:
            await asyncio.to_thread(work)

    task = asyncio.create_task(run())
    _pulls.add(task)
    task.add_done_callback(_pulls.discard)
    try:
        while (item := await queue.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()


# -- inference ------------------------------------------------------------------------------


async def chat(request: Request) -> Response:
    state: State = request.app.state.dmr
    body = await _body(request)
    name = tr.model_name(body)
    stream = tr.stream_flag(body)
    settings = tr.runner_settings(body)
    model = await _model(state, name)
    if not body.get("messages"):
        return await _load_or_unload(state, model, name, settings, chat=True)
    payload = tr.chat_request(body, name, stream=stream)
    await _configure(state, model, name, "completion", settings)
    return await _complete(state, model, name, payload, chat=True)


async def generate(request: Request) -> Response:
    state: State = request.app.state.dmr
    body = await _body(request)
    name = tr.model_name(body)
    stream = tr.stream_flag(body)
    settings = tr.runner_settings(body)
    model = await _model(state, name)
    if not body.get("prompt") and not body.get("images"):
        return await _load_or_unload(state, model, name, settings, chat=False)
    payload = tr.generate_request(body, name, stream=stream)
    await _configure(state, model, name, "completion", settings)
    return await _complete(state, model, name, payload, chat=False)


async def _load_or_unload(
    state: State, model: Model, name: str, settings: tr.RunnerSettings, *, chat: bool
) -> Response:
    """Ollama's idioms for a request with nothing to say: keep_alive 0 unloads the model,
    anything else loads it (with the request's settings)."""
    if settings.keep_alive == 0:
        await state.scheduler.unload([name])
        return JSONResponse(tr.idle_reply(name, "unload", chat=chat))
    await _configure(state, model, name, "completion", settings)
    await _preload(state, name, "completion")
    return JSONResponse(tr.idle_reply(name, "load", chat=chat))


async def _configure(
    state: State, model: Model, name: str, mode: str, settings: tr.RunnerSettings
) -> None:
    """Apply the request's runner settings on top of the model's stored configuration, so
    a keep_alive does not drop a configured context size. An identical configuration is a
    no-op; a changed one reloads the runner when it is idle. A busy runner keeps its
    settings until it is reloaded: the request goes on, as in DMR."""
    changes = settings.changes()
    if not changes:
        return
    current = state.scheduler.configs.get(ConfigKey(DEFAULT_BACKEND, model.id, mode))
    base = current or RunnerConfig()
    config = dataclasses.replace(base, runtime_flags=list(base.runtime_flags), **changes)
    try:
        await state.scheduler.configure(DEFAULT_BACKEND, name, mode, config)
    except Conflict:
        log.warning("%s is busy: its new settings apply when it next loads", name)


def _ready(state: State, model: Model, mode: str) -> bool:
    return any(
        r.key.model_id == model.id and r.key.mode == mode and not r.loading and not r.stopping
        for r in state.scheduler.runners.values()
    )


async def _preload(state: State, name: str, mode: str) -> int:
    """Load the model's runner (DMR's X-Preload-Only request); the time it took, in ns."""
    started = time.monotonic_ns()
    path = EMBEDDINGS_PATH if mode == "embedding" else CHAT_PATH
    async with upstream.call(state, path, {"model": name}, {"X-Preload-Only": "true"}) as ex:
        if not ex.ok:
            raise RunnerFailed(ex.status, tr.error_message(await ex.json()))
    return time.monotonic_ns() - started


async def _load(state: State, model: Model, name: str, mode: str) -> int | None:
    """Load the runner ahead of the request when it is not ready, so that load_duration
    is the load alone: 0 when it was ready, None when it cannot be told apart (a
    keep_alive of 0 would unload a preloaded runner at once)."""
    if _ready(state, model, mode):
        return 0
    config = state.scheduler.configs.get(ConfigKey(DEFAULT_BACKEND, model.id, mode))
    if config is not None and config.keep_alive == 0:
        return None
    return await _preload(state, name, mode)


async def _complete(
    state: State, model: Model, name: str, payload: dict[str, Any], *, chat: bool
) -> Response:
    started = time.monotonic_ns()
    load_ns = await _load(state, model, name, "completion")
    if not payload["stream"]:
        async with upstream.call(state, CHAT_PATH, payload) as ex:
            data = await ex.json()
            if not ex.ok:
                raise RunnerFailed(ex.status, tr.error_message(data))
        turn = tr.Turn.from_response(data)
        total = time.monotonic_ns() - started
        reply = tr.final(name, turn, chat=chat, whole=True, total_ns=total, load_ns=load_ns)
        return JSONResponse(reply)
    # The exchange outlives this function: the response body reads it, then closes it.
    calls = contextlib.AsyncExitStack()
    try:
        ex = await calls.enter_async_context(upstream.call(state, CHAT_PATH, payload))
        if not ex.ok:
            raise RunnerFailed(ex.status, tr.error_message(await ex.json()))
    except BaseException:
        await calls.aclose()
        raise
    lines = _stream(ex, calls, name, chat=chat, started=started, load_ns=load_ns)
    return StreamingResponse(lines, media_type=NDJSON)


async def _stream(
    ex: upstream.Exchange,
    calls: contextlib.AsyncExitStack,
    name: str,
    *,
    chat: bool,
    started: int,
    load_ns: int | None,
) -> AsyncIterator[bytes]:
    """The runner's SSE chunks as Ollama's NDJSON lines, then the final `done` object."""
    reader = tr.StreamReader()
    finished = False
    try:
        async for data in ex.events():
            if data == "[DONE]":
                finished = True
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                continue  # not an event of the OpenAI stream
            message = tr.stream_error(chunk)
            if message is not None:
                yield _line({"error": message})
                return
            text, thinking = reader.feed(chunk)
            if text or thinking:
                yield _line(tr.chunk(name, text, thinking, chat=chat))
        if not finished:
            # llama-cpp-python ends a stream it cannot serve (a prompt past the context) early,
            # without an error event: that is no answer, whatever came before.
            yield _line({"error": "the runner ended the answer before it was complete"})
            return
        turn = reader.turn
        if chat and turn.tool_calls:
            yield _line(tr.tool_call_chunk(name, turn.tool_calls))
        total = time.monotonic_ns() - started
        yield _line(tr.final(name, turn, chat=chat, whole=False, total_ns=total, load_ns=load_ns))
    except Exception as exc:
        yield _line({"error": _failure(exc)})
    finally:
        await calls.aclose()


def _line(value: dict[str, Any]) -> bytes:
    return (json.dumps(value, separators=(",", ":")) + "\n").encode()


def _failure(exc: Exception) -> str:
    """The message of a failure in the middle of a stream: the status is sent already, so
    it ends the stream as an error line."""
    if isinstance(exc, DmrError):
        return exc.message
    log.error("an Ollama stream failed: %s", exc, exc_info=exc)
    return f"internal error: {exc}"


async def embed(request: Request) -> Response:
    """POST /api/embed: `{"model", "embeddings": [[...]], ...}`, vectors L2-normalised and
    cut to `dimensions` when asked, as Ollama answers."""
    state: State = request.app.state.dmr
    body = await _body(request)
    name = tr.model_name(body)
    settings = tr.runner_settings(body)
    inputs = tr.embed_inputs(body.get("input"))
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise BadRequest(f"invalid dimensions {dimensions!r}: expected a positive integer")
    model = await _model(state, name)
    await _configure(state, model, name, "embedding", settings)
    started = time.monotonic_ns()
    if not inputs:
        loaded = await _preload(state, name, "embedding")
        return JSONResponse({"model": name, "embeddings": [], "load_duration": loaded})
    load_ns = await _load(state, model, name, "embedding")
    data = await _embeddings(state, name, inputs)
    vectors = [tr.normalize(v[:dimensions] if dimensions else v) for v in tr.embeddings(data)]
    reply: dict[str, Any] = {
        "model": name,
        "embeddings": vectors,
        "total_duration": time.monotonic_ns() - started,
    }
    if load_ns is not None:
        reply["load_duration"] = load_ns
    usage = data.get("usage") or {}
    if isinstance(usage.get("prompt_tokens"), int):
        reply["prompt_eval_count"] = usage["prompt_tokens"]
    return JSONResponse(reply)


async def embeddings(request: Request) -> Response:
    """POST /api/embeddings, Ollama's older route: `{"embedding": [...]}` for one prompt."""
    state: State = request.app.state.dmr
    body = await _body(request)
    name = tr.model_name(body)
    settings = tr.runner_settings(body)
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise BadRequest("invalid request: prompt must be a string")
    model = await _model(state, name)
    await _configure(state, model, name, "embedding", settings)
    if not prompt:
        await _preload(state, name, "embedding")
        return JSONResponse({"embedding": []})
    (vector,) = tr.embeddings(await _embeddings(state, name, [prompt]))
    return JSONResponse({"embedding": vector})


async def _embeddings(state: State, name: str, inputs: list[str]) -> dict[str, Any]:
    async with upstream.call(state, EMBEDDINGS_PATH, {"model": name, "input": inputs}) as ex:
        data = await ex.json()
        if not ex.ok:
            raise RunnerFailed(ex.status, tr.error_message(data))
    if not isinstance(data, dict):
        raise DmrError("the runner answered the embeddings request with no JSON object")
    return data
