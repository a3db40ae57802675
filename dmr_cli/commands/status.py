"""`dmr status`: is the daemon running, its backends, and the accelerator it found."""

from __future__ import annotations

from typing import Annotated, Any

from dmr_cli import client, config, render
from dmr_cli.commands._params import Option
from dmr_cli.errors import DaemonUnavailable, DmrError

START_HINT = "start it with: dmr start-runner"


def status(
    json_output: Annotated[bool, Option("--json", help="Format output in JSON")] = False,
) -> None:
    """Check if the Docker Model Runner is running."""
    with client.failing("Failed to get Docker Model Runner status"):
        try:
            backends = client.status()  # never starts a daemon: that would answer the question
        except DaemonUnavailable as e:
            raise DmrError(f"error querying /models: {e.message}", hint=START_HINT) from e
        runtime = client.runtime() if backends is not None else None
    if json_output:
        render.out(render.compact_json(status_json(backends, runtime)))
    elif backends is not None:
        render.out(render.status_text(backends, runtime))
    else:
        render.out("Docker Model Runner is not running")
        render.err(f"Hint: {START_HINT}")
    if backends is None:
        raise SystemExit(1)


def status_json(backends: dict[str, str] | None, runtime: dict[str, Any] | None) -> dict[str, Any]:
    """DMR's `status --json` object, plus dmr's `accelerator` and `runner` when the daemon
    reports them, and `config`: this CLI's settings and where each came from."""
    endpoint = client.endpoint().url + "/v1/"
    out: dict[str, Any] = {
        "running": backends is not None,
        "backends": dict(sorted((backends or {}).items())),
        "kind": client.engine_kind(),
        "endpoint": endpoint,
        "endpointHost": endpoint,
    }
    if runtime:
        out["accelerator"] = runtime.get("accelerator")
        out["runner"] = runtime.get("runner")
    out["config"] = config.report()
    return out
