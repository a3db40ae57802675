"""Runner discovery order: LLAMA_SERVER_PATH, installed variant, installed cpu, PATH, embedded."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dmr_cli.errors import DmrError
from dmr_cli.runtime import install
from dmr_cli.runtime.detect import Detection
from dmr_cli.runtime.install import discover, installed_variants, parse_version

CUDA = Detection(accelerator="cuda", variant="cuda", devices=[], reasons={}, reason="test")
CPU = Detection(accelerator="cpu", variant="cpu", devices=[], reasons={}, reason="test")


def fake_server(path: Path, version_line: str = "version: 4321 (fedcba9)") -> Path:
    """An executable that answers `--version` like llama-server (on stderr)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho '{version_line}' >&2\necho 'built with cc' >&2\n")
    path.chmod(0o755)
    return path


def install_variant(runners: Path, variant: str, version: str, *, lib: bool = True) -> Path:
    root = runners / variant
    binary = fake_server(root / "bin" / "llama-server")
    if lib:
        (root / "lib").mkdir()
        (root / "lib" / "libggml-base.so").write_bytes(b"\x7fELF")
    record = {
        "tag": f"{version}-{variant}",
        "digest": None,
        "variant": variant,
        "version": version,
        "commit": "0123abc",
        "source": "image",
        "installed_at": "2026-01-02T03:04:05Z",
    }
    (root / ".llamacpp_version").write_text(json.dumps(record))
    return binary


@pytest.fixture
def runners(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty runner dir, an empty PATH dir, no LLAMA_SERVER_PATH."""
    root = tmp_path / "runners"
    monkeypatch.setenv("DMR_RUNNER_DIR", str(root))
    monkeypatch.delenv("LLAMA_SERVER_PATH", raising=False)
    path_dir = tmp_path / "path"
    path_dir.mkdir()
    monkeypatch.setenv("PATH", str(path_dir))
    return root


def no_llama_cpp(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "llama_cpp" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


# -- 1. LLAMA_SERVER_PATH -----------------------------------------------------------------


def test_llama_server_path_binary_wins_over_installed(
    runners: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_variant(runners, "cuda", "b9879")
    binary = fake_server(tmp_path / "custom" / "my-llama-server")
    monkeypatch.setenv("LLAMA_SERVER_PATH", str(binary))
    found = discover(CUDA)
    assert (found.kind, found.path, found.source) == ("native", binary, "LLAMA_SERVER_PATH")
    assert (found.version, found.commit) == ("b4321", "fedcba9")
    assert found.lib_dir is None


def test_llama_server_path_dir_prefers_llama_server(
    runners: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = tmp_path / "app"
    docker_name = fake_server(app / "com.docker.llama-server", "version: 7 (aaaaaaa)")
    monkeypatch.setenv("LLAMA_SERVER_PATH", str(app))
    assert discover(CPU).path == docker_name
    plain = fake_server(app / "llama-server", "version: 8 (bbbbbbb)")
    (app / "libggml-cpu.so").write_bytes(b"\x7fELF")  # plugins beside the binary, as in /app
    found = discover(CPU)
    assert (found.path, found.version, found.lib_dir) == (plain, "b8", app)


def test_llama_server_path_bin_dir_uses_sibling_lib(
    runners: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = install_variant(tmp_path / "elsewhere", "vulkan", "b1111")
    monkeypatch.setenv("LLAMA_SERVER_PATH", str(binary.parent))
    found = discover(CPU)
    # The record beside it names the variant and version: no need to run the binary.
    assert (found.path, found.variant, found.version, found.commit) == (
        binary,
        "vulkan",
        "b1111",
        "0123abc",
    )
    assert found.lib_dir == binary.parent.parent / "lib"


def test_llama_server_path_that_is_wrong_is_an_error(
    runners: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_variant(runners, "cpu", "b9879")
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("LLAMA_SERVER_PATH", str(tmp_path / "empty"))
    with pytest.raises(DmrError, match=r"LLAMA_SERVER_PATH=.*empty is not a llama-server"):
        discover(CPU)
    not_executable = tmp_path / "llama-server"
    not_executable.write_text("#!/bin/sh\n")
    monkeypatch.setenv("LLAMA_SERVER_PATH", str(not_executable))
    with pytest.raises(DmrError, match="LLAMA_SERVER_PATH"):
        discover(CPU)


# -- 2./3. installed variants -------------------------------------------------------------


def test_installed_variant_for_the_accelerator_then_cpu(runners: Path) -> None:
    cpu = install_variant(runners, "cpu", "b9000", lib=False)
    cuda = install_variant(runners, "cuda", "b9879")
    found = discover(CUDA)
    assert (found.kind, found.path, found.variant, found.source) == (
        "native",
        cuda,
        "cuda",
        "installed",
    )
    assert (found.version, found.commit, found.lib_dir) == (
        "b9879",
        "0123abc",
        cuda.parents[1] / "lib",
    )
    # A CPU machine ignores the cuda variant.
    found = discover(CPU)
    assert (found.path, found.variant, found.version, found.lib_dir) == (cpu, "cpu", "b9000", None)
    # A CUDA machine without the cuda variant falls back to cpu.
    install.uninstall("cuda")
    assert discover(CUDA).path == cpu


def test_half_installed_variant_is_skipped(runners: Path) -> None:
    cpu = install_variant(runners, "cpu", "b9000")
    broken = install_variant(runners, "cuda", "b9879")
    broken.chmod(0o644)  # not executable
    assert discover(CUDA).path == cpu
    broken.unlink()
    assert discover(CUDA).path == cpu
    assert set(installed_variants()) == {"cpu"}


def test_installed_variants_reads_records(runners: Path) -> None:
    assert installed_variants() == {}
    install_variant(runners, "cpu", "b9000")
    binary = fake_server(runners / "rocm" / "bin" / "llama-server")  # copied by hand, no record
    variants = installed_variants()
    assert variants["cpu"]["tag"] == "b9000-cpu" and variants["cpu"]["source"] == "image"
    assert variants["rocm"] == {"variant": "rocm", "version": "unknown"}
    assert binary.exists()


# -- 4. PATH ------------------------------------------------------------------------------


def test_llama_server_on_path(runners: Path, tmp_path: Path) -> None:
    on_path = fake_server(
        tmp_path / "path" / "llama-server", "version: 0.5.0-dev (build 1, commit 0c1e570)"
    )
    found = discover(CUDA)
    assert (found.kind, found.path, found.source) == ("native", on_path, "PATH")
    assert (found.variant, found.version, found.commit) == ("unknown", "0.5.0-dev", "0c1e570")
    # An installed cpu variant comes before PATH.
    cpu = install_variant(runners, "cpu", "b9000")
    assert discover(CUDA).path == cpu


def test_binary_on_path_that_fails_version_is_unknown(runners: Path, tmp_path: Path) -> None:
    broken = tmp_path / "path" / "llama-server"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    found = discover(CPU)
    assert (found.path, found.version, found.commit) == (broken, "unknown", None)


# -- 5. embedded --------------------------------------------------------------------------


def test_embedded_engine_last(runners: Path) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is a test dependency of the embedded engine")
    found = discover(CUDA)
    assert (found.kind, found.path, found.variant, found.source) == (
        "embedded",
        None,
        "embedded",
        "embedded",
    )
    assert found.version == importlib.metadata.version("llama_cpp_python")
    assert found.to_json()["path"] is None


def test_nothing_at_all_is_an_error_with_the_install_hint(
    runners: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_llama_cpp(monkeypatch)
    with pytest.raises(DmrError) as caught:
        discover(CPU)
    assert "no llama.cpp runner" in caught.value.message
    assert caught.value.hint and "dmr install-runner" in caught.value.hint


def test_discovery_does_not_import_llama_cpp(runners: Path) -> None:
    """Finding the embedded engine must not pay for importing it (seconds)."""
    code = (
        "import sys\n"
        "from dmr_cli.runtime.detect import Detection\n"
        "from dmr_cli.runtime.install import discover\n"
        "found = discover(Detection('cpu', 'cpu', [], {}, 'test'))\n"
        "print(found.kind, 'llama_cpp' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ)
    )
    assert result.stdout.split() == ["embedded", "False"], result.stderr


# -- version parsing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("version: 1234 (abcdef0)\nbuilt with GNU 12.2.0 for Linux x86_64", ("b1234", "abcdef0")),
        ("version: 0.5.0-dev (build 1, commit 0c1e570)", ("0.5.0-dev", "0c1e570")),
        ("version: 0.5.0 (build 9879, commit 1a2b3c4)", ("b9879", "1a2b3c4")),
        ("version: 42 (unknown)", ("b42", None)),
        ("no version here", ("unknown", None)),
    ],
)
def test_parse_version(text: str, expected: tuple[str, str | None]) -> None:
    assert parse_version(text) == expected


def test_uninstall(runners: Path) -> None:
    install_variant(runners, "cpu", "b9000")
    install_variant(runners, "cuda", "b9879")
    with pytest.raises(DmrError, match="vulkan is not installed"):
        install.uninstall("vulkan")
    with pytest.raises(DmrError, match=r"unknown llama\.cpp variant"):
        install.uninstall("tpu")
    assert install.uninstall("cuda") == ["cuda"]
    assert sorted(os.listdir(runners)) == ["cpu"]
    assert install.uninstall(None) == ["cpu"]
    assert install.uninstall(None) == []
    assert os.listdir(runners) == []
