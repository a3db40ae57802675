"""GET /logs (spec §2.11) on the real daemon: its own log merged with the engine log by
timestamp, the engine log left out on request, and following as lines are written."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from dmr_cli.server.logs import ENGINE_LOG, SERVICE_LOG
from tests.helpers.daemon import Daemon

PAST = "[2000-01-01T00:00:00.000000000Z] engine: before the daemon started\n"
FUTURE = "[2100-01-01T00:00:00.000000000Z] engine: after everything the daemon wrote\n"
LAST = "[2100-01-01T00:00:01.000000000Z] INFO the daemon's last word\n"


def log_dir(daemon: Daemon) -> Path:
    return Path(daemon.env["DMR_STATE_DIR"]) / "logs"


@pytest.fixture
def logs(daemon: Daemon) -> Path:
    """The daemon's log dir, with engine lines before and after the daemon's own."""
    path = log_dir(daemon)
    (path / ENGINE_LOG).write_text(PAST + FUTURE)
    with open(path / SERVICE_LOG, "a") as f:  # the daemon appends too: whole lines interleave
        f.write(LAST)
    return path


def test_logs_merges_the_daemon_and_engine_logs_by_timestamp(daemon: Daemon, logs: Path) -> None:
    r = httpx.get(daemon.url + "/logs")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    lines = r.text.splitlines(keepends=True)
    assert lines[0] == PAST
    assert lines[-2:] == [FUTURE, LAST]
    service = (logs / SERVICE_LOG).read_text().splitlines(keepends=True)
    assert lines[1:-2] == service[:-1]  # everything the daemon wrote, in its own order
    assert any(" INFO dmr " in line for line in service)


def test_no_engines_leaves_the_engine_log_out(daemon: Daemon, logs: Path) -> None:
    r = httpx.get(daemon.url + "/logs", params={"no-engines": "true"})
    assert r.status_code == 200
    assert r.text == (logs / SERVICE_LOG).read_text()


def test_bad_booleans_and_a_missing_service_log(daemon: Daemon) -> None:
    r = httpx.get(daemon.url + "/logs", params={"follow": "maybe"})
    assert (r.status_code, r.text) == (400, "invalid value for follow: 'maybe'\n")
    (log_dir(daemon) / SERVICE_LOG).unlink()
    r = httpx.get(daemon.url + "/logs")
    assert (r.status_code, r.text) == (404, "service log not found\n")


@pytest.mark.timeout(60)
def test_follow_streams_lines_as_they_are_written(daemon: Daemon, logs: Path) -> None:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")
    new = f"[{stamp}] engine: a line written while following\n"
    with httpx.stream("GET", daemon.url + "/logs", params={"follow": "true"}, timeout=30) as r:
        assert r.status_code == 200
        seen = []
        for line in r.iter_lines():
            seen.append(line + "\n")
            if line + "\n" == LAST:  # the backlog is out: now write a new line
                with open(logs / ENGINE_LOG, "a") as f:
                    f.write(new)
            if line + "\n" == new:
                break
    assert seen[-1] == new
    assert seen.count(new) == 1


def test_the_cli_reads_a_remote_daemons_logs_through_the_route(daemon: Daemon, logs: Path) -> None:
    done = daemon.cli("logs", "--no-engines")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == (logs / SERVICE_LOG).read_text()
