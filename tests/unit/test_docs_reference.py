"""docs/reference/ is what scripts/gen_docs.py writes from the commands' `--help`, and that
is what `dmr ... --help` prints."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_reference_is_current(gen: ModuleType) -> None:
    pages = gen.reference_pages()
    stale = gen.stale(pages)
    assert stale == [], f"stale: {stale}; regenerate with: python scripts/gen_docs.py"


def test_every_visible_command_has_a_page_listed_in_the_index(gen: ModuleType) -> None:
    index = (ROOT / "docs" / "reference" / "README.md").read_text()
    for path, command, _ in gen._commands():
        page = ROOT / "docs" / "reference" / gen._page_name(path)
        assert page.exists()
        if len(path) > 1:
            assert f"]({page.name})" in index
        assert not command.hidden
    for alias, canonical in (("ls", "list"), ("stop", "unload"), ("config", "configure")):
        page = (ROOT / "docs" / "reference" / f"dmr_{canonical}.md").read_text()
        assert f"Alias: `dmr {alias}`." in page


@pytest.mark.parametrize("args", [[], ["configure"], ["service", "install"]])
def test_a_page_is_what_dmr_prints(gen: ModuleType, args: list[str]) -> None:
    """The in-process rendering agrees with a real `dmr ... --help` in a wide terminal."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    printed = subprocess.run(
        [sys.executable, "-m", "dmr_cli", *args, "--help"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    page = (ROOT / "docs" / "reference" / gen._page_name(["dmr", *args])).read_text()
    block = page.split("```text\n", 1)[1].split("\n```", 1)[0]
    assert block == f"$ {' '.join(['dmr', *args])} --help\n{printed.rstrip()}"


def test_check_mode_names_a_stale_page(
    gen: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gen, "REFERENCE", tmp_path)
    pages = gen.reference_pages()
    for path, text in pages.items():
        path.write_text(text)
    assert gen.stale(pages) == []
    (tmp_path / "dmr_gone.md").write_text("a removed command\n")
    (tmp_path / "dmr_rm.md").write_text("edited by hand\n")
    assert gen.stale(pages) == [tmp_path / "dmr_gone.md", tmp_path / "dmr_rm.md"]
