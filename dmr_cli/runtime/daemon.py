"""Starting `dmr serve` in the background (the CLI's auto-start)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

# Kept so the CLI can notice a daemon that dies during start-up (and to reap it).
_spawned: dict[int, subprocess.Popen[bytes]] = {}


def spawn_daemon(log_path: Path, pid_path: Path, args: Sequence[str]) -> int:
    """Start `python -m dmr_cli serve ARGS` detached from this terminal; return its pid.

    It runs in a new session so that Ctrl-C in the shell that started it does not reach it,
    with stdout and stderr appended to `log_path`, and its pid written to `pid_path`.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pid_path.parent.mkdir(parents=True, exist_ok=True)
    creationflags = 0
    if sys.platform == "win32":
        creationflags = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.DETACHED_PROCESS
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dmr_cli", "serve", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            close_fds=True,
            start_new_session=True,
            creationflags=creationflags,
        )
    _spawned[proc.pid] = proc
    pid_path.write_text(f"{proc.pid}\n")
    return proc.pid


def daemon_exit_status(pid: int) -> int | None:
    """The exit status of a daemon this process spawned, or None while it runs."""
    proc = _spawned.get(pid)
    return proc.poll() if proc else None
