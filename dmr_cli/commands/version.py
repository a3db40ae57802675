"""`dmr version`."""

from __future__ import annotations

import os
import sys

from dmr_cli import __version__, client, render

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def os_arch() -> str:
    """Go's GOOS/GOARCH spelling, as DMR prints it."""
    system = {"win32": "windows", "cygwin": "windows"}.get(sys.platform, sys.platform)
    if hasattr(os, "uname"):
        machine = os.uname().machine
    else:
        machine = os.environ.get("PROCESSOR_ARCHITECTURE", "")
    return f"{system}/{_ARCH.get(machine.lower(), machine.lower())}"


def version() -> None:
    """Show the dmr client and daemon versions."""
    server = client.server_version()
    render.out(
        f"Client:\n Version:    {__version__}\n OS/Arch:    {os_arch()}\n\n"
        f"Server:\n Version:    {server or '(not reachable)'}\n"
        f" Engine:     {client.engine_kind()}"
    )
