"""`dmr ps`."""

from __future__ import annotations

from dmr_cli import client, render


def ps() -> None:
    """List running models."""
    with client.failing("Failed to list running models"):
        running = client.ps()
    render.out(render.ps_table(running))
