"""Small filesystem primitives the store is built from: atomic writes and an index lock."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from dmr_cli.errors import DiskFull, StoreError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def translate_os_errors(what: str) -> Iterator[None]:
    """Turn ENOSPC into DiskFull and other OSErrors into a StoreError naming the operation."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left on device while {what}") from exc
        raise StoreError(f"{what}: {exc.strerror or exc}") from exc


def atomic_write(path: Path, data: bytes) -> None:
    """temp file in the same directory → fsync → chmod 0644 → rename (DMR's metadata writes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with translate_os_errors(f"writing {path.name}"):
        fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)


class IndexLock:
    """Serialises index read-modify-write within the process (threads) and across processes.

    The thread lock is re-entrant so store methods can nest; `flock` on a side file makes a
    second process (a CLI `package` or another daemon on the same store) wait its turn.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self._thread_lock:
            if self._depth == 0:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                    os.close(self._fd)
                    self._fd = None


def file_footprint(st: os.stat_result) -> int:
    """Bytes a file occupies on disk (sparse partial downloads count what is written)."""
    return st.st_blocks * 512 if st.st_blocks else st.st_size


def disk_used(root: Path) -> int:
    """`du` of a tree: each (device, inode) once, so hard links are not counted twice."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += file_footprint(st)
    return total
