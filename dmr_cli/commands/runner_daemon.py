"""`dmr start-runner`, `stop-runner`, `restart-runner`: the background daemon."""

from __future__ import annotations

from typing import Annotated

from dmr_cli import client, config, render
from dmr_cli.commands._params import Option
from dmr_cli.errors import Conflict, DaemonUnavailable

Host = Annotated[str | None, Option(help="Address to listen on [default: 127.0.0.1]")]
Port = Annotated[
    int | None,
    Option(
        min=1,
        max=65535,
        show_default=False,
        help="TCP port [default: the port of MODEL_RUNNER_HOST, else 12434]",
    ),
]
DEFAULT_HOST = "127.0.0.1"


def start_runner(host: Host = None, port: Port = None) -> None:
    """Start the dmr daemon in the background."""
    from dmr_cli.runtime.daemon import running_daemon

    running = running_daemon()
    if running is not None:
        raise Conflict(
            f"the dmr daemon is already running (pid {running.pid}) on "
            f"{_url(*_address(running.args))}",
            hint="restart it with: dmr restart-runner, or stop it with: dmr stop-runner",
        )
    _start(host or DEFAULT_HOST, port or _default_port())


def stop_runner() -> None:
    """Stop the background dmr daemon."""
    _stop()


def restart_runner(host: Host = None, port: Port = None) -> None:
    """Restart the background dmr daemon (on the same address unless told otherwise)."""
    args = _stop()
    old_host, old_port = _address(args or [])
    _start(host or old_host, port or old_port)


def _start(host: str, port: int) -> None:
    at = client.parse_endpoint(_url(host, port))
    try:
        client.send("GET", "/models", at=at, timeout=client.CONNECT_TIMEOUT)
    except DaemonUnavailable:
        pass  # the address is free
    else:
        raise Conflict(
            f"something already answers on {at.url}",
            hint="a daemon started by hand (dmr serve)? Stop it, or choose another --port",
        )
    pid = client.start_daemon(["--host", host, "--port", str(port)], at=at)
    render.out(f"The dmr daemon is running (pid {pid}) on {at.url}")
    if at.url != client.endpoint().url:
        render.err(f"Hint: set MODEL_RUNNER_HOST={at.url} for dmr commands to use it")


def _stop() -> list[str] | None:
    """Stop the daemon the pid file names; its `serve` arguments, None if none ran."""
    from dmr_cli.runtime.daemon import STOP_GRACE, running_daemon, stop_daemon

    running = running_daemon()
    if running is None:
        render.out("The dmr daemon is not running")
        return None
    if stop_daemon(running):
        render.err(f"It did not stop within {STOP_GRACE:g} s of SIGTERM: killed it")
    render.out(f"Stopped the dmr daemon (pid {running.pid})")
    return running.args


def _default_port() -> int:
    ep = client.endpoint()
    return ep.port if ep.scheme == "http" else config.DEFAULT_PORT


def _address(args: list[str]) -> tuple[str, int]:
    """Host and port in `dmr serve` arguments, with the defaults where they are missing."""
    values = {"--host": DEFAULT_HOST, "--port": str(_default_port())}
    for i, arg in enumerate(args):
        name, equals, value = arg.partition("=")
        if name in values:
            values[name] = value if equals else (args[i + 1] if i + 1 < len(args) else "")
    port = values["--port"]
    return values["--host"], int(port) if port.isdigit() else config.DEFAULT_PORT


def _url(host: str, port: int) -> str:
    """The URL to reach a daemon listening on HOST: loopback for the wildcard addresses."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
