"""`dmr show MODEL`."""

from __future__ import annotations

from typing import Annotated

from dmr_cli import client, render
from dmr_cli.commands._params import Argument, Option


def show(
    model: Annotated[str, Argument(metavar="MODEL", help="Model name, tag or ID")],
    remote: Annotated[
        bool, Option("--remote", "-r", help="Show the model in its registry")
    ] = False,
) -> None:
    """Show information for a model in a human-readable format."""
    with client.failing(f"Failed to get model {model}"):
        data = client.model(model, remote=remote)
    render.out(render.model_info(data))
