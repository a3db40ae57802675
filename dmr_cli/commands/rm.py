"""`dmr rm MODEL...`."""

from __future__ import annotations

from typing import Annotated

from dmr_cli import client, render
from dmr_cli.commands._params import Argument, Option
from dmr_cli.errors import Conflict, ModelNotFound, NotFound


def rm(
    models: Annotated[
        list[str], Argument(metavar="MODEL...", help="Models to remove (name, tag or ID)")
    ],
    force: Annotated[
        bool, Option("--force", "-f", help="Remove the model even with several tags")
    ] = False,
) -> None:
    """Remove local models."""
    for ref in models:
        with client.failing("Failed to remove model"):
            try:
                entries = client.delete(ref, force=force)
            except NotFound as e:
                raise ModelNotFound(f"no such model: {ref}") from e
            except Conflict as e:
                e.hint = e.hint or "remove its tags one by one, or use --force to delete them all"
                raise
        render.out(render.delete_result(entries))
