"""`typer.Argument` / `typer.Option`, imported only when typer builds the CLI.

Command signatures use these inside postponed (string) annotations, which typer evaluates
when it builds the app. So a command module imports without typer, and `cli`'s fast path can
run `ls`, `df`, `rm` and `version` without paying typer's start-up (performance.md §3).
"""

from __future__ import annotations

from typing import Any


def Argument(*args: Any, **kwargs: Any) -> Any:
    import typer

    return typer.Argument(*args, **kwargs)


def Option(*args: Any, **kwargs: Any) -> Any:
    import typer

    return typer.Option(*args, **kwargs)


def usage_error(message: str, param_hint: str) -> Exception:
    """A usage error (exit 2, with the command's usage) for typer to report."""
    import typer

    return typer.BadParameter(message, param_hint=param_hint)
