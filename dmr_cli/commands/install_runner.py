"""`dmr install-runner` and `dmr uninstall-runner`.

They run in this process, not through the daemon: they write the runner directory, and a
running daemon uses the new runner the next time it starts one.
"""

from __future__ import annotations

from typing import Annotated, Any

from dmr_cli import client, render
from dmr_cli.commands._params import Option, usage_error
from dmr_cli.runtime.install import DEFAULT_LLAMA_SERVER_VERSION, VARIANTS

_GPU_HELP = f"llama.cpp variant: auto (detect the accelerator) or {'|'.join(VARIANTS)}"


def _variant(gpu: str) -> str:
    if gpu == "auto":
        from dmr_cli.runtime.detect import detect

        detection = detect()
        render.err(f"Accelerator: {detection.accelerator} ({detection.reason})")
        return detection.variant
    if gpu not in VARIANTS:
        raise usage_error(f"expected auto or one of {', '.join(VARIANTS)}", "'--gpu'")
    return gpu


def install_runner(
    gpu: Annotated[str, Option("--gpu", help=_GPU_HELP)] = "auto",
    llama_server_version: Annotated[
        str, Option("--llama-server-version", help="llama.cpp release of the runner image")
    ] = DEFAULT_LLAMA_SERVER_VERSION,
    from_source: Annotated[
        bool,
        Option("--from-source", help="Build llama-server here (needs cmake and a C++ compiler)"),
    ] = False,
) -> None:
    """Install the llama.cpp runner (llama-server) for this machine's accelerator."""
    from dmr_cli.runtime import build, install

    variant = _variant(gpu)
    record: dict[str, Any]
    with client.failing("Failed to install the llama.cpp runner"):
        if from_source:
            display = render.build_progress_display()
            try:
                record = build.install_from_source(variant, display.update)
            finally:
                display.close()
        else:
            display = render.progress_display()
            try:
                record = install.install_from_image(variant, llama_server_version, display.update)
            finally:
                display.close()
    where = install.variant_dir(variant)
    what = f"llama.cpp runner {variant} {record.get('version')} ({record.get('tag')})"
    if record.get("changed"):
        render.out(f"Installed {what} in {where}")
    else:
        render.out(f"The {what} is already installed in {where}")


def uninstall_runner(
    gpu: Annotated[
        str | None, Option("--gpu", help=f"Variant to remove ({'|'.join(VARIANTS)}); default all")
    ] = None,
) -> None:
    """Remove installed llama.cpp runners."""
    from dmr_cli.config import runner_dir
    from dmr_cli.runtime import install

    if gpu is not None and gpu not in VARIANTS:
        raise usage_error(f"expected one of {', '.join(VARIANTS)}", "'--gpu'")
    with client.failing("Failed to uninstall the llama.cpp runner"):
        removed = install.uninstall(gpu)
    if not removed:
        render.out("No llama.cpp runner is installed")
    for variant in removed:
        render.out(f"Removed llama.cpp runner {variant} from {runner_dir() / variant}")
