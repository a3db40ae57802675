"""`dmr package --gguf FILE TARGET`: build a model artifact, load it locally or push it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from dmr_cli import client, config, render
from dmr_cli.commands._params import Argument, Option

if TYPE_CHECKING:
    from dmr_cli.distribution.artifact import Artifact
    from dmr_cli.reference import Reference


def _file(*names: str, help: str) -> Any:
    """An option naming an existing file; relative paths are resolved against the cwd."""
    return Option(*names, help=help, exists=True, dir_okay=False, readable=True, resolve_path=True)


Target = Annotated[
    str, Argument(metavar="TARGET", help="Reference for the model: [REGISTRY/]ORG/NAME[:TAG]")
]
Gguf = Annotated[Path, _file("--gguf", help="GGUF file (first shard of a sharded model)")]
Licenses = Annotated[list[Path] | None, _file("--license", "-l", help="License file (repeatable)")]
ChatTemplate = Annotated[Path | None, _file("--chat-template", help="Jinja chat template")]
Mmproj = Annotated[Path | None, _file("--mmproj", help="Multimodal projector")]
ContextSize = Annotated[int | None, Option(min=1, help="Context size in tokens")]
Push = Annotated[bool, Option("--push", help="Push to the registry instead of loading locally")]


def package(
    target: Target,
    gguf: Gguf,
    licenses: Licenses = None,
    chat_template: ChatTemplate = None,
    mmproj: Mmproj = None,
    context_size: ContextSize = None,
    push: Push = False,
) -> None:
    """Package a GGUF file into a model OCI artifact."""
    from dmr_cli.distribution.artifact import build_gguf_artifact
    from dmr_cli.reference import parse_reference

    ref = parse_reference(target)  # fail before hashing gigabytes
    inputs: list[tuple[str, Path | None]] = [("GGUF file", gguf)]
    inputs += [("license file", path) for path in licenses or []]
    inputs += [("chat template", chat_template), ("multimodal projector", mmproj)]
    for what, path in inputs:
        if path:
            render.err(f'Adding {what} from "{path}"')
    artifact = build_gguf_artifact(
        gguf,
        licenses=licenses or [],
        chat_template=chat_template,
        mmproj=mmproj,
        context_size=context_size,
    )
    display = render.progress_display()
    try:
        with client.failing("Failed to package model"):
            message = (_push if push else _load)(artifact, ref, display)
    finally:
        display.close()
    render.out(message)


def _push(artifact: Artifact, ref: Reference, display: render.ProgressDisplay) -> str:
    from dmr_cli.distribution.push import push_artifact

    render.err("Pushing model to registry...")
    token = config.env("HF_TOKEN") if ref.is_huggingface else ""
    push_artifact(artifact, str(ref), display.update, bearer_token=token or None)
    return "Model pushed successfully"


def _load(artifact: Artifact, ref: Reference, display: render.ProgressDisplay) -> str:
    from dmr_cli.distribution.tarball import write_model_tar

    render.err("Loading model to Model Runner...")
    message = client.load(
        lambda out: write_model_tar(out, artifact.manifest, artifact.blobs()), display.update
    )
    client.tag(artifact.id, ref.name, ref.tag or "latest")
    return message
