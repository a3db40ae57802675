"""`dmr pull MODEL`."""

from __future__ import annotations

from typing import Annotated

from dmr_cli import client
from dmr_cli.commands._params import Argument
from dmr_cli.commands._transfer import run_transfer


def pull(
    model: Annotated[
        str, Argument(metavar="MODEL", help="Model to pull: ai/smollm2, hf.co/ORG/REPO:Q4_K_M, ...")
    ],
) -> None:
    """Pull a model from Docker Hub or Hugging Face to your local environment."""
    run_transfer("pull", model, lambda on_event: client.pull(model, on_event))
