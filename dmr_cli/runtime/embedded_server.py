"""The embedded engine: llama-cpp-python's OpenAI server for one model on a Unix socket.

Started by the scheduler when no native llama-server is installed:

    python -m dmr_cli.runtime.embedded_server --model PATH --socket PATH [--n-ctx N]
        [--embedding] [--chat-template-file F] [--n-threads N] [--alias NAME]

The model loads before the socket exists, so `GET /health` answering means the model is
ready. Requests are not interrupted by newer ones (llama-cpp-python's default would cut a
stream off); the scheduler queues them instead. SIGINT and SIGTERM end it cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dmr_cli.runtime.embedded_server")
    parser.add_argument("--model", required=True, type=Path, help="GGUF file (first shard)")
    parser.add_argument("--socket", required=True, help="Unix socket to listen on")
    parser.add_argument(
        "--n-ctx", type=int, default=0, help="context size; 0 = the model's training context"
    )
    parser.add_argument("--embedding", action="store_true", help="serve embeddings")
    parser.add_argument("--chat-template-file", type=Path, help="Jinja chat template")
    parser.add_argument("--n-threads", type=int, help="CPU threads (default: physical cores)")
    parser.add_argument("--alias", help="model name reported by /v1/models")
    return parser.parse_args(argv)


def build_app(args: argparse.Namespace) -> FastAPI:
    """Load the model and return the ASGI app; loading happens here, synchronously."""
    import llama_cpp.server.app as server_app
    from fastapi.responses import JSONResponse
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from dmr_cli.runtime.llamacpp import physical_cores

    # Both settings classes are pydantic BaseSettings, which would also read MODEL, API_KEY,
    # CHAT_FORMAT... from the environment, and create_app honours CONFIG_FILE: the runner's
    # behaviour must not depend on what the daemon's environment happens to contain.
    os.environ.pop("CONFIG_FILE", None)
    server_settings = ServerSettings.model_construct(interrupt_requests=False)
    model_settings = ModelSettings.model_construct(
        model=str(args.model),
        model_alias=args.alias or args.model.name,
        n_ctx=args.n_ctx,
        embedding=args.embedding,
        n_threads=args.n_threads or physical_cores(),
        n_threads_batch=args.n_threads or physical_cores(),
        # None: llama-cpp-python uses the GGUF's own Jinja template (or a format it
        # recognises from it), as llama-server does.
        chat_format=None,
    )
    app: FastAPI = server_app.create_app(
        server_settings=server_settings, model_settings=[model_settings]
    )

    if args.chat_template_file is not None:
        # A packaged template.jinja layer overrides the GGUF's template, as llama-server's
        # --chat-template-file does; llama-cpp-python has no setting for it.
        proxy = server_app._llama_proxy
        assert proxy is not None
        llama = proxy()
        eos, bos = llama.token_eos(), llama.token_bos()
        llama.chat_handler = Jinja2ChatFormatter(
            template=args.chat_template_file.read_text(encoding="utf-8"),
            eos_token=_token_text(llama, eos),
            bos_token=_token_text(llama, bos),
            stop_token_ids=[eos],
        ).to_chat_handler()

    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app.add_api_route("/health", health, methods=["GET"])
    return app


def _token_text(llama: object, token: int) -> str:
    from llama_cpp import Llama

    assert isinstance(llama, Llama)
    if token < 0:
        return ""
    return llama.detokenize([token], special=True).decode("utf-8", "replace")


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # While the model loads, a signal ends the process at once (once llama.cpp's C loader
    # returns to Python). uvicorn then takes SIGINT/SIGTERM over for a graceful shutdown and
    # re-raises the signal afterwards into this handler, which exits with status 0.
    signal.signal(signal.SIGINT, _exit_quietly)
    signal.signal(signal.SIGTERM, _exit_quietly)
    try:
        app = build_app(args)
        import uvicorn

        uvicorn.run(app, uds=args.socket, log_level="warning", lifespan="off")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(args.socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
