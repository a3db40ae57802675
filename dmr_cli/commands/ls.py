"""`dmr ls` / `dmr list`."""

from __future__ import annotations

from typing import Annotated, Any

from dmr_cli import client, render
from dmr_cli.commands._params import Argument, Option, usage_error


def ls(
    model: Annotated[
        str | None, Argument(metavar="MODEL", help="Only list this model (NAME or NAME:TAG)")
    ] = None,
    json_output: Annotated[bool, Option("--json", help="List models in a JSON format")] = False,
    openai: Annotated[bool, Option("--openai", help="List models in an OpenAI format")] = False,
    quiet: Annotated[bool, Option("--quiet", "-q", help="Only show model IDs")] = False,
) -> None:
    """List the models pulled to your local environment."""
    if quiet and openai:
        raise usage_error("cannot be used with --openai", "'--quiet'")
    with client.failing("Failed to list models"):
        if openai:
            render.out(render.to_json(client.openai_models()))
            return
        models = client.models()
    if model:
        models = filter_models(models, model)
    if json_output:
        render.out(render.to_json(models))
    elif quiet:
        render.out(render.model_ids(models))
    else:
        render.out(render.models_table(models))


def filter_models(models: list[dict[str, Any]], wanted: str) -> list[dict[str, Any]]:
    """Models with a tag equal to WANTED (NAME:TAG) or in its repository (NAME), compared
    after normalisation so `smollm2`, `ai/smollm2` and `docker.io/ai/smollm2` all match."""
    from dmr_cli.reference import canonical_tag, try_canonical

    target = canonical_tag(wanted)
    by_tag = ":" in wanted.rsplit("/", 1)[-1]

    def matches(tag: str) -> bool:
        canon = try_canonical(tag) or tag
        return canon == target if by_tag else canon.rsplit(":", 1)[0] == target.rsplit(":", 1)[0]

    return [m for m in models if any(matches(t) for t in m.get("tags") or [])]
