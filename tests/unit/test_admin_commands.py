"""The runtime administration commands: status, ps, unload/stop, configure, logs, and the
background daemon (start-runner, stop-runner, restart-runner).

Rendering and request shapes run against the stand-in daemon of test_cli_args; the daemon
management runs real `dmr serve` processes in an isolated home.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from dmr_cli import client, config, render
from dmr_cli.runtime import daemon as daemon_process
from dmr_cli.server.logs import ENGINE_LOG, SERVICE_LOG, LogReader
from tests.helpers.daemon import isolated_env
from tests.helpers.registry import free_port
from tests.unit import test_cli_args
from tests.unit.test_cli_args import Reply, StubDaemon, run

# The stand-in daemon's fixtures, shared with test_cli_args.
env = test_cli_args.env
daemon = test_cli_args.daemon

BACKENDS = {
    "vllm": "Not Installed: binary not found",
    "llama.cpp": "Running: llama.cpp b9879-cpu (cpu, native llama-server) 1a2b3c4",
    "mlx": "Not Installed: only supported on Apple Silicon",
    "sglang": "Installing: downloading",
    "diffusers": "something odd",
}
ACCELERATOR = {
    "name": "cpu",
    "variant": "cpu",
    "devices": [],
    "reasons": {
        "cuda": "nvidia-smi not found and no /proc/driver/nvidia",
        "vulkan": "no Vulkan ICD manifest",
    },
    "reason": "no usable GPU found",
}
RUNNER = {
    "kind": "native",
    "variant": "cpu",
    "version": "b9879",
    "commit": "1a2b3c4",
    "path": "/r/bin/llama-server",
    "source": "installed",
}


@pytest.fixture
def running(daemon: StubDaemon) -> StubDaemon:
    daemon.routes[("GET", "/models")] = Reply(body=[])
    daemon.routes[("GET", "/engines/status")] = Reply(body=BACKENDS)
    daemon.routes[("GET", "/engines/runtime")] = Reply(
        body={"accelerator": ACCELERATOR, "runner": RUNNER, "slots": 2}
    )
    return daemon


@pytest.fixture
def default_address(env: pytest.MonkeyPatch) -> list[list[str]]:
    """The CLI at its default (auto-started) address, free here; records auto-starts."""
    env.setattr(config, "DEFAULT_HOST", f"http://127.0.0.1:{free_port()}")
    client.endpoint.cache_clear()
    started: list[list[str]] = []
    env.setattr(client, "start_daemon", lambda args, *a, **k: started.append(args))
    return started


# -- status -------------------------------------------------------------------------------


def test_status_shows_backends_by_state_then_the_accelerator(
    running: StubDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "status")
    assert (code, err) == (0, "")
    assert out == (
        "Docker Model Runner is running\n"
        "\n"
        "BACKEND    STATUS         DETAILS                                                 \n"
        "llama.cpp  Running        llama.cpp b9879-cpu (cpu, native llama-server) 1a2b3c4  \n"
        "diffusers  Error          something odd                                           \n"
        "mlx        Not Installed  only supported on Apple Silicon                         \n"
        "vllm       Not Installed  binary not found                                        \n"
        "sglang     Installing     downloading                                             \n"
        "\n"
        "Accelerator: cpu (variant cpu)\n"
        "  cuda: nvidia-smi not found and no /proc/driver/nvidia\n"
        "  vulkan: no Vulkan ICD manifest\n"
    )
    assert [r.path for r in running.requests] == ["/models", "/engines/status", "/engines/runtime"]


def test_status_lists_the_devices_found() -> None:
    accelerator = {
        **ACCELERATOR,
        "name": "cuda",
        "variant": "cuda",
        "devices": [{"name": "NVIDIA H100", "memory_bytes": 80 * 1024**3, "driver": "550.54"}],
        "reasons": {},
    }
    assert render.accelerator_info(accelerator) == (
        "Accelerator: cuda (variant cuda)\n  device: NVIDIA H100, 80.00GiB, driver 550.54\n"
    )


def test_status_json_is_dmrs_object_plus_accelerator_and_runner(
    running: StubDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "status", "--json")
    assert code == 0
    endpoint = running.url + "/v1/"
    expected = {
        "running": True,
        "backends": dict(sorted(BACKENDS.items())),
        "kind": "Docker Engine (Manual Install)",
        "endpoint": endpoint,
        "endpointHost": endpoint,
        "accelerator": ACCELERATOR,
        "runner": RUNNER,
    }
    # DMR's compact encoding, then dmr's additions; "config" says where settings came from.
    assert out.startswith(json.dumps(expected, separators=(",", ":"))[:-1] + ',"config":')
    settings = json.loads(out)["config"]["settings"]
    assert settings["host"] == {
        "value": running.url,
        "source": "environment",
        "env": "MODEL_RUNNER_HOST",
    }


def test_status_against_a_daemon_without_the_runtime_route(
    running: StubDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    del running.routes[("GET", "/engines/runtime")]  # a real DMR answers 404
    code, out, _ = run(capsys, "status", "--json")
    assert code == 0
    assert set(json.loads(out)) == {
        "running",
        "backends",
        "kind",
        "endpoint",
        "endpointHost",
        "config",
    }
    code, out, _ = run(capsys, "status")
    assert code == 0
    assert "Accelerator" not in out


def test_status_of_a_daemon_answering_503_is_not_running(
    daemon: StubDaemon,
    capsys: pytest.CaptureFixture[str],
) -> None:
    daemon.routes[("GET", "/models")] = Reply(503, "service unavailable\n", "text/plain")
    assert run(capsys, "status") == (
        1,
        "Docker Model Runner is not running\n",
        "Hint: start it with: dmr start-runner\n",
    )
    code, out, _ = run(capsys, "status", "--json")
    assert code == 1
    assert json.loads(out)["running"] is False


def test_status_with_no_daemon_fails_without_starting_one(
    default_address: list[list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "status")
    assert (code, out) == (1, "")
    assert err == (
        "Error: Failed to get Docker Model Runner status: error querying /models: "
        f"dmr daemon is not running at {config.DEFAULT_HOST}\n"
        "Hint: start it with: dmr start-runner\n"
    )
    assert default_address == []


@pytest.mark.parametrize("args", [["ps"], ["unload", "ai/x"], ["unload", "--all"]])
def test_runner_queries_never_start_a_daemon(
    default_address: list[list[str]], capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    code, out, err = run(capsys, *args)
    assert (code, out) == (3, "")
    assert "dmr daemon is not running" in err
    assert default_address == []


@pytest.mark.parametrize("args", [["status", "--json"], ["status"], ["ps"]])
def test_the_fast_path_imports_no_heavy_module(running: StubDaemon, args: list[str]) -> None:
    running.routes[("GET", "/engines/ps")] = Reply(body=[])
    code = (
        f"import sys; from dmr_cli.cli import main; main({args!r}); "
        "heavy = {'typer', 'click', 'rich', 'httpx', 'pydantic', 'platformdirs', 'starlette', "
        "'gguf', 'numpy', 'psutil'}; print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=os.environ, capture_output=True, text=True, check=True
    )
    assert done.stdout.splitlines()[-1] == "[]"


# -- ps -----------------------------------------------------------------------------------


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


def test_ps_table(daemon: StubDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    zero = "0001-01-01T00:00:00Z"
    entry = {"backend_name": "llama.cpp", "mode": "completion", "last_used": zero}
    daemon.routes[("GET", "/engines/ps")] = Reply(
        body=[
            {**entry, "model_name": "ai/loading", "loading": True, "keep_alive": "5m0s"},
            {**entry, "model_name": "docker.io/ai/SmolLM2:latest", "in_use": True},
            {**entry, "model_name": "ai/busy:v2", "in_use": True, "keep_alive": "10m0s"},
            {**entry, "model_name": "hf.co/org/m", "keep_alive": "-1ns"},
            {**entry, "model_name": "ai/never", "keep_alive": "-1"},
            {
                **entry,
                "model_name": "ai/idle",
                "last_used": _rfc3339(now - 90),
                "keep_alive": "5m0s",
            },
            {**entry, "model_name": "ai/old", "last_used": _rfc3339(now - 600), "keep_alive": "5m"},
            {
                **entry,
                "model_name": "sha256:" + "ab12" * 16,
                "mode": "embedding",
                "last_used": _rfc3339(now - 3000),
                "keep_alive": "2h0m0s",
            },
        ]
    )
    code, out, err = run(capsys, "ps")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "MODEL NAME    BACKEND    MODE        UNTIL                   ",
        "loading       llama.cpp  completion  Loading...              ",
        "smollm2       llama.cpp  completion  5 minutes from now      ",
        "busy:v2       llama.cpp  completion  10 minutes from now     ",
        "hf.co/org/m   llama.cpp  completion  Forever                 ",
        "never         llama.cpp  completion  Forever                 ",
        "idle          llama.cpp  completion  3 minutes from now      ",
        "old           llama.cpp  completion  Expiring                ",
        "ab12ab12ab12  llama.cpp  embedding   About an hour from now  ",
    ]


def test_ps_reads_rfc3339_with_an_offset() -> None:
    entry = {"last_used": "2026-07-22T12:00:00.5+02:00", "keep_alive": "1h0m0s"}
    now = datetime(2026, 7, 22, 10, 30, tzinfo=timezone.utc).timestamp()
    assert render.until(entry, now) == "30 minutes from now"


# -- unload -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["unload", "stop"])
def test_unload_sends_the_models_and_counts_them(
    daemon: StubDaemon,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    daemon.routes[("POST", "/engines/unload")] = Reply(body={"unloaded_runners": 2})
    code, out, _ = run(capsys, command, "--backend", "llama.cpp", "ai/x", "y")
    assert (code, out) == (0, "Unloaded 2 model(s).\n")
    body = json.loads(daemon.requests[-1].body)
    assert body == {"all": False, "backend": "llama.cpp", "models": ["ai/x", "y"]}


@pytest.mark.parametrize(
    ("args", "message"),
    [(["ai/x"], "No such model(s) running.\n"), (["--all"], "No models are running.\n")],
)
def test_unload_with_nothing_to_unload(
    daemon: StubDaemon,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    daemon.routes[("POST", "/engines/unload")] = Reply(body={"unloaded_runners": 0})
    assert run(capsys, "unload", *args) == (0, message, "")
    if args == ["--all"]:
        assert json.loads(daemon.requests[-1].body) == {"all": True, "backend": "", "models": []}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give one or more models, or --all"),
        (["--all", "ai/x"], "'--all': cannot be used with model names"),
    ],
)
def test_unload_usage_errors(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    code, out, err = run(capsys, "unload", *args)
    assert (code, out) == (2, "")
    assert message in err


# -- configure ----------------------------------------------------------------------------


def test_configure_builds_dmrs_body_with_the_flags_after_the_dash(
    daemon: StubDaemon,
    capsys: pytest.CaptureFixture[str],
) -> None:
    daemon.routes[("POST", "/engines/_configure")] = Reply(202, "")
    args = [
        "configure",
        "--context-size",
        "8192",
        "--keep-alive",
        "10m",
        "--mode",
        "Embedding",
        "--think",
        "--speculative-draft-model",
        "ai/qwen3:0.6B",
        "--speculative-num-tokens",
        "16",
        "--speculative-min-acceptance-rate",
        "0.8",
        "--hf_overrides",
        '{"rope_scaling": {"type": "yarn"}}',
        "--gpu-memory-utilization",
        "0.9",
        "ai/qwen3",
        "--",
        "--temp",
        "0.7",
        "--top-k",
        "40",
    ]
    assert run(capsys, *args) == (0, "", "")
    assert json.loads(daemon.requests[-1].body) == {
        "model": "ai/qwen3",
        "mode": "embedding",
        "context-size": 8192,
        "speculative": {
            "draft_model": "ai/qwen3:0.6B",
            "num_tokens": 16,
            "min_acceptance_rate": 0.8,
        },
        "keep_alive": "10m",
        "vllm": {"hf-overrides": {"rope_scaling": {"type": "yarn"}}, "gpu-memory-utilization": 0.9},
        "llamacpp": {"reasoning-budget": -1},
        "runtime-flags": ["--temp", "0.7", "--top-k", "40"],
    }


def test_configure_no_think_and_the_config_alias(
    daemon: StubDaemon,
    capsys: pytest.CaptureFixture[str],
) -> None:
    daemon.routes[("POST", "/engines/_configure")] = Reply(202, "")
    assert run(capsys, "config", "ai/x", "--no-think") == (0, "", "")
    assert json.loads(daemon.requests[-1].body) == {
        "model": "ai/x",
        "llamacpp": {"reasoning-budget": 0},
    }


def test_configure_reports_the_daemons_refusal(
    daemon: StubDaemon,
    capsys: pytest.CaptureFixture[str],
) -> None:
    daemon.routes[("POST", "/engines/_configure")] = Reply(
        409, "runner already active\n", "text/plain"
    )
    assert run(capsys, "configure", "ai/x", "--context-size", "4096") == (
        6,
        "",
        "Error: Failed to configure model: runner already active\n",
    )
    daemon.routes[("POST", "/engines/_configure")] = Reply(
        400, 'invalid runtime flag "--model"\n', "text/plain"
    )
    code, _, err = run(capsys, "configure", "ai/x", "--", "--model", "x")
    assert (code, err) == (1, 'Error: Failed to configure model: invalid runtime flag "--model"\n')


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ai/x", "stray"], "exactly one model must be given before --, got 2: ai/x stray"),
        (["--", "--temp", "1"], "exactly one model must be given before --, got none"),
        (["ai/x", "--temp", "1"], "No such option: --temp"),
        (["ai/x", "--mode", "chat"], "invalid mode 'chat': must be one of completion,"),
        (["ai/x", "--hf_overrides", "{"], "'--hf_overrides': invalid JSON"),
        (["show", "--context-size", "1"], "'configure show': takes one optional MODEL"),
    ],
)
def test_configure_usage_errors(
    env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    code, out, err = run(capsys, "configure", *args)
    assert (code, out) == (2, "")
    assert message in err
    assert "Usage: dmr configure [OPTIONS] MODEL [-- FLAGS...] | show [MODEL]" in err


def test_configure_show_prints_the_stored_configs(
    daemon: StubDaemon,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stored = [
        {
            "Backend": "llama.cpp",
            "Model": "docker.io/ai/x:latest",
            "ModelID": "sha256:" + "1" * 64,
            "Mode": "completion",
            "Config": {"context-size": 4096},
        }
    ]
    daemon.routes[("GET", "/engines/_configure?model=ai%2Fx")] = Reply(body=stored)
    daemon.routes[("GET", "/engines/_configure")] = Reply(body=[])
    assert run(capsys, "configure", "show", "ai/x") == (0, json.dumps(stored, indent=2) + "\n", "")
    assert run(capsys, "configure", "show") == (0, "[]\n", "")


# -- logs ---------------------------------------------------------------------------------

SERVICE_LINES = [
    "[2026-01-02T15:04:05.000000000Z] INFO dmr serving\n",
    "[2026-01-02T15:04:07.5Z] ERROR request failed: Traceback:\n",
    "  a continuation line without a stamp\n",
    "[2026-01-02T15:04:09.000000000Z] INFO later\n",
]
ENGINE_LINES = [
    "[2026-01-02T15:04:06.000000000Z] llama-server starting\n",
    "[2026-01-02T15:04:07.000000000Z] model loaded\n",
    "[2026-01-02T15:04:09.000000000Z] same time as the service line\n",
]
MERGED = [
    SERVICE_LINES[0],
    ENGINE_LINES[0],
    ENGINE_LINES[1],
    SERVICE_LINES[1],
    SERVICE_LINES[2],
    SERVICE_LINES[3],
    ENGINE_LINES[2],
]


@pytest.fixture
def log_dir(default_address: list[list[str]], env: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A local daemon's log directory (the CLI reads it directly)."""
    path = tmp_path / "logs"
    path.mkdir()
    (path / SERVICE_LOG).write_text("".join(SERVICE_LINES))
    (path / ENGINE_LOG).write_text("".join(ENGINE_LINES))
    env.setenv("MODEL_RUNNER_LOG_DIR", str(path))
    return path


def test_logs_merges_the_local_files_by_timestamp(
    log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "logs") == (0, "".join(MERGED), "")
    assert run(capsys, "logs", "--no-engines") == (0, "".join(SERVICE_LINES), "")


def test_logs_without_a_service_log(log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (log_dir / SERVICE_LOG).unlink()
    code, out, err = run(capsys, "logs")
    assert (code, out) == (4, "")
    assert err.startswith("Error: Failed to get logs: service log not found\n")


def test_log_reader_reads_only_what_is_new_and_survives_rotation(tmp_path: Path) -> None:
    (tmp_path / SERVICE_LOG).write_text(SERVICE_LINES[0])
    reader = LogReader(tmp_path)
    assert list(reader.read(partial=False)) == [SERVICE_LINES[0].encode()]
    with open(tmp_path / SERVICE_LOG, "a") as f:
        f.write("[2026-01-02T15:04:06Z] half a li")
    (tmp_path / ENGINE_LOG).write_text(ENGINE_LINES[0])  # the engine log appears later
    assert list(reader.read(partial=False)) == [ENGINE_LINES[0].encode()]
    with open(tmp_path / SERVICE_LOG, "a") as f:
        f.write("ne\n")
    assert list(reader.read(partial=False)) == [b"[2026-01-02T15:04:06Z] half a line\n"]
    assert list(reader.read(partial=False)) == []
    (tmp_path / SERVICE_LOG).rename(tmp_path / "inference.log.1")
    (tmp_path / SERVICE_LOG).write_text(SERVICE_LINES[3])
    assert list(reader.read(partial=False)) == [SERVICE_LINES[3].encode()]


@pytest.mark.timeout(60)
def test_logs_follow_prints_new_lines_as_they_are_written(
    log_dir: Path,
    env: pytest.MonkeyPatch,
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmr_cli", "logs", "-f"],
        env=os.environ,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert [proc.stdout.readline() for _ in MERGED] == MERGED
        line = "[2026-01-02T15:05:00.000000000Z] a new request\n"
        with open(log_dir / ENGINE_LOG, "a") as f:
            f.write(line)
        assert proc.stdout.readline() == line
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130


def test_logs_from_a_remote_daemon_use_the_logs_route(
    daemon: StubDaemon,
    capsys: pytest.CaptureFixture[str],
) -> None:
    daemon.routes[("GET", "/logs?follow=false&no-engines=true")] = Reply(
        body="".join(SERVICE_LINES), content_type="text/plain", chunked=True
    )
    assert run(capsys, "logs", "--no-engines") == (0, "".join(SERVICE_LINES), "")
    code, out, err = run(capsys, "logs")  # the stand-in answers 404 for anything else
    assert (code, out) == (4, "")
    assert err == "Error: Failed to get logs: 404 page not found\n"


# -- the background daemon ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmdline", "args"),
    [
        (["/v/bin/python", "/v/bin/dmr", "serve", "--port", "1"], ["--port", "1"]),
        (["python3", "-m", "dmr_cli", "serve"], []),
        (["C:\\dmr\\DMR.EXE", "serve", "--socket", "s"], ["--socket", "s"]),
        (["/v/bin/python", "/v/bin/dmr", "ls"], None),
        (["python3", "dmr_cli", "serve"], None),
        (["sleep", "60"], None),
        ([], None),
    ],
)
def test_only_dmr_serve_command_lines_count_as_the_daemon(
    cmdline: list[str], args: list[str] | None
) -> None:
    assert daemon_process.serve_args(cmdline) == args


class Background:
    """The CLI in an isolated home whose MODEL_RUNNER_HOST names a free local port."""

    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = isolated_env(home, MODEL_RUNNER_HOST=self.url)
        self.pid_file = home / "state" / "dmr.pid"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dmr_cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def pid(self) -> int:
        return int(self.pid_file.read_text())

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/models", timeout=5) as r:
                return bool(r.status == 200)
        except OSError:
            return False


@pytest.fixture
def background(tmp_path: Path) -> Iterator[Background]:
    bg = Background(tmp_path / "home")
    yield bg
    left = daemon_process.running_daemon(bg.pid_file)  # after a failure: leave no daemon
    if left is not None:
        psutil.Process(left.pid).kill()


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def test_start_stop_and_restart_a_real_background_daemon(background: Background) -> None:
    started = background.cli("start-runner")
    assert started.returncode == 0, started.stderr
    pid = background.pid()
    assert started.stdout == f"The dmr daemon is running (pid {pid}) on {background.url}\n"
    assert background.answers()
    assert daemon_process.serve_args(psutil.Process(pid).cmdline()) == [
        "--host",
        "127.0.0.1",
        "--port",
        str(background.port),
    ]

    again = background.cli("start-runner")
    assert again.returncode == 6
    assert f"the dmr daemon is already running (pid {pid}) on {background.url}" in again.stderr
    assert background.pid() == pid

    restarted = background.cli("restart-runner")
    assert restarted.returncode == 0, restarted.stderr
    new_pid = background.pid()
    assert new_pid != pid
    assert _gone(pid)
    assert background.answers()

    stopped = background.cli("stop-runner")
    assert (stopped.returncode, stopped.stdout) == (0, f"Stopped the dmr daemon (pid {new_pid})\n")
    assert not background.pid_file.exists()
    assert _gone(new_pid)
    assert not background.answers()
    assert background.cli("stop-runner").stdout == "The dmr daemon is not running\n"


def test_a_stale_pid_file_is_removed_and_its_process_never_signalled(
    background: Background,
) -> None:
    other = subprocess.Popen(["sleep", "60"])
    try:
        background.pid_file.parent.mkdir(parents=True)
        background.pid_file.write_text(f"{other.pid}\n")
        done = background.cli("stop-runner")
        assert (done.returncode, done.stdout) == (0, "The dmr daemon is not running\n")
        assert not background.pid_file.exists()
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_start_runner_refuses_an_address_something_else_answers_on(
    background: Background,
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", background.port), BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        done = background.cli("start-runner")
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 6
    assert f"Error: something already answers on {background.url}" in done.stderr
    assert not background.pid_file.exists()


def test_stop_escalates_to_sigkill_for_a_daemon_that_ignores_sigterm(tmp_path: Path) -> None:
    code = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    # A command line that reads as `dmr serve`, so the pid file check lets it be signalled.
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "dmr", "serve"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    pid_file = tmp_path / "dmr.pid"
    pid_file.write_text(f"{proc.pid}\n")
    running = daemon_process.running_daemon(pid_file)
    assert running == daemon_process.RunningDaemon(proc.pid, [])
    assert daemon_process.stop_daemon(running, pid_file, grace=0.5) is True
    assert _gone(proc.pid)
    assert not pid_file.exists()
