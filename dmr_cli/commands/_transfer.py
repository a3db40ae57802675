"""The progress display, error prefix and Ctrl-C handling shared by pull and push."""

from __future__ import annotations

import sys
from collections.abc import Callable

from dmr_cli import client, render


def run_transfer(verb: str, ref: str, transfer: Callable[[client.ProgressCallback], str]) -> None:
    """Run a daemon-side pull/push with progress on stderr; print its result on stdout."""
    display = render.progress_display()
    message: str | None = None
    try:
        with client.failing(f"Failed to {verb} model"):
            message = transfer(display.update)
    except KeyboardInterrupt:
        pass  # reported below, once the progress display is gone
    finally:
        display.close()
    if message is None:
        # Closing the connection cancelled the transfer in the daemon; finished layers stay.
        again = "resume the download" if verb == "pull" else "try again"
        render.err(f"Interrupted. Run 'dmr {verb} {ref}' again to {again}.")
        sys.exit(130)
    render.out(message)
