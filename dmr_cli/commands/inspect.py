"""`dmr inspect MODEL`."""

from __future__ import annotations

from typing import Annotated

from dmr_cli import client, render
from dmr_cli.commands._params import Argument, Option, usage_error


def inspect(
    model: Annotated[str, Argument(metavar="MODEL", help="Model name, tag or ID")],
    openai: Annotated[bool, Option("--openai", help="Show the OpenAI model object")] = False,
    remote: Annotated[
        bool, Option("--remote", "-r", help="Inspect the model in its registry")
    ] = False,
) -> None:
    """Display detailed information on one model, as JSON."""
    if openai and remote:
        raise usage_error("cannot be used with --openai", "'--remote'")
    with client.failing(f"Failed to get model {model}"):
        data = client.openai_model(model) if openai else client.model(model, remote=remote)
    render.out(render.to_json(data))
