"""`dmr configure MODEL [OPTIONS] [-- FLAGS...]`, `dmr configure show [MODEL]` (the daemon's
runner configurations) and `dmr configure show --settings` (dmr's own settings)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

from dmr_cli import client, config, render
from dmr_cli.commands._params import Argument, Option, usage_error
from dmr_cli.runtime.config import MODES

if TYPE_CHECKING:
    import typer.core

# Stands for the `--` the user typed: click drops it, and what follows it are llama.cpp
# flags, not more arguments (see `command_class`).
DASH = "--"


def command_class() -> type[typer.core.TyperCommand]:
    """The click command class for `configure`: it keeps the `--` in the arguments, so the
    command can tell `MODEL -- FLAGS...` from stray words."""
    import typer.core

    class ConfigureCommand(typer.core.TyperCommand):
        def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
            if DASH in args:
                i = args.index(DASH)
                args = [*args[:i], DASH, DASH, *args[i + 1 :]]  # click eats the first one
            return super().parse_args(ctx, args)

        def collect_usage_pieces(self, ctx: Any) -> list[str]:
            return ["[OPTIONS]", "MODEL", "[-- FLAGS...]", "|", "show", "[MODEL]"]

    return ConfigureCommand


def configure(
    args: Annotated[
        list[str],
        Argument(
            metavar="MODEL",
            show_default=False,
            help="The model (or: show [MODEL]); llama.cpp flags go after --",
        ),
    ],
    context_size: Annotated[
        int | None, Option(help="Context size (in tokens)", show_default=False)
    ] = None,
    speculative_draft_model: Annotated[
        str | None, Option(help="Draft model for speculative decoding", show_default=False)
    ] = None,
    speculative_num_tokens: Annotated[
        int | None, Option(help="Number of tokens to predict speculatively", show_default=False)
    ] = None,
    speculative_min_acceptance_rate: Annotated[
        float | None,
        Option(help="Minimum acceptance rate for speculative decoding", show_default=False),
    ] = None,
    hf_overrides: Annotated[
        str | None,
        Option(
            "--hf_overrides",
            "--hf-overrides",
            help="Hugging Face model config overrides (JSON), vLLM only",
            show_default=False,
        ),
    ] = None,
    gpu_memory_utilization: Annotated[
        float | None,
        Option(
            min=0.0, max=1.0, help="Fraction of GPU memory to use, vLLM only", show_default=False
        ),
    ] = None,
    think: Annotated[
        bool | None,
        Option("--think/--no-think", help="Enable or disable reasoning", show_default=False),
    ] = None,
    mode: Annotated[
        str | None, Option(help=f"Backend mode ({', '.join(MODES)})", show_default=False)
    ] = None,
    keep_alive: Annotated[
        str | None,
        Option(
            help="How long to keep the model loaded when idle (5m, 1h; 0: unload after each "
            "request; -1: never)",
            show_default=False,
        ),
    ] = None,
    show_settings: Annotated[
        bool,
        Option(
            "--settings",
            help="With show: print dmr's settings instead, each with its value and source "
            "(default, config file or environment)",
        ),
    ] = False,
) -> None:
    """Configure how a model runs (llama.cpp flags go after --); `configure show [MODEL]`
    prints the stored configurations, `configure show --settings` dmr's own settings."""
    words, flags = (
        (args[: args.index(DASH)], args[args.index(DASH) + 1 :]) if DASH in args else (args, [])
    )
    settings = settings_body(
        context_size=context_size,
        mode=mode,
        keep_alive=keep_alive,
        think=think,
        draft_model=speculative_draft_model,
        num_tokens=speculative_num_tokens,
        min_acceptance_rate=speculative_min_acceptance_rate,
        hf_overrides=hf_overrides,
        gpu_memory_utilization=gpu_memory_utilization,
    )
    if words[:1] == ["show"]:
        if len(words) > 2 or DASH in args or settings or (show_settings and len(words) > 1):
            raise usage_error(
                "takes one optional MODEL, or --settings, and no other options", "'configure show'"
            )
        if show_settings:  # no daemon needed: these are this process's settings
            render.out(render.indented_json(config.report()))
            return
        with client.failing("Failed to get runner configurations"):
            found = client.configs(words[1] if len(words) == 2 else None)
        render.out(render.indented_json(found))
        return
    if show_settings:
        raise usage_error("only goes with show: dmr configure show --settings", "'--settings'")
    if len(words) != 1:
        got = f"{len(words)}: {' '.join(words)}" if words else "none"
        raise usage_error(f"exactly one model must be given before --, got {got}", "'MODEL'")
    body = {"model": words[0], **settings}
    if flags:
        body["runtime-flags"] = flags
    with client.failing("Failed to configure model"):
        client.configure(body)


def settings_body(
    *,
    context_size: int | None,
    mode: str | None,
    keep_alive: str | None,
    think: bool | None,
    draft_model: str | None,
    num_tokens: int | None,
    min_acceptance_rate: float | None,
    hf_overrides: str | None,
    gpu_memory_utilization: float | None,
) -> dict[str, Any]:
    """The spec §2.7 `_configure` fields the options set (the daemon validates values)."""
    body: dict[str, Any] = {}
    if mode is not None:
        if mode.lower() not in MODES:
            raise usage_error(
                f"invalid mode {mode!r}: must be one of {', '.join(MODES)}", "'--mode'"
            )
        body["mode"] = mode.lower()
    if context_size is not None:
        body["context-size"] = context_size
    if draft_model or num_tokens or min_acceptance_rate:
        body["speculative"] = {
            "draft_model": draft_model or "",
            "num_tokens": num_tokens or 0,
            "min_acceptance_rate": min_acceptance_rate or 0.0,
        }
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    vllm: dict[str, Any] = {}
    if hf_overrides is not None:
        try:
            vllm["hf-overrides"] = json.loads(hf_overrides)
        except ValueError as e:
            raise usage_error(f"invalid JSON: {e}", "'--hf_overrides'") from e
    if gpu_memory_utilization is not None:
        vllm["gpu-memory-utilization"] = gpu_memory_utilization
    if vllm:
        body["vllm"] = vllm
    if think is not None:  # DMR's --think: unlimited reasoning (-1), --think=false: none (0)
        body["llamacpp"] = {"reasoning-budget": -1 if think else 0}
    return body
