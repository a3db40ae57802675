"""`dmr df`."""

from __future__ import annotations

from dmr_cli import client, render


def df() -> None:
    """Show the disk space used by models and inference engines."""
    with client.failing("Failed to get disk usage"):
        usage = client.disk_usage()
    render.out(render.disk_usage(usage))
