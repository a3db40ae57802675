"""`dmr unload` / `dmr stop`."""

from __future__ import annotations

from typing import Annotated

from dmr_cli import client, render
from dmr_cli.commands._params import Argument, Option, usage_error


def unload(
    models: Annotated[
        list[str] | None, Argument(metavar="MODEL...", show_default=False, help="Models to unload")
    ] = None,
    all_models: Annotated[bool, Option("--all", help="Unload all running models")] = False,
    backend: Annotated[str, Option(help="Optional backend to target")] = "",
) -> None:
    """Unload running models."""
    if all_models and models:
        raise usage_error("cannot be used with model names", "'--all'")
    if not all_models and not models:
        raise usage_error("give one or more models, or --all", "'MODEL...'")
    with client.failing("Failed to unload models"):
        count = client.unload(models or [], all_models=all_models, backend=backend)
    if count:
        render.out(f"Unloaded {count} model(s).")
    else:
        render.out("No models are running." if all_models else "No such model(s) running.")
