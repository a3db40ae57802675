"""`dmr serve`: run the daemon in the foreground."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from dmr_cli.commands._params import Option, usage_error
from dmr_cli.errors import BadRequest

Host = Annotated[str, Option(help="Address to listen on")]
Port = Annotated[
    int | None,
    Option(
        min=1, max=65535, show_default=False, help="TCP port [default: $MODEL_RUNNER_PORT or 12434]"
    ),
]
Socket = Annotated[Path | None, Option(help="Listen on this Unix socket instead of TCP")]
ModelsPath = Annotated[
    Path | None,
    Option(
        show_default=False, help="Model store [default: $MODELS_PATH or the user data directory]"
    ),
]


def serve(
    host: Host = "127.0.0.1",
    port: Port = None,
    socket: Socket = None,
    models_path: ModelsPath = None,
) -> None:
    """Run the dmr daemon (DMR's HTTP API) in the foreground."""
    if port is not None and socket is not None:
        raise usage_error("cannot be used together", "'--port' / '--socket'")
    from dmr_cli import config
    from dmr_cli.server import run

    if socket is None and port is None:
        env_port = config.env("MODEL_RUNNER_PORT") or str(config.DEFAULT_PORT)
        if not env_port.isdigit() or not 0 < int(env_port) < 65536:
            raise BadRequest(f"invalid MODEL_RUNNER_PORT {env_port!r}: expected a TCP port")
        port = int(env_port)
    store = (models_path or config.models_path()).expanduser()
    run(host=host, port=port, socket=str(socket) if socket else None, models_path=store)
