"""`dmr tag SOURCE TARGET`."""

from __future__ import annotations

from typing import Annotated

from dmr_cli import client, render
from dmr_cli.commands._params import Argument
from dmr_cli.errors import InvalidReference


def tag(
    source: Annotated[str, Argument(metavar="SOURCE", help="Local model (name, tag or ID)")],
    target: Annotated[
        str, Argument(metavar="TARGET", help="New reference: [REGISTRY/]ORG/NAME[:TAG]")
    ],
) -> None:
    """Tag a model."""
    from dmr_cli.reference import normalize_model_name, parse_reference

    target_name = normalize_model_name(target)
    with client.failing("Failed to tag model"):
        ref = parse_reference(target_name)
        if ref.digest:
            raise InvalidReference(f"invalid tag {target!r}: a tag cannot name a digest")
        client.tag(source, ref.name, ref.tag or "latest")
    render.out(f'Model "{normalize_model_name(source)}" tagged successfully with "{target_name}"')
