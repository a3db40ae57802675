"""Argument handling, the error boundary and the daemon connection of the CLI.

The daemon is a stand-in here (a stdlib HTTP server answering with DMR's wire format: plain
text errors, JSON bodies, NDJSON progress); the real one is exercised by tests/e2e/.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dmr_cli import cli, client
from dmr_cli.errors import DaemonUnavailable
from tests.helpers.registry import free_port

MODEL_ID = "sha256:" + "354bf30d0aa3" + "0" * 52
SMOLLM2 = {
    "id": MODEL_ID,
    "tags": ["docker.io/ai/smollm2:latest"],
    "created": 1742816981,
    "config": {"format": "gguf", "parameters": "361.82M", "size": "256.35MiB"},
}


@dataclass
class Reply:
    status: int = 200
    body: bytes | str | Any = b""
    content_type: str = "application/json"
    chunked: bool = False


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class StubDaemon:
    """Answers (METHOD, path?query) from `routes` (a list of replies is served in order),
    anything else with `default`."""

    url: str
    routes: dict[tuple[str, str], Reply | list[Reply]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    default: Reply = field(default_factory=lambda: Reply(404, "404 page not found\n", "text/plain"))

    def reply(self, method: str, path: str) -> Reply:
        found = self.routes.get((method, path))
        if isinstance(found, list):
            return found.pop(0) if len(found) > 1 else found[0]
        return found or self.default


def _handler(stub: StubDaemon) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def handle_one(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if self.headers.get("Transfer-Encoding") == "chunked":
                body = b""
                while size := int(self.rfile.readline().strip(), 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
            else:
                body = self.rfile.read(length)
            stub.requests.append(Request(self.command, self.path, dict(self.headers), body))
            reply = stub.reply(self.command, self.path)
            data = reply.body
            if not isinstance(data, (bytes, str)):
                data = json.dumps(data)
            if isinstance(data, str):
                data = data.encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Connection", "close")
            if reply.chunked:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for line in data.splitlines(keepends=True):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            self.close_connection = True

        do_GET = do_POST = do_DELETE = handle_one

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """A clean CLI environment: no daemon configured yet, state kept under tmp_path."""
    for name in ("MODEL_RUNNER_HOST", "HF_TOKEN", "DMR_NO_AUTO_START", "MODELS_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DMR_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("MODEL_RUNNER_LOG_DIR", str(tmp_path / "state" / "logs"))
    client.endpoint.cache_clear()
    yield monkeypatch
    client.endpoint.cache_clear()


@pytest.fixture
def daemon(env: pytest.MonkeyPatch) -> Iterator[StubDaemon]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    stub = StubDaemon(url=f"http://127.0.0.1:{server.server_address[1]}")
    server.RequestHandlerClass = _handler(stub)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    env.setenv("MODEL_RUNNER_HOST", stub.url)
    client.endpoint.cache_clear()
    yield stub
    server.shutdown()
    server.server_close()


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `dmr ARGS` in-process: (exit code, stdout, stderr)."""
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    out, err = capsys.readouterr()
    return code, out, err


def progress_stream(*events: dict[str, Any]) -> str:
    return "".join(json.dumps(e) + "\n" for e in events)


def layer_event(current: int) -> dict[str, Any]:
    return {
        "type": "progress",
        "message": "Downloaded: 0.00 MB",
        "total": 2000,
        "layer": {"id": "sha256:ab", "size": 2000, "current": current},
        "mode": "pull",
    }


PULLED = {
    "type": "success",
    "message": "Model pulled successfully",
    "total": 0,
    "layer": {"size": 0, "current": 0},
    "mode": "pull",
}


# -- the fast path ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "function", "kwargs"),
    [
        (["ls"], "ls", {}),
        (["list", "--json", "smollm2"], "ls", {"json_output": True, "model": "smollm2"}),
        (["ls", "-q", "ai/x:v1"], "ls", {"quiet": True, "model": "ai/x:v1"}),
        (["rm", "-f", "a", "b"], "rm", {"force": True, "models": ["a", "b"]}),
        (["rm", "a"], "rm", {"models": ["a"]}),
        (["df"], "df", {}),
        (["version"], "version", {}),
        (["inspect", "-r", "ai/x"], "inspect", {"remote": True, "model": "ai/x"}),
        (["inspect", "ai/x", "--openai"], "inspect", {"openai": True, "model": "ai/x"}),
        (["show", "ai/x"], "show", {"model": "ai/x"}),
        (["tag", "ai/x", "me/x:v1"], "tag", {"source": "ai/x", "target": "me/x:v1"}),
        (["pull", "hf.co/a/b"], "pull", {"model": "hf.co/a/b"}),
        (["push", "me/x:v1"], "push", {"model": "me/x:v1"}),
    ],
)
def test_simple_invocations_take_the_fast_path(
    args: list[str], function: str, kwargs: dict[str, Any]
) -> None:
    call = cli.fast_call(args)
    assert call is not None
    assert call.func.__name__ == function
    assert call.keywords == kwargs


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--help"],
        ["ls", "--help"],
        ["ls", "-qj"],
        ["ls", "a", "b"],
        ["ls", "-q", "--openai"],
        ["ls", "--", "x"],
        ["rm"],
        ["df", "extra"],
        ["inspect"],
        ["inspect", "--openai", "--remote", "ai/x"],
        ["tag", "ai/x"],
        ["tag", "a", "b", "c"],
        ["pull", "--quiet", "ai/x"],
        ["serve"],
        ["package", "--gguf", "x.gguf", "ai/x"],
    ],
)
def test_anything_unusual_goes_through_typer(args: list[str]) -> None:
    assert cli.fast_call(args) is None


@pytest.mark.parametrize("name", sorted(cli.FAST_COMMANDS))
def test_the_fast_path_agrees_with_the_typer_declarations(name: str) -> None:
    import typer.main

    spec = cli.FAST_COMMANDS[name]
    group = typer.main.get_command(cli.build_app())
    command = group.commands[name]  # type: ignore[attr-defined]
    callback = command.callback.__wrapped__  # typer wraps the command function
    assert f"{callback.__module__}:{callback.__name__}" == spec.function
    flags = {
        opt: param.name
        for param in command.params
        if param.param_type_name == "option" and param.is_flag
        for opt in param.opts
    }
    arguments = [
        param.name + ("..." if param.nargs == -1 else "" if param.required else "?")
        for param in command.params
        if param.param_type_name == "argument"
    ]
    assert (flags, arguments) == (spec.flags, list(spec.arguments))


def test_the_fast_path_imports_no_heavy_module(daemon: StubDaemon) -> None:
    daemon.routes[("GET", "/models")] = Reply(body=[SMOLLM2])
    code = (
        "import sys; from dmr_cli.cli import main; main(['ls', '--json']); "
        "heavy = {'typer', 'click', 'rich', 'httpx', 'pydantic', 'platformdirs', 'starlette', "
        "'gguf', 'numpy'}; print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=os.environ, capture_output=True, text=True, check=True
    )
    assert done.stdout.splitlines()[-1] == "[]"
    assert json.loads(done.stdout[: done.stdout.rindex("\n[]")]) == [SMOLLM2]


# -- usage errors (typer) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ls", "-q", "--openai"], "'--quiet': cannot be used with --openai"),
        (["inspect", "--openai", "-r", "ai/x"], "'--remote': cannot be used with --openai"),
        (["serve", "--port", "1234", "--socket", "/tmp/d.sock"], "cannot be used together"),
        (["serve", "--port", "0"], "Invalid value for '--port'"),
        (["tag", "only-one"], "Missing argument 'TARGET'"),
        (["rm"], "Missing argument 'MODEL...'"),
        (["package", "--gguf", "missing.gguf", "ai/x"], "'missing.gguf' does not exist"),
        (["nonsense"], "No such command 'nonsense'"),
    ],
)
def test_usage_errors_exit_2_with_a_message_on_stderr(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = run(capsys, *args)
    assert (code, out) == (2, "")
    assert message in err
    assert "Usage: dmr" in err


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version") == (0, "dmr version 0.1.0\n", "")


# -- the error boundary -------------------------------------------------------------------


def test_nothing_listening_exits_3_with_a_hint(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    env.setenv("MODEL_RUNNER_HOST", url)
    code, out, err = run(capsys, "ls")
    assert (code, out) == (3, "")
    assert err == f"Error: dmr daemon is not running at {url}\nHint: start it with: dmr serve\n"


def test_auto_start_off_at_the_default_address_raises_the_hint(env: pytest.MonkeyPatch) -> None:
    env.setenv("DMR_NO_AUTO_START", "1")
    assert client.is_default_endpoint()
    with pytest.raises(DaemonUnavailable) as caught:
        client._auto_start()
    assert caught.value.message == "dmr daemon is not running at http://127.0.0.1:12434"
    assert caught.value.hint == "start it with: dmr serve"


def test_only_the_default_address_is_auto_started(env: pytest.MonkeyPatch) -> None:
    env.setenv("MODEL_RUNNER_HOST", "http://127.0.0.1:12434")
    assert client.is_default_endpoint()
    env.setenv("MODEL_RUNNER_HOST", "http://127.0.0.1:9")
    assert not client.is_default_endpoint()


def test_a_real_process_keeps_stdout_empty_on_errors(env: pytest.MonkeyPatch) -> None:
    env.setenv("MODEL_RUNNER_HOST", f"http://127.0.0.1:{free_port()}")
    done = subprocess.run(
        [sys.executable, "-m", "dmr_cli", "rm", "ai/x"],
        env=os.environ,
        capture_output=True,
        text=True,
    )
    assert (done.returncode, done.stdout) == (3, "")
    assert done.stderr.startswith("Error: dmr daemon is not running at http://127.0.0.1:")


@pytest.mark.parametrize(
    ("status", "body", "code", "message"),
    [
        (404, "model not found\n", 4, "Error: Failed to get model ai/x: model not found\n"),
        (
            400,
            "Invalid model reference\n",
            2,
            "Error: Failed to get model ai/x: Invalid model reference\n",
        ),
        (401, "Unauthorized\n", 5, "Error: Failed to get model ai/x: Unauthorized\n"),
        (
            500,
            "internal error: disk on fire\n",
            1,
            "Error: Failed to get model ai/x: internal error: disk on fire\n",
        ),
        (
            503,
            "service unavailable\n",
            3,
            "Error: the dmr daemon at {url} is unavailable: service unavailable\n",
        ),
    ],
)
def test_daemon_errors_map_to_exit_codes(
    daemon: StubDaemon,
    capsys: pytest.CaptureFixture[str],
    status: int,
    body: str,
    code: int,
    message: str,
) -> None:
    daemon.routes[("GET", "/models/ai/x")] = Reply(status, body, "text/plain; charset=utf-8")
    got_code, out, err = run(capsys, "inspect", "ai/x")
    assert (got_code, out) == (code, "")
    assert err.startswith(message.format(url=daemon.url))


# -- commands against the stand-in daemon -------------------------------------------------


def test_ls_json_prints_the_daemon_models(
    daemon: StubDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.routes[("GET", "/models")] = Reply(body=[SMOLLM2], chunked=True)
    code, out, err = run(capsys, "ls", "--json")
    assert (code, err) == (0, "")
    assert out == json.dumps([SMOLLM2], indent=4) + "\n"
    assert daemon.requests[0].headers["User-Agent"] == "dmr/0.1.0 docker-model-cli/0.1.0"


@pytest.mark.parametrize(
    ("wanted", "found"),
    [
        ("smollm2", True),
        ("ai/smollm2", True),
        ("docker.io/ai/smollm2:latest", True),
        ("smollm2:latest", True),
        ("smollm2:v2", False),
        ("other/smollm2", False),
    ],
)
def test_ls_filter_compares_normalised_names(
    daemon: StubDaemon, capsys: pytest.CaptureFixture[str], wanted: str, found: bool
) -> None:
    legacy = {**SMOLLM2, "id": "sha256:" + "1" * 64, "tags": ["ai/smollm2:latest"]}
    other = {**SMOLLM2, "id": "sha256:" + "2" * 64, "tags": ["docker.io/ai/qwen3:latest"]}
    daemon.routes[("GET", "/models")] = Reply(body=[SMOLLM2, legacy, other])
    code, out, _ = run(capsys, "ls", "-q", wanted)
    assert code == 0
    assert out == ("354bf30d0aa3\n111111111111\n" if found else "")


def test_rm_prints_untagged_and_deleted_lines(
    daemon: StubDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.routes[("DELETE", "/models/ai/smollm2?force=true")] = Reply(
        body=[{"Untagged": "docker.io/ai/smollm2:latest"}, {"Deleted": MODEL_ID}]
    )
    code, out, err = run(capsys, "rm", "-f", "ai/smollm2", "ai/gone")
    assert out == f"Untagged: docker.io/ai/smollm2:latest\nDeleted: {MODEL_ID}\n"
    assert (code, err) == (4, "Error: Failed to remove model: no such model: ai/gone\n")


def test_rm_conflict_explains_force(daemon: StubDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    text = 'unable to delete "354bf30d0aa3" (must be forced) due to multiple tag references'
    daemon.routes[("DELETE", "/models/354bf30d0aa3?force=false")] = Reply(409, text + "\n")
    code, out, err = run(capsys, "rm", "354bf30d0aa3")
    assert (code, out) == (6, "")
    assert (
        err == f"Error: Failed to remove model: {text}\nHint: remove its tags one by one, "
        "or use --force to delete them all\n"
    )


def test_tag_sends_the_canonical_repository(
    daemon: StubDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    query = "/models/smollm2/tag?repo=docker.io%2Fmyorg%2Ffoo&tag=v1"
    daemon.routes[("POST", query)] = Reply(201, {"message": "ok", "target": "myorg/foo:v1"})
    code, out, err = run(capsys, "tag", "smollm2", "myorg/foo:v1")
    assert (code, err) == (0, "")
    assert out == 'Model "ai/smollm2:latest" tagged successfully with "myorg/foo:v1"\n'


def test_tag_rejects_an_invalid_target_before_calling_the_daemon(
    daemon: StubDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "tag", "smollm2", "in valid")
    assert (code, out) == (2, "")
    assert err.startswith("Error: Failed to tag model: invalid reference format")
    assert daemon.requests == []


def test_df_shows_reclaimable_bytes(daemon: StubDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.routes[("GET", "/engines/df")] = Reply(
        body={
            "models_disk_usage": 1_234_567_890,
            "default_backend_disk_usage": 0,
            "reclaimable": 5_000_000,
        }
    )
    code, out, _ = run(capsys, "df")
    assert code == 0
    assert out.splitlines() == [
        "TYPE         SIZE    ",
        "Models       1.23GB  ",
        "Reclaimable  5.00MB  ",
    ]


def test_version_reports_an_unreachable_server(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("MODEL_RUNNER_HOST", f"http://127.0.0.1:{free_port()}")
    code, out, _ = run(capsys, "version")
    assert code == 0
    assert " Version:    (not reachable)\n Engine:     Docker Engine (Manual Install)\n" in out


@pytest.mark.parametrize(("answer", "purged"), [("y\n", True), ("n\n", False), ("", False)])
def test_purge_asks_first(
    daemon: StubDaemon,
    capsys: pytest.CaptureFixture[str],
    env: pytest.MonkeyPatch,
    answer: str,
    purged: bool,
) -> None:
    env.setattr(sys, "stdin", io.StringIO(answer))
    daemon.routes[("DELETE", "/models/purge")] = Reply(200, "")
    code, out, err = run(capsys, "purge")
    assert (code, out) == (0, "")
    assert err.startswith("WARNING! This will remove the entire models directory.\n")
    calls = [(r.method, r.path) for r in daemon.requests]
    if purged:
        # /engines/unload is answered 404 here (no runtime layer) and tolerated.
        assert calls == [("POST", "/engines/unload"), ("DELETE", "/models/purge")]
        assert json.loads(daemon.requests[0].body) == {"all": True}
    else:
        assert calls == []
        assert err.endswith("Operation cancelled.\n")


# -- pull / push progress -----------------------------------------------------------------


def test_pull_prints_progress_on_stderr_and_the_result_on_stdout(
    daemon: StubDaemon, capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch
) -> None:
    env.setenv("HF_TOKEN", "hf_secret")
    stream = progress_stream(layer_event(0), layer_event(2000), PULLED)
    daemon.routes[("POST", "/models/create")] = Reply(body=stream, chunked=True)
    code, out, err = run(capsys, "pull", "hf.co/org/repo:Q4_K_M")
    assert (code, out) == (0, "Model pulled successfully\n")
    assert err == "Downloaded 0.00B of 2.00kB\nDownloaded 2.00kB of 2.00kB\n"
    create = next(r for r in daemon.requests if r.path == "/models/create")
    assert json.loads(create.body) == {"from": "hf.co/org/repo:Q4_K_M", "bearer-token": "hf_secret"}
    assert create.headers["Accept"] == "application/json"


def test_pull_reads_html_escaped_progress_from_older_daemons(
    daemon: StubDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    escaped = progress_stream({"type": "success", "message": "Using cached model: 1'2\"MiB"})
    escaped = escaped.replace('"', "&#34;").replace("'", "&#39;")
    daemon.routes[("POST", "/models/create")] = Reply(body=escaped, content_type="text/plain")
    code, out, _ = run(capsys, "pull", "ai/smollm2")
    assert (code, out) == (0, "Using cached model: 1'2\"MiB\n")


def test_pull_error_line_fails_the_command(
    daemon: StubDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = progress_stream(layer_event(0), {"type": "error", "message": "Error: disk full"})
    daemon.routes[("POST", "/models/create")] = Reply(body=stream)
    code, out, err = run(capsys, "pull", "ai/smollm2")
    assert (code, out) == (1, "")
    assert err.endswith("Error: Failed to pull model: disk full\n")


def test_pull_retries_on_503_and_not_on_404(
    daemon: StubDaemon, capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch
) -> None:
    env.setattr(client, "RETRY_DELAYS", (0, 0, 0, 0))
    busy = Reply(503, "busy\n", "text/plain")
    daemon.routes[("POST", "/models/create")] = [busy, busy, Reply(body=progress_stream(PULLED))]
    code, out, err = run(capsys, "pull", "ai/smollm2")
    assert (code, out) == (0, "Model pulled successfully\n")
    assert (
        err
        == "Retrying download (attempt 1/4) in 0s...\nRetrying download (attempt 2/4) in 0s...\n"
    )

    daemon.requests.clear()
    daemon.routes[("POST", "/models/create")] = Reply(404, "Model not found\n", "text/plain")
    code, out, err = run(capsys, "pull", "ai/nothing")
    assert (code, out, err) == (4, "", "Error: Failed to pull model: Model not found\n")
    assert len([r for r in daemon.requests if r.path == "/models/create"]) == 1


def test_pull_gives_up_after_four_retries(
    daemon: StubDaemon, capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch
) -> None:
    env.setattr(client, "RETRY_DELAYS", (0, 0, 0, 0))
    daemon.routes[("POST", "/models/create")] = Reply(502, "bad gateway\n", "text/plain")
    code, _, err = run(capsys, "pull", "ai/smollm2")
    assert code == 1
    assert err.count("Retrying download") == 4
    assert err.endswith("Error: Failed to pull model: bad gateway\n")
    assert len([r for r in daemon.requests if r.path == "/models/create"]) == 5


def test_ctrl_c_during_a_pull_exits_130_and_says_how_to_resume(
    daemon: StubDaemon, capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch
) -> None:
    daemon.routes[("POST", "/models/create")] = Reply(body=progress_stream(layer_event(0), PULLED))

    class Interrupting:
        def update(self, event: Any) -> None:
            raise KeyboardInterrupt

        def close(self) -> None:
            pass

    env.setattr("dmr_cli.render.progress_display", lambda: Interrupting())
    code, out, err = run(capsys, "pull", "ai/smollm2")
    assert (code, out) == (130, "")
    assert err == "Interrupted. Run 'dmr pull ai/smollm2' again to resume the download.\n"


def test_push_streams_upload_progress(
    daemon: StubDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    event = {**layer_event(2000), "mode": "push"}
    done = {"type": "success", "message": "Model pushed successfully"}
    daemon.routes[("POST", "/models/myorg/x:v1/push")] = Reply(body=progress_stream(event, done))
    code, out, err = run(capsys, "push", "myorg/x:v1")
    assert (code, out, err) == (0, "Model pushed successfully\n", "Uploaded 2.00kB of 2.00kB\n")


# -- package (real artifact, stand-in daemon) ---------------------------------------------


def test_package_streams_a_tar_then_tags_the_model(
    daemon: StubDaemon, capsys: pytest.CaptureFixture[str], tmp_path: Path, env: pytest.MonkeyPatch
) -> None:
    from tests.helpers.gguf_factory import make_tiny_llama

    make_tiny_llama(tmp_path / "tiny.gguf")
    (tmp_path / "LICENSE").write_text("MIT\n")
    env.chdir(tmp_path)
    loaded = {"type": "success", "message": "Model loaded successfully"}
    daemon.routes[("POST", "/models/load")] = Reply(body=progress_stream(loaded))
    daemon.default = Reply(201, {"message": "Model tagged successfully"})  # the tag call
    code, out, err = run(capsys, "package", "--gguf", "tiny.gguf", "-l", "LICENSE", "myorg/tiny")
    assert (code, out) == (0, "Model loaded successfully\n"), err
    assert f'Adding GGUF file from "{tmp_path / "tiny.gguf"}"' in err

    load, tag = [r for r in daemon.requests if r.path != "/version"]
    assert load.headers["Content-Type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(load.body)) as tar:
        assert tar.getnames()[-1] == "manifest.json"
        manifest = tar.extractfile("manifest.json")
        assert manifest is not None
        model_id = "sha256:" + hashlib.sha256(manifest.read()).hexdigest()
    assert (tag.method, tag.path) == (
        "POST",
        f"/models/{model_id}/tag?repo=docker.io%2Fmyorg%2Ftiny&tag=latest",
    )


# -- auto-start ---------------------------------------------------------------------------


def test_start_daemon_reports_a_daemon_that_dies_at_once(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env.setenv("MODEL_RUNNER_HOST", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(DaemonUnavailable) as caught:
        client.start_daemon(["--port", "0"])  # a usage error: `dmr serve` exits with 2
    log = tmp_path / "state" / "logs" / "daemon.log"
    assert caught.value.message == "the dmr daemon exited during start-up (exit status 2)"
    assert caught.value.hint == f"see its log: {log}"
    assert "Invalid value for '--port'" in log.read_text()


def test_start_daemon_starts_dmr_serve_in_the_background(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    env.setenv("MODEL_RUNNER_HOST", f"http://127.0.0.1:{port}")
    env.setenv("MODELS_PATH", str(tmp_path / "models"))
    client.start_daemon(["--port", str(port)])
    pid = int((tmp_path / "state" / "dmr.pid").read_text())
    try:
        log = tmp_path / "state" / "logs" / "daemon.log"
        err = capsys.readouterr().err
        assert err == f"Starting dmr daemon (pid {pid}) on http://127.0.0.1:{port}, log: {log}\n"
        assert client.models() == []
        assert os.getsid(pid) == pid  # its own session: Ctrl-C in this terminal misses it
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
