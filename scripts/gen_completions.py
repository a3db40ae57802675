"""Regenerate the shell completion scripts in completions/ from dmr's commands.

    python scripts/gen_completions.py           # write them
    python scripts/gen_completions.py --check   # exit 1 if a checked-in script is stale

`python scripts/gen_docs.py` regenerates these along with the docs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dmr_cli import completion

COMPLETIONS = Path(__file__).resolve().parent.parent / "completions"


def scripts() -> dict[Path, str]:
    """What completions/ should hold: one script per shell."""
    return {
        COMPLETIONS / name: completion.script(shell) for shell, name in completion.FILES.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate completions/.")
    parser.add_argument("--check", action="store_true", help="only report stale scripts")
    args = parser.parse_args(argv)
    expected = scripts()
    if args.check:
        stale = [p for p, text in expected.items() if not p.exists() or p.read_text() != text]
        for path in stale:
            print(f"stale: {path}", file=sys.stderr)
        return 1 if stale else 0
    COMPLETIONS.mkdir(exist_ok=True)
    for path, text in expected.items():
        path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
