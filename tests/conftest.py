from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.daemon import Daemon, start_daemon
from tests.helpers.registry import RunningRegistry, start_registry


@pytest.fixture(autouse=True)
def _no_user_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The developer's own config.toml must not steer in-process tests."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.getbasetemp() / "xdg-config"))
    monkeypatch.delenv("DMR_CONFIG", raising=False)


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


TEST_CACHE = Path(os.environ.get("DMR_TEST_CACHE", Path.home() / ".cache" / "dmr-test"))


@pytest.fixture(scope="session")
def native_llama_server() -> Path:
    """llama-server built from source by `dmr install-runner --from-source`, cached outside
    the temp dirs so later runs on the same machine reuse it (the first build takes ~10 min)."""
    runner_dir = TEST_CACHE / "runners"
    binary = runner_dir / "cpu" / "bin" / "llama-server"
    if not binary.exists():
        env = {
            **os.environ,
            "DMR_RUNNER_DIR": str(runner_dir),
            "DMR_BUILD_CACHE": str(TEST_CACHE / "build-cache"),
        }
        subprocess.run(
            [sys.executable, "-m", "dmr_cli", "install-runner", "--from-source", "--gpu", "cpu"],
            env=env,
            check=True,
            timeout=3600,
        )
    assert binary.exists()
    return binary
