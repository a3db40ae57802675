"""`dmr push MODEL`."""

from __future__ import annotations

from typing import Annotated

from dmr_cli import client
from dmr_cli.commands._params import Argument
from dmr_cli.commands._transfer import run_transfer


def push(model: Annotated[str, Argument(metavar="MODEL", help="Local model to push")]) -> None:
    """Push a model to Docker Hub, another OCI registry or Hugging Face."""
    run_transfer("push", model, lambda on_event: client.push(model, on_event))
