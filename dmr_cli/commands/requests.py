"""`dmr requests`."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from dmr_cli import client, render
from dmr_cli.commands._params import Option, usage_error

SHOWN_EVENTS = ("new_request", "existing_request")


def requests(
    follow: Annotated[bool, Option("--follow", "-f", help="Follow requests stream")] = False,
    include_existing: Annotated[
        bool,
        Option("--include-existing", help="Include existing requests when starting to stream"),
    ] = False,
    model: Annotated[
        str | None, Option("--model", metavar="MODEL", help="Specify the model to filter requests")
    ] = None,
) -> None:
    """Fetch requests+responses from Docker Model Runner."""
    if include_existing and not follow:
        raise usage_error("can only be used with --follow", "'--include-existing'")
    with client.failing("Failed to get requests"):
        if not follow:
            query = "?" + urlencode({"model": model}) if model else ""
            render.out(render.to_json(client.get_json("/engines/requests" + query) or []))
            return
        try:
            for event, data in client.follow_requests(
                model=model, include_existing=include_existing
            ):
                if event == "connected":
                    render.err("Connected to request stream. Press Ctrl+C to stop.")
                elif event in SHOWN_EVENTS:
                    render.out(data)
        except KeyboardInterrupt:
            return  # stopping a follow is how it ends, not a failure
