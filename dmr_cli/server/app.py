"""The daemon: a Starlette app in DMR's routing shape, served by dmr's lean HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from dmr_cli import __version__, config
from dmr_cli.runtime.detect import detect
from dmr_cli.server import (
    anthropic,
    engines,
    inference,
    logs,
    metrics,
    models,
    ollama,
    openai_models,
    recorder,
    responses,
)
from dmr_cli.server.access import Access, exposure_warning, load_policy
from dmr_cli.server.configs import ConfigStore
from dmr_cli.server.http import handle_errors, text_error
from dmr_cli.server.scheduler import Scheduler
from dmr_cli.server.state import State
from dmr_cli.store import Store

log = logging.getLogger("dmr")
PARTIAL_SWEEP_INTERVAL = 3600.0


async def root(request: Request) -> Response:
    return PlainTextResponse("Docker Model Runner is running")


async def version(request: Request) -> Response:
    return JSONResponse({"version": __version__})


async def not_found(request: Request) -> Response:
    """DMR's sub-routers answer any unknown path or method with a plain 404."""
    return text_error(404, "not found")


async def page_not_found(request: Request, exc: Exception) -> Response:
    return text_error(404, "404 page not found")


ANY = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"]


def create_app(store: Store) -> Starlette:
    e = handle_errors

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await asyncio.to_thread(store.ensure_layout)
        counters, log_book = metrics.Metrics(), recorder.Recorder()
        configs = await asyncio.to_thread(ConfigStore, store.root)
        detection = await asyncio.to_thread(detect)
        scheduler = Scheduler(
            store, configs, detection=detection, metrics=counters, recorder=log_book
        )
        app.state.dmr = State(store=store, scheduler=scheduler, metrics=counters, recorder=log_book)
        sweeper = asyncio.create_task(_sweep_partials(store))
        warming = asyncio.create_task(asyncio.to_thread(scheduler.warm_up))
        try:
            yield
        finally:
            sweeper.cancel()
            warming.cancel()
            await scheduler.shutdown()

    routes = [
        Route("/", root, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/logs", logs.logs, methods=["GET"]),
        Route("/models", e(models.list_models), methods=["GET"]),
        Route("/models/", e(models.list_models), methods=["GET"]),
        Route("/models/create", e(models.create_model), methods=["POST"]),
        Route("/models/load", e(models.load_model), methods=["POST"]),
        Route("/models/purge", e(models.purge), methods=["DELETE"]),
        Route("/models/{rest:path}", e(models.model_route), methods=["GET", "POST", "DELETE"]),
        Route("/models/{rest:path}", not_found, methods=ANY),
        Route("/engines/df", e(models.disk_usage), methods=["GET"]),
        Route("/engines/status", e(engines.status), methods=["GET"]),
        Route("/engines/runtime", e(engines.runtime), methods=["GET"]),
        Route("/engines/ps", e(engines.ps), methods=["GET"]),
        Route("/engines/unload", e(engines.unload), methods=["POST"]),
        Route("/engines/_configure", e(engines.configure), methods=["POST"]),
        Route("/engines/_configure", e(engines.list_configs), methods=["GET"]),
        Route("/engines/{backend}/_configure", e(engines.configure), methods=["POST"]),
        Route("/engines/requests", e(recorder.requests_route), methods=["GET"]),
        *ollama.routes(),
        Route("/anthropic/v1/messages", anthropic.messages, methods=["POST"]),
        Route("/anthropic/v1/messages/count_tokens", anthropic.count_tokens, methods=["POST"]),
        *responses.routes(),
        *_openai_model_routes("/engines", "/engines/{backend}", ""),
        Route("/engines/{rest:path}", not_found, methods=ANY),
        Route("/v1/{rest:path}", not_found, methods=ANY),
    ]
    if not config.env_bool("DISABLE_METRICS"):
        routes.append(Route("/metrics", metrics.metrics_route, methods=ANY))
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: page_not_found})
    return app


def _openai_model_routes(*prefixes: str) -> list[Route]:
    """GET `<prefix>/v1/models[/{ref...}]` (spec §2.3); other methods fall through to the
    catch-all 404 routes after them."""
    e = handle_errors
    routes = []
    for prefix in prefixes:
        routes += [
            Route(f"{prefix}/v1/models", e(openai_models.list_models), methods=["GET"]),
            Route(f"{prefix}/v1/models/{{ref:path}}", e(openai_models.get_model), methods=["GET"]),
        ]
    return routes


class Daemon:
    """The ASGI entry point: inference POSTs go straight to the hot path, the rest to the
    router. Inference routes with another method fall through to DMR's 404s."""

    def __init__(self, app: Starlette) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = inference.match(scope["path"])
            if route is not None:
                await inference.handle(self.app.state.dmr, scope, receive, send, *route)
                return
        await self.app(scope, receive, send)


async def _sweep_partials(store: Store) -> None:
    """Partial downloads older than 7 days go; first sweep an interval after start-up."""
    while True:
        await asyncio.sleep(PARTIAL_SWEEP_INTERVAL)
        with contextlib.suppress(OSError):
            removed = await asyncio.to_thread(store.clean_stale_partials)
            for path in removed:
                log.info("removed stale partial download %s", path.name)


def setup_logging() -> None:
    level = config.env("LOG_LEVEL", "info").upper().replace("WARNING", "WARN")
    level = {"WARN": "WARNING"}.get(level, level)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    with contextlib.suppress(OSError):
        log_dir = config.log_dir()
        log_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_dir / "inference.log"))
    formatter = logging.Formatter(
        "[%(asctime)s.%(msecs)03d000000Z] %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"
    )
    formatter.converter = __import__("time").gmtime
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=getattr(logging, level, logging.INFO), handlers=handlers, force=True)


def run(host: str, port: int | None, socket: str | None, models_path: Path) -> None:
    from dmr_cli.server import httpserver

    setup_logging()
    store = Store(models_path)
    policy = load_policy()  # before binding: a bad keys file stops the start
    app = Access(Daemon(create_app(store)), policy)
    if socket:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket)
        bind = f"unix:{socket}"
    else:
        bind = f"http://{host}:{port}"
        warning = exposure_warning(host, policy)
        if warning:
            log.warning("%s", warning)
    if policy.requires_key:
        log.info("an API key is required on every request (%d keys)", len(policy.key_digests))
    log.info("dmr %s serving %s (models: %s)", __version__, bind, models_path)
    httpserver.run(app, host, port or config.DEFAULT_PORT, socket)
    log.info("Docker Model Runner stopped")
