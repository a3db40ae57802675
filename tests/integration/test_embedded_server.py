"""The embedded engine as the scheduler starts it: a real llama-cpp-python process on a Unix
socket, serving the generated tiny GGUF."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dmr_cli.runtime.config import RunnerConfig
from dmr_cli.runtime.llamacpp import embedded_args
from tests.helpers.gguf_factory import make_tiny_llama

READY_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("model") / "model.gguf")


class Engine:
    def __init__(self, argv: list[str], socket: Path) -> None:
        self.socket = socket
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://localhost", timeout=60
        )

    def wait_healthy(self) -> httpx.Response:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"embedded engine exited: {self.output()}")
            try:
                return self.client.get("/health")
            except httpx.TransportError:
                time.sleep(0.02)
        pytest.fail("embedded engine did not become healthy")

    def output(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.read().decode("utf-8", "replace")

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.client.close()
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


def start(
    tiny_model: Path, tmp_path: Path, *, mode: str = "completion", chat_template: Path | None = None
) -> Engine:
    tmp_path.mkdir(parents=True, exist_ok=True)
    socket = tmp_path / "runner-1.sock"
    argv = embedded_args(
        model_path=tiny_model,
        socket=socket,
        mode=mode,
        config=RunnerConfig(context_size=256),
        model_context_size=None,
        chat_template=chat_template,
        alias="ai/tiny",
        n_threads=1,
    )
    return Engine(argv, socket)


@pytest.fixture
def engine(tiny_model: Path, tmp_path: Path) -> Iterator[Engine]:
    running = start(tiny_model, tmp_path)
    yield running
    if running.process.poll() is None:
        running.stop(signal.SIGKILL)


def chat_body(**extra: object) -> dict[str, object]:
    return {
        "model": "ai/tiny",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 6,
        "temperature": 0,
        **extra,
    }


def test_serves_chat_completions_and_exits_on_sigint(engine: Engine) -> None:
    health = engine.wait_healthy()
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}

    models = engine.client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["ai/tiny"]

    reply = engine.client.post("/v1/chat/completions", json=chat_body())
    assert reply.status_code == 200
    body = reply.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 6

    chunks = []
    with engine.client.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line.removeprefix("data: "))
    assert chunks[-1] == "[DONE]"
    deltas = [json.loads(c)["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas[0].get("role") == "assistant"
    assert sum(1 for d in deltas if d.get("content")) >= 1

    assert engine.stop(signal.SIGINT) == 0
    assert not engine.socket.exists()


def test_sigterm_is_a_clean_exit_too(engine: Engine) -> None:
    engine.wait_healthy()
    assert engine.stop(signal.SIGTERM) == 0


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler installed for `sig` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_a_signal_while_loading_exits_cleanly(tiny_model: Path, tmp_path: Path) -> None:
    running = start(tiny_model, tmp_path)
    # Signal as soon as the handler is in place: llama_cpp is still importing or the model
    # loading (a few hundred ms), long before the socket exists.
    deadline = time.monotonic() + READY_TIMEOUT
    while not catches(running.process.pid, signal.SIGTERM) and time.monotonic() < deadline:
        time.sleep(0.002)
    assert running.stop(signal.SIGTERM) == 0
    assert "Traceback" not in running.output()


def test_the_packaged_chat_template_replaces_the_ggufs(tiny_model: Path, tmp_path: Path) -> None:
    # A template that repeats the message 20 times: the prompt gets far longer than ChatML's.
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ (m['content'] + ' world') * 20 }}{% endfor %}")
    plain = start(tiny_model, tmp_path / "a")
    custom = start(tiny_model, tmp_path / "b", chat_template=template)
    try:
        plain.wait_healthy()
        custom.wait_healthy()
        plain_tokens = plain.client.post("/v1/chat/completions", json=chat_body()).json()
        custom_tokens = custom.client.post("/v1/chat/completions", json=chat_body()).json()
    finally:
        assert plain.stop() == 0
        assert custom.stop() == 0
    assert custom_tokens["usage"]["prompt_tokens"] >= 40
    assert plain_tokens["usage"]["prompt_tokens"] < 30


def test_embedding_mode(tiny_model: Path, tmp_path: Path) -> None:
    running = start(tiny_model, tmp_path, mode="embedding")
    try:
        running.wait_healthy()
        reply = running.client.post("/v1/embeddings", json={"model": "ai/tiny", "input": "hello"})
    finally:
        assert running.stop() == 0
    assert reply.status_code == 200
    assert reply.json()["data"][0]["object"] == "embedding"
