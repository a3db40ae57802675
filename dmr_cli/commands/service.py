"""`dmr service install | uninstall | status`: the daemon as a systemd user unit (Linux) or a
launchd agent (macOS), started at login and restarted when it fails."""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from dmr_cli import client, config, render
from dmr_cli.commands._params import Option, usage_error
from dmr_cli.errors import Conflict

if TYPE_CHECKING:
    import typer

    from dmr_cli.runtime.service import ServiceStatus

Host = Annotated[str, Option(help="Address to listen on")]
Port = Annotated[int, Option(min=1, max=65535, help="TCP port")]
ModelsPath = Annotated[
    Path | None,
    Option(
        show_default=False,
        help="Model store [default: $MODELS_PATH when set here, else the user data directory]",
    ),
]
Env = Annotated[
    list[str] | None,
    Option(
        "--env",
        "-e",
        metavar="NAME=VALUE",
        show_default=False,
        help="NAME=VALUE to set in the daemon's environment (repeatable; secrets are refused)",
    ),
]
DryRun = Annotated[
    bool, Option("--dry-run", help="Print the unit (the plist on macOS) instead of installing it")
]
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_PORT_CHECK_TIMEOUT = 1.0


def install(
    host: Host = "127.0.0.1",
    port: Port = config.DEFAULT_PORT,
    models_path: ModelsPath = None,
    env: Env = None,
    dry_run: DryRun = False,
) -> None:
    """Run the dmr daemon as a background service, now and at every login."""
    from dmr_cli.runtime import service

    manager = service.service_manager()
    pairs = service.parse_env(env or [], env_file=manager.env_file)
    spec = service.service_spec(_checked_host(host), port, models_path, pairs)
    if dry_run:
        render.out(manager.render(spec))
        return
    if not manager.status().active:  # a running service frees its port when it restarts
        _check_port_free(host, port)
    manager.install(spec)
    url = f"http://{_client_host(host)}:{port}"
    render.out(
        f"Installed {manager.name} ({manager.path}): dmr serve on {url}, started now and at login"
    )
    journal = f" (and journalctl --user -u {manager.name})" if manager.manager == "systemd" else ""
    render.err(f"Logs: dmr logs{journal}")
    if manager.manager == "systemd":
        render.err(
            "Hint: it stops when you log out unless lingering is on: loginctl enable-linger $USER"
        )
    if url != client.endpoint().url:
        render.err(f"Hint: set MODEL_RUNNER_HOST={url} for dmr commands to use it")


def uninstall() -> None:
    """Stop the background service and remove it."""
    from dmr_cli.runtime import service

    manager = service.service_manager()
    if manager.uninstall():
        render.out(f"Removed {manager.name} ({manager.path})")
    else:
        render.out(f"The dmr service is not installed (no {manager.path})")


def status(
    json_output: Annotated[bool, Option("--json", help="Format output in JSON")] = False,
) -> None:
    """Show whether the service is installed, enabled and running (exit 1 when not running)."""
    from dmr_cli.runtime import service

    state = service.service_manager().status()
    render.out(render.compact_json(state.to_json()) if json_output else _status_text(state))
    if not state.active:
        raise SystemExit(1)


def _status_text(state: ServiceStatus) -> str:
    kind = "systemd user unit" if state.manager == "systemd" else "launchd agent"
    pid = f", pid {state.pid}" if state.pid else ""
    return (
        f"Service:   {state.name} ({kind})\n"
        f"File:      {state.path}\n"
        f"Installed: {'yes' if state.installed else 'no'}\n"
        f"Enabled:   {'yes' if state.enabled else 'no'}\n"
        f"Active:    {state.state}{pid}"
    )


def _checked_host(host: str) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            raise usage_error(
                f"{host!r} is neither an IP address nor a host name", "'--host'"
            ) from None
    return host


def _client_host(host: str) -> str:
    """How a client on this machine reaches a daemon listening on HOST."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _check_port_free(host: str, port: int) -> None:
    address = _client_host(host).strip("[]")
    try:
        socket.create_connection((address, port), timeout=_PORT_CHECK_TIMEOUT).close()
    except OSError:
        return  # nothing listens there
    from dmr_cli.runtime.daemon import running_daemon

    running = running_daemon()
    hint = (
        f"the background daemon (pid {running.pid}) may hold it: stop it with dmr stop-runner"
        if running
        else "stop what listens there (a `dmr serve`?), or choose another --port"
    )
    raise Conflict(f"something already listens on {address}:{port}", hint=hint)


def build_app() -> typer.Typer:
    """The `dmr service` command group."""
    import typer

    app = typer.Typer(
        name="service",
        help="Run the dmr daemon as a background service (systemd user unit, launchd agent).",
        no_args_is_help=True,
        rich_markup_mode=None,
    )
    app.command("install")(install)
    app.command("uninstall")(uninstall)
    app.command("status")(status)
    return app
