"""The background daemon: starting `dmr serve` (auto-start, `start-runner`), finding it
from its pid file, and stopping it (`stop-runner`)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from dmr_cli import config
from dmr_cli.errors import DmrError

PID_FILE = "dmr.pid"
LOG_FILE = "daemon.log"
# `dmr serve` stops its runners on SIGTERM; open requests get 5 s of that.
STOP_GRACE = 15.0
KILL_WAIT = 5.0

# Kept so the CLI can notice a daemon that dies during start-up (and to reap it).
_spawned: dict[int, subprocess.Popen[bytes]] = {}


def pid_path() -> Path:
    return config.state_dir() / PID_FILE


def log_path() -> Path:
    """Where the background daemon's stdout and stderr go."""
    return config.log_dir() / LOG_FILE


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


class RunningDaemon(NamedTuple):
    pid: int
    args: list[str]  # what follows `serve` on its command line


def serve_args(cmdline: Sequence[str]) -> list[str] | None:
    """The arguments after `serve` when CMDLINE runs `dmr serve` (the console script or
    `python -m dmr_cli`), else None."""
    for i, arg in enumerate(cmdline[:-1]):
        # The console script, by path: on Windows with backslashes and `.exe`.
        script = arg.replace("\\", "/").rsplit("/", 1)[-1].lower().removesuffix(".exe") == "dmr"
        module = arg == "dmr_cli" and i > 0 and cmdline[i - 1] == "-m"
        if (script or module) and cmdline[i + 1] == "serve":
            return list(cmdline[i + 2 :])
    return None


def _serve_process(pid: int) -> tuple[Any, list[str]] | None:
    """(psutil.Process, serve args) when PID is a live `dmr serve`, else None."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        args = serve_args(proc.cmdline())
    except psutil.Error:  # gone, or not ours to inspect: either way not our daemon
        return None
    return (proc, args) if args is not None else None


def running_daemon(path: Path | None = None) -> RunningDaemon | None:
    """The daemon the pid file names, when that process is alive and is a `dmr serve`.

    A pid file naming anything else (a dead process, or a pid since reused by another
    program) is stale and is removed.
    """
    path = path or pid_path()
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    found = _serve_process(int(text)) if text.isdigit() else None
    if found is None:
        path.unlink(missing_ok=True)
        return None
    return RunningDaemon(found[0].pid, found[1])


def stop_daemon(daemon: RunningDaemon, path: Path | None = None, grace: float = STOP_GRACE) -> bool:
    """SIGTERM the daemon, SIGKILL it if it is still there after GRACE seconds, and remove
    the pid file. Returns whether it had to be killed.

    The process is checked again right before it is signalled, through the same psutil
    handle that signals it (psutil refuses a pid reused since), so nothing but a
    `dmr serve` ever gets a signal from here.
    """
    import psutil

    found = _serve_process(daemon.pid)
    killed = False
    if found is not None:
        proc = found[0]
        try:
            proc.terminate()
            try:
                proc.wait(grace)
            except psutil.TimeoutExpired:
                proc.kill()
                killed = True
                proc.wait(KILL_WAIT)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired as e:
            raise DmrError(f"the dmr daemon (pid {daemon.pid}) did not exit after SIGKILL") from e
    _spawned.pop(daemon.pid, None)
    (path or pid_path()).unlink(missing_ok=True)
    return killed
