from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.daemon import Daemon, start_daemon
from tests.helpers.registry import RunningRegistry, start_registry


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RunningRegistry]:
    reg = start_registry(tmp_path)
    yield reg
    reg.stop()


@pytest.fixture
def auth_registry(tmp_path: Path) -> Iterator[RunningRegistry]:
    reg = start_registry(tmp_path, htpasswd=("dmr", "s3cret-pass"))
    yield reg
    reg.stop()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path / "home")
    yield d
    d.stop()
