"""The `dmr` command line: the root Typer app, its fast path, and the one error boundary.

Start-up time is a requirement (performance.md §3). Importing typer costs ~55 ms, and typer
0.29 imports pydantic (~95 ms more) to coerce any parameter that is not a boolean flag. So
the model-management commands are run here without typer when their arguments are plain
flags and words (`FAST_COMMANDS`). Everything else (help, unknown or combined flags, missing
arguments, the other commands) goes through typer, which then also reports usage errors.
Nothing heavy is imported at module level: commands import httpx, rich, the server stack or
gguf inside the functions that need them.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

from dmr_cli import __version__, render
from dmr_cli.commands._params import Option
from dmr_cli.errors import DmrError

if TYPE_CHECKING:
    import typer

# The shell completion protocol's variable (typer's name for it; see dmr_cli/completion.py).
COMPLETE_VAR = "_DMR_COMPLETE"


class FastCommand(NamedTuple):
    """How to call a command without typer."""

    function: str  # "module:function"
    flags: dict[str, str]  # flag → boolean parameter
    # Positional parameters in order: "name", "name?" (optional), "name..." (one or more).
    arguments: tuple[str, ...] = ()
    exclusive: frozenset[str] = frozenset()  # boolean parameters that cannot be combined


_LS = FastCommand(
    "dmr_cli.commands.ls:ls",
    {"--json": "json_output", "--openai": "openai", "-q": "quiet", "--quiet": "quiet"},
    ("model?",),
    frozenset({"quiet", "openai"}),
)
_REMOTE = {"-r": "remote", "--remote": "remote"}
FAST_COMMANDS = {
    "ls": _LS,
    "list": _LS,
    "df": FastCommand("dmr_cli.commands.df:df", {}),
    "rm": FastCommand(
        "dmr_cli.commands.rm:rm", {"-f": "force", "--force": "force"}, ("models...",)
    ),
    "inspect": FastCommand(
        "dmr_cli.commands.inspect:inspect",
        {"--openai": "openai", **_REMOTE},
        ("model",),
        frozenset({"openai", "remote"}),
    ),
    "show": FastCommand("dmr_cli.commands.show:show", _REMOTE, ("model",)),
    "tag": FastCommand("dmr_cli.commands.tag:tag", {}, ("source", "target")),
    "pull": FastCommand("dmr_cli.commands.pull:pull", {}, ("model",)),
    "push": FastCommand("dmr_cli.commands.push:push", {}, ("model",)),
    "version": FastCommand("dmr_cli.commands.version:version", {}),
    "status": FastCommand("dmr_cli.commands.status:status", {"--json": "json_output"}),
    "ps": FastCommand("dmr_cli.commands.ps:ps", {}),
    "logs": FastCommand(
        "dmr_cli.commands.logs:logs",
        {"-f": "follow", "--follow": "follow", "--no-engines": "no_engines"},
    ),
}


def fast_call(args: Sequence[str]) -> functools.partial[None] | None:
    """The call for ARGS when they need no parsing beyond flags and plain words, else None."""
    if list(args) == ["--version"]:
        return functools.partial(_print_version)
    spec = FAST_COMMANDS.get(args[0]) if args else None
    if spec is None:
        return None
    kwargs: dict[str, Any] = {}
    words: list[str] = []
    for arg in args[1:]:
        if arg in spec.flags:
            kwargs[spec.flags[arg]] = True
        elif arg.startswith("-"):
            return None  # --help, a typo, `-qf`, `--`: typer parses and explains
        else:
            words.append(arg)
    if sum(bool(kwargs.get(name)) for name in spec.exclusive) > 1:
        return None
    for name in spec.arguments:
        if name.endswith("..."):
            kwargs[name[:-3]], words = words, []
            if not kwargs[name[:-3]]:
                return None
        elif words:
            kwargs[name.rstrip("?")] = words.pop(0)
        elif not name.endswith("?"):
            return None  # a missing argument: typer names it
    if words:
        return None  # too many arguments
    module, _, name = spec.function.partition(":")
    return functools.partial(getattr(importlib.import_module(module), name), **kwargs)


def _print_version() -> None:
    render.out(f"dmr version {__version__}")


def _version_option(value: bool) -> None:
    if value:
        import typer

        _print_version()
        raise typer.Exit()


def _root(
    version: Annotated[
        bool,
        Option(
            "--version", callback=_version_option, is_eager=True, help="Print the version and exit"
        ),
    ] = False,
) -> None:
    """Pull, manage and serve LLMs as OCI artifacts (a Python Docker Model Runner)."""


def build_app() -> typer.Typer:
    """The root Typer app with every command."""
    import typer

    from dmr_cli.commands import (
        bench,
        configure,
        df,
        inspect,
        install_runner,
        logs,
        ls,
        package,
        ps,
        pull,
        purge,
        push,
        requests,
        rm,
        run,
        runner_daemon,
        serve,
        service,
        show,
        status,
        tag,
        unload,
        version,
    )

    app = typer.Typer(
        name="dmr",
        add_completion=False,  # completions/ ships the scripts; typer's would cost start-up
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    app.command("pull")(pull.pull)
    app.command("push")(push.push)
    app.command("list")(ls.ls)
    app.command("ls", hidden=True)(ls.ls)
    app.command("rm")(rm.rm)
    app.command("inspect")(inspect.inspect)
    app.command("show")(show.show)
    app.command("tag")(tag.tag)
    app.command("df")(df.df)
    app.command("purge")(purge.purge)
    app.command("package")(package.package)
    app.command("run")(run.run)
    app.command("bench")(bench.bench)
    app.command("version")(version.version)
    app.command("status")(status.status)
    app.command("ps")(ps.ps)
    app.command("unload")(unload.unload)
    app.command("stop", hidden=True)(unload.unload)
    app.command("logs")(logs.logs)
    app.command("requests")(requests.requests)
    app.command("configure", cls=configure.command_class())(configure.configure)
    app.command("config", cls=configure.command_class(), hidden=True)(configure.configure)
    app.command("serve")(serve.serve)
    app.add_typer(service.build_app(), name="service")
    app.command("start-runner")(runner_daemon.start_runner)
    app.command("stop-runner")(runner_daemon.stop_runner)
    app.command("restart-runner")(runner_daemon.restart_runner)
    app.command("install-runner")(install_runner.install_runner)
    app.command("uninstall-runner")(install_runner.uninstall_runner)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI; every `DmrError` ends here as `Error: ...` on stderr and its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if os.environ.get(COMPLETE_VAR):  # a script in completions/ asking for completions
            from dmr_cli import completion

            completion.complete(build_app())
        call = fast_call(args)
        if call is None:
            build_app()(args=args, prog_name="dmr")
        else:
            call()
    except DmrError as e:
        render.error(e.message, e.hint)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (`dmr ls | head -1`): stop quietly, as typer does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
