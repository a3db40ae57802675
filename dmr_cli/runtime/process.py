"""Runner processes: spawn, log, readiness, and termination that leaves no orphan.

A runner is any process that serves the OpenAI HTTP API on a Unix socket: llama-server, or
the embedded engine (llama-cpp-python). The scheduler never needs to know which.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1
HEALTH_POLL_INTERVAL = 0.002  # DMR polls every 500 ms; a ready runner should be used at once
STDERR_TAIL = 64
PIPE_READ = 64 * 1024
LOG_BATCH = 0.02  # seconds the engine-log pump lets output gather between reads


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the kernel SIGKILLs the runner when the daemon dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the daemon died before prctl took effect
            os._exit(1)


def _orphan_guard(argv: Sequence[str]) -> tuple[Callable[[], None] | None, list[str]]:
    """How to start ARGV so that it dies with the daemon: through util-linux's `setpriv
    --pdeathsig`, which execs the runner in place, or with prctl in a preexec function.
    setpriv is preferred: a preexec function forces a full fork of the daemon, which costs
    ~20 ms for a process of its size, against 0.3 ms for the vfork Popen uses otherwise."""
    if sys.platform != "linux":
        return None, list(argv)
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return _die_with_parent, list(argv)
    return None, [setpriv, "--pdeathsig", "KILL", "--", *argv]


class EngineLog:
    """The engines' shared log file, each line prefixed `[RFC3339 UTC] ` like DMR's."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - lives as long as the daemon

    def write(self, line: bytes) -> None:
        self.write_lines([line])

    def write_lines(self, lines: Sequence[bytes]) -> None:
        """One write for many lines: llama-server logs a dozen lines per request."""
        now = datetime.now(timezone.utc)
        prefix = f"[{now:%Y-%m-%dT%H:%M:%S}.{now.microsecond:06d}000Z] ".encode()
        data = b"".join(prefix + line.rstrip(b"\r\n") + b"\n" for line in lines)
        with self._lock:
            self._file.write(data)

    def close(self) -> None:
        self._file.close()


class RunnerProcess:
    def __init__(self, popen: subprocess.Popen[bytes], log: EngineLog, name: str) -> None:
        self.popen = popen
        self.name = name
        self._log = log
        self._tail: deque[bytes] = deque(maxlen=STDERR_TAIL)
        self._reader = threading.Thread(target=self._pump, args=(popen.stdout,), daemon=True)
        self._reader.start()

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        log: EngineLog,
        name: str,
        cwd: Path | None = None,
    ) -> RunnerProcess:
        """Start a runner. Call from the event loop thread: PDEATHSIG follows the spawning
        thread, and a worker thread that exits would take the runner with it."""
        log.write(f"starting {name}: {' '.join(argv)}".encode())
        preexec, argv = _orphan_guard(argv)
        popen = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,
        )
        return cls(popen, log, name)

    def _pump(self, stream: IO[bytes] | None) -> None:
        """Copy the runner's output to the engine log.

        llama-server writes a dozen lines per request, one write each. Waking for every one
        costs the daemon more CPU than relaying the request, and contends for the GIL with
        the event loop; so the pump reads what is there, then naps, and the pipe collects
        the next batch meanwhile (timestamps lag by at most the nap).
        """
        if stream is None:
            return
        fd, partial = stream.fileno(), b""
        while chunk := os.read(fd, PIPE_READ):
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            if lines:
                self._log.write_lines(lines)
                self._tail.extend(lines[-STDERR_TAIL:])
            time.sleep(LOG_BATCH)
        if partial:
            self._log.write(partial)
            self._tail.append(partial)
        stream.close()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def output_tail(self, limit: int = 4096) -> str:
        self._reader.join(timeout=0.5)  # let the last lines of a dead process arrive
        tail = b"\n".join(line.rstrip(b"\r") for line in self._tail)
        return tail.decode("utf-8", "replace")[-limit:]

    def terminate(self, grace: float = 5.0) -> int:
        """SIGINT (llama-server shuts down cleanly on it), then SIGKILL after `grace`."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait()
        self._log.write(f"{self.name} exited with status {self.popen.returncode}".encode())
        return self.popen.returncode


async def wait_healthy(process: RunnerProcess, socket_path: Path, timeout: float) -> None:
    """Poll GET /health on the runner's socket until it answers 200.

    Raises RuntimeError with the runner's last output if it exits, TimeoutError on timeout.
    """
    deadline = time.monotonic() + timeout
    request = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    while True:
        code = process.poll()
        if code is not None:
            raise RuntimeError(
                f"{process.name} terminated unexpectedly (exit status {code}): "
                f"{process.output_tail()}"
            )
        if socket_path.exists():
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_unix_connection(str(socket_path))
                try:
                    writer.write(request)
                    status_line = await reader.readline()
                finally:
                    writer.close()
                if status_line.split(b" ", 2)[1:2] == [b"200"]:
                    return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{process.name} took too long to initialize ({timeout:.0f} s)")
        await asyncio.sleep(HEALTH_POLL_INTERVAL)
