"""The code standards: `mypy --strict` on the package (configured in pyproject.toml), ruff clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["dmr_cli", "benches", "tests", "scripts"]


def check(*argv: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_passes_on_the_package() -> None:
    check("mypy")


def test_ruff_finds_nothing() -> None:
    check("ruff", "check", "--no-cache", *SOURCES)


def test_ruff_format_is_applied() -> None:
    check("ruff", "format", "--check", "--no-cache", *SOURCES)
