"""`dmr logs`."""

from __future__ import annotations

import time
from typing import Annotated

from dmr_cli import client, config, render
from dmr_cli.commands._params import Option


def logs(
    follow: Annotated[
        bool, Option("--follow", "-f", help="View logs with real-time streaming")
    ] = False,
    no_engines: Annotated[
        bool, Option("--no-engines", help="Exclude inference engine logs from the output")
    ] = False,
) -> None:
    """Fetch the Docker Model Runner logs."""
    with client.failing("Failed to get logs"):
        if not client.is_local_endpoint():
            for text in client.logs(follow=follow, no_engines=no_engines):
                render.write(text)
            return
        # This machine's daemon: read its files directly (works while it is down, too).
        from dmr_cli.server.logs import FOLLOW_POLL, LogReader, chunks

        reader = LogReader(config.log_dir(), engines=not no_engines)
    while True:
        wrote = False
        for piece in chunks(reader.read(partial=not follow)):
            render.write(piece.decode("utf-8", "replace"))
            wrote = True
        if not follow:
            return
        if not wrote:
            time.sleep(FOLLOW_POLL)
