"""The daemon's log files, merged by timestamp and followed: GET /logs (spec §2.11), and
`dmr logs` reading them directly when the daemon is local.

Both files prefix each line `[2006-01-02T15:04:05.000000000Z] ` (UTC). A line without
that prefix (a traceback, a multi-line message) belongs to the line before it and keeps
its place. Kept free of starlette at module level: the CLI imports it.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from dmr_cli.errors import DmrError, NotFound

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

SERVICE_LOG = "inference.log"
ENGINE_LOG = "inference-llama.cpp-server.log"
FOLLOW_POLL = 0.1  # seconds between looks at the files while following
CHUNK = 64 * 1024  # bytes per response chunk when relaying a long backlog

_STAMP = re.compile(rb"\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z\] ")


class _LogFile:
    """One log file, read from where the last read stopped (again from the start when it
    was truncated or replaced)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._identity: tuple[int, int] | None = None
        self._offset = 0
        self._key = b""  # sort key of the last stamped line

    def entries(self, *, partial: bool) -> Iterator[tuple[bytes, bytes]]:
        """(sort key, line) for each line written since the last read. PARTIAL: include a
        last line without its newline yet (not while following: its rest is coming)."""
        try:
            file = open(self.path, "rb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            return  # the engine log appears with the first runner
        with file:
            st = os.fstat(file.fileno())
            if (st.st_dev, st.st_ino) != self._identity or st.st_size < self._offset:
                self._identity, self._offset, self._key = (st.st_dev, st.st_ino), 0, b""
            file.seek(self._offset)
            for line in file:
                complete = line.endswith(b"\n")
                if not complete and not partial:
                    return
                self._offset += len(line)
                stamp = _STAMP.match(line)
                if stamp:
                    self._key = stamp[1] + b"." + (stamp[2] or b"").ljust(9, b"0")
                yield self._key, line if complete else line + b"\n"


class LogReader:
    """The service log and (optionally) the engine log, merged by timestamp."""

    def __init__(self, log_dir: Path, *, engines: bool = True) -> None:
        service = log_dir / SERVICE_LOG
        if not service.is_file():
            raise NotFound("service log not found", hint=f"no {service}: has the daemon run?")
        self._files = [_LogFile(service)]
        if engines:
            self._files.append(_LogFile(log_dir / ENGINE_LOG))

    def read(self, *, partial: bool = True) -> Iterator[bytes]:
        """The lines written since the last read (all of them the first time), merged.
        A file's own order is kept; on equal times the service log comes first."""
        merged = heapq.merge(
            *(f.entries(partial=partial) for f in self._files), key=lambda entry: entry[0]
        )
        return (line for _, line in merged)


def chunks(lines: Iterator[bytes], size: int = CHUNK) -> Iterator[bytes]:
    """LINES joined into pieces of about SIZE bytes."""
    batch: list[bytes] = []
    length = 0
    for line in lines:
        batch.append(line)
        length += len(line)
        if length >= size:
            yield b"".join(batch)
            batch, length = [], 0
    if batch:
        yield b"".join(batch)


async def _stream(reader: LogReader, follow: bool) -> AsyncIterator[bytes]:
    # File reads go to a thread; while following, a client that hangs up cancels this
    # generator at its next await (starlette listens for the disconnect).
    while True:
        pieces = chunks(reader.read(partial=not follow))
        sent = False
        while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
            sent = True
            yield piece
        if not follow:
            return
        if not sent:
            await asyncio.sleep(FOLLOW_POLL)


async def logs(request: Request) -> Response:
    """GET /logs?follow=&no-engines=: the merged logs as text/plain; with follow, the
    files are tailed and each new piece is flushed as it is written."""
    from starlette.responses import StreamingResponse

    from dmr_cli import config
    from dmr_cli.server.http import error_response, query_bool

    try:
        follow = query_bool(request, "follow")
        no_engines = query_bool(request, "no-engines")
        reader = await asyncio.to_thread(LogReader, config.log_dir(), engines=not no_engines)
    except DmrError as exc:
        return error_response(exc)
    return StreamingResponse(
        _stream(reader, follow),
        media_type="text/plain; charset=utf-8",
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )
