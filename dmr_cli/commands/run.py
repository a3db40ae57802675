"""`dmr run MODEL [PROMPT...]`."""

from __future__ import annotations

import sys
from typing import Annotated

from dmr_cli import chat, client, render
from dmr_cli.commands._params import Argument, Option, usage_error
from dmr_cli.errors import BadRequest


def run(
    model: Annotated[str, Argument(metavar="MODEL", help="Model to run")],
    prompt: Annotated[
        list[str] | None,
        Argument(metavar="PROMPT", help="Prompt words (joined by spaces)", show_default=False),
    ] = None,
    color: Annotated[
        str, Option("--color", metavar="auto|yes|no", help="Use colored output")
    ] = "auto",
    detach: Annotated[
        bool,
        Option("--detach", "-d", help="Load the model in the background without interaction"),
    ] = False,
    debug: Annotated[bool, Option("--debug", help="Enable debug logging")] = False,
) -> None:
    """Run a model and interact with it using a submitted prompt or chat mode.

    With a PROMPT, or with input piped on stdin (appended to the PROMPT after a blank line),
    the answer streams to stdout and nothing else goes there: the token-usage line, notices
    and, when stdout is not a terminal, the model's reasoning go to stderr. Without either,
    on a terminal, a chat starts: type /? for help. A model that is not local is pulled
    first.
    """
    if color not in chat.COLOR_MODES:
        raise usage_error(f"must be one of: auto, yes, no (got {color!r})", "'--color'")
    typed = " ".join(prompt or [])
    question = None
    if not detach and (typed or not sys.stdin.isatty()):
        piped = "" if sys.stdin.isatty() else sys.stdin.buffer.read().decode("utf-8", "replace")
        question = chat.compose_prompt(typed, piped)
        if not question.text.strip() and not question.images:
            raise BadRequest(
                "nothing to ask: the prompt is empty", hint=f'dmr run {model} "PROMPT"'
            )
    chat.ensure_local(model)
    if detach:
        with client.failing("Failed to load model"):
            client.preload(model)
        if debug:
            render.err(f"Model {model} loaded successfully")
        return
    use_color = chat.use_color(color, sys.stdout)
    if question is None:
        if debug:
            render.err(f"Running model {model}")
        chat.interactive(model, color=use_color)
    else:
        if debug:
            render.err(f"Running model {model} with prompt {question.text}")
        chat.one_shot(model, question, color=use_color)
