"""The daemon (`dmr serve`)."""

from __future__ import annotations

from pathlib import Path


def run(host: str, port: int | None, socket: str | None, models_path: Path) -> None:
    from dmr_cli.server.app import run as _run

    _run(host, port, socket, models_path)
