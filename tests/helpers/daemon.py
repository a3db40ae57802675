"""Run the real daemon (`dmr serve`) and the real CLI as subprocesses, with an isolated home."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.helpers.registry import free_port


def isolated_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL", "DMR_", "HF_"))}
    env.update(
        HOME=str(home),
        XDG_DATA_HOME=str(home / ".local/share"),
        XDG_STATE_HOME=str(home / ".local/state"),
        XDG_CONFIG_HOME=str(home / ".config"),
        DOCKER_CONFIG=str(home / ".docker"),
        MODELS_PATH=str(home / "models"),
        DMR_STATE_DIR=str(home / "state"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class Daemon:
    home: Path
    port: int
    process: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def models_path(self) -> Path:
        return Path(self.env["MODELS_PATH"])

    def cli(
        self, *args: str, input: str | None = None, timeout: float = 120, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dmr_cli", *args],
            env={**self.env, **env},
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def cli_background(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "dmr_cli", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_daemon(home: Path, **extra_env: str) -> Daemon:
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = isolated_env(
        home, MODEL_RUNNER_HOST=f"http://127.0.0.1:{port}", DMR_NO_AUTO_START="1", **extra_env
    )
    log = open(home / "daemon.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "dmr_cli", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((home / "daemon.log").read_text())
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/models", timeout=1) as r:
                if r.status == 200:
                    return Daemon(home=home, port=port, process=proc, env=env)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("dmr serve did not become ready: " + (home / "daemon.log").read_text())


def runner_env(kind: str, tmp: Path, llama_server: Path | None = None) -> dict[str, str]:
    """Daemon settings that make it serve with `kind`: "native" (the given llama-server) or
    "embedded" (no native runner installed or on PATH, so llama-cpp-python serves)."""
    env = {"DMR_RUNNER_DIR": str(tmp / "no-runners")}
    if kind == "native":
        assert llama_server is not None
        env["LLAMA_SERVER_PATH"] = str(llama_server)
    else:
        env["PATH"] = os.pathsep.join(
            p
            for p in os.environ["PATH"].split(os.pathsep)
            if not (Path(p) / "llama-server").exists()
        )
    return env


def start_tiny(kind: str, tmp: Path, llama_server: Path | None, **env: str) -> Daemon:
    """A daemon serving with runner KIND (see runner_env) and the generated tiny llama
    packaged as ai/tiny."""
    from tests.helpers.gguf_factory import make_tiny_llama

    daemon = start_daemon(tmp / "home", **runner_env(kind, tmp, llama_server), **env)
    result = daemon.cli("package", "--gguf", str(make_tiny_llama(tmp / "tiny.gguf")), "ai/tiny")
    if result.returncode != 0:
        daemon.stop()
        raise RuntimeError(f"packaging the tiny model failed: {result.stderr}")
    return daemon


def runner_processes(daemon: Daemon) -> list[psutil.Process]:
    """The daemon's runner processes (native llama-server or the embedded engine)."""
    found = []
    for child in psutil.Process(daemon.process.pid).children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "llama-server" in cmdline or "embedded_server" in cmdline:
            found.append(child)
    return found
