"""`dmr purge`."""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated

from dmr_cli import client, render
from dmr_cli.commands._params import Option
from dmr_cli.errors import NotFound


def purge(
    force: Annotated[
        bool, Option("--force", "-f", help="Remove all models without asking")
    ] = False,
) -> None:
    """Remove all models."""
    if not force:
        render.err("WARNING! This will remove the entire models directory.")
        sys.stderr.write("Are you sure you want to continue? [y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip() not in ("y", "Y"):
            render.err("Operation cancelled.")
            return
    # A daemon without the runtime layer has no /engines/unload (and nothing loaded).
    with client.failing("Failed to unload models"), contextlib.suppress(NotFound):
        client.unload_all()
    with client.failing("Failed to purge"):
        client.purge()
