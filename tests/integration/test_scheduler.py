"""The scheduler with real runners: native llama-server (built from source) and the embedded
engine (llama-cpp-python), both serving generated GGUF models through `dmr serve`."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from dmr_cli.store import Store
from tests.helpers.daemon import Daemon, runner_env, runner_processes, start_daemon
from tests.helpers.gguf_factory import make_slow_llama, make_tiny_llama

# The generated vocabulary's end-of-generation tokens, </s> and <|im_end|>: banned so a long
# generation really is long.
NO_STOP = {"2": -100, "260": -100}


def load_model(daemon: Daemon, path: Path, tag: str) -> None:
    result = daemon.cli("package", "--gguf", str(path), tag)
    assert result.returncode == 0, result.stderr


def wait_for(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def chat(http: httpx.Client, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    return http.post("/engines/v1/chat/completions", json={**body, **extra}, timeout=120)


@pytest.fixture(params=["native", "embedded"])
def kind_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    native = request.getfixturevalue("native_llama_server") if request.param == "native" else None
    return runner_env(request.param, tmp_path, native)


@pytest.fixture
def served(tmp_path: Path, kind_env: dict[str, str]) -> Iterator[tuple[Daemon, httpx.Client]]:
    daemon = start_daemon(tmp_path / "home", DMR_SLOTS="2", **kind_env)
    load_model(daemon, make_tiny_llama(tmp_path / "tiny.gguf"), "ai/tiny")
    load_model(daemon, make_tiny_llama(tmp_path / "tiny2.gguf", seed=1), "ai/tiny2")
    load_model(daemon, make_tiny_llama(tmp_path / "tiny3.gguf", seed=2), "ai/tiny3")
    with httpx.Client(base_url=daemon.url) as http:
        yield daemon, http
    daemon.stop()


def test_load_on_first_request_then_reuse(served: tuple[Daemon, httpx.Client]) -> None:
    daemon, http = served
    assert http.get("/engines/ps").json() == []
    first = chat(http, "ai/tiny")
    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["message"]["role"] == "assistant"
    pids = [p.pid for p in runner_processes(daemon)]
    assert len(pids) == 1
    assert chat(http, "tiny").status_code == 200  # same model, other spelling
    assert [p.pid for p in runner_processes(daemon)] == pids
    (entry,) = http.get("/engines/ps").json()
    assert entry["model_name"] == "ai/tiny" and entry["mode"] == "completion"
    assert entry["keep_alive"] == "5m0s"


def test_streaming_and_concurrent_requests_share_a_runner(
    served: tuple[Daemon, httpx.Client],
) -> None:
    daemon, http = served
    with http.stream(
        "POST",
        "/engines/v1/chat/completions",
        json={
            "model": "ai/tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8,
            "stream": True,
        },
    ) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(chat(http, "ai/tiny").status_code))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 6
    assert len(runner_processes(daemon)) == 1


def test_keep_alive_expiry_and_zero(served: tuple[Daemon, httpx.Client]) -> None:
    daemon, http = served
    configured = http.post("/engines/_configure", json={"model": "ai/tiny", "keep_alive": "1s"})
    assert configured.status_code == 202
    assert chat(http, "ai/tiny").status_code == 200
    assert http.get("/engines/ps").json()[0]["keep_alive"] == "1s"
    wait_for(lambda: http.get("/engines/ps").json() == [])
    wait_for(lambda: runner_processes(daemon) == [])

    http.post("/engines/_configure", json={"model": "ai/tiny", "keep_alive": "0"})
    assert chat(http, "ai/tiny").status_code == 200
    wait_for(lambda: runner_processes(daemon) == [], timeout=10)


def test_keep_alive_counts_from_the_last_use(served: tuple[Daemon, httpx.Client]) -> None:
    daemon, http = served
    http.post("/engines/_configure", json={"model": "ai/tiny", "keep_alive": "2s"})
    assert chat(http, "ai/tiny").status_code == 200
    (pid,) = runner_processes(daemon)
    for _ in range(3):  # 3 s in all, never 2 s idle
        time.sleep(1.0)
        assert chat(http, "ai/tiny").status_code == 200
    assert runner_processes(daemon) == [pid]
    started = time.monotonic()
    wait_for(lambda: runner_processes(daemon) == [])
    assert time.monotonic() - started > 1.5

    # A shorter keep_alive applies to an idle runner at once.
    http.post("/engines/_configure", json={"model": "ai/tiny", "keep_alive": "10m"})
    assert chat(http, "ai/tiny").status_code == 200
    http.post("/engines/_configure", json={"model": "ai/tiny", "keep_alive": "1s"})
    wait_for(lambda: runner_processes(daemon) == [], timeout=10)


def test_full_slots_evict_the_least_recently_used_idle_runner(
    served: tuple[Daemon, httpx.Client],
) -> None:
    daemon, http = served  # DMR_SLOTS=2
    assert chat(http, "ai/tiny").status_code == 200
    assert chat(http, "ai/tiny2").status_code == 200
    assert chat(http, "ai/tiny").status_code == 200  # tiny2 is now the least recently used
    assert chat(http, "ai/tiny3").status_code == 200
    loaded = {e["model_name"] for e in http.get("/engines/ps").json()}
    assert loaded == {"ai/tiny", "ai/tiny3"}
    wait_for(lambda: len(runner_processes(daemon)) == 2)


def test_runner_killed_mid_request_fails_fast_and_recovers(
    served: tuple[Daemon, httpx.Client], tmp_path: Path
) -> None:
    daemon, http = served
    slow = make_slow_llama(tmp_path / "slow.gguf")
    load_model(daemon, slow, "ai/slow")
    responses: list[httpx.Response] = []
    request = threading.Thread(
        target=lambda: responses.append(chat(http, "ai/slow", max_tokens=3000, logit_bias=NO_STOP))
    )
    request.start()
    wait_for(
        lambda: any(
            e.get("in_use") and not e.get("loading") for e in http.get("/engines/ps").json()
        )
    )
    (runner,) = runner_processes(daemon)
    time.sleep(0.3)  # well into generation
    runner.send_signal(signal.SIGKILL)
    request.join(30)
    assert not request.is_alive(), "the request hung after its runner died"
    assert responses[0].status_code >= 500
    wait_for(lambda: http.get("/engines/ps").json() == [])
    again = chat(http, "ai/slow")
    assert again.status_code == 200
    assert runner.pid not in [p.pid for p in runner_processes(daemon)]


def test_configure_restarts_the_runner_with_the_new_context_size(
    served: tuple[Daemon, httpx.Client],
) -> None:
    daemon, http = served
    assert chat(http, "ai/tiny").status_code == 200
    (before,) = runner_processes(daemon)
    response = http.post("/engines/_configure", json={"model": "ai/tiny", "context-size": 128})
    assert response.status_code == 202
    assert chat(http, "ai/tiny").status_code == 200
    (after,) = runner_processes(daemon)
    assert after.pid != before.pid
    cmdline = after.cmdline()
    flag = "--ctx-size" if "--ctx-size" in cmdline else "--n-ctx"
    assert cmdline[cmdline.index(flag) + 1] == "128"
    shown = http.get("/engines/_configure", params={"model": "ai/tiny"}).json()
    assert shown[0]["Config"]["context-size"] == 128
    assert shown[0]["Model"] == "docker.io/ai/tiny:latest"


def test_configure_during_its_own_preload_replaces_it(
    served: tuple[Daemon, httpx.Client],
) -> None:
    """A preload holds its runner while loading; it is dmr's own, so a second configure
    replaces it rather than failing with 'runner already active'."""
    daemon, http = served
    for size in (200, 224, 256):
        response = http.post("/engines/_configure", json={"model": "ai/tiny", "context-size": size})
        assert response.status_code == 202, response.text
    wait_for(lambda: [e.get("loading") for e in http.get("/engines/ps").json()] == [None])
    (runner,) = runner_processes(daemon)
    cmdline = runner.cmdline()
    flag = "--ctx-size" if "--ctx-size" in cmdline else "--n-ctx"
    assert cmdline[cmdline.index(flag) + 1] == "256"


def test_configure_preloads_the_model_in_the_background(
    served: tuple[Daemon, httpx.Client],
) -> None:
    daemon, http = served
    response = http.post("/engines/_configure", json={"model": "ai/tiny2", "context-size": 256})
    assert response.status_code == 202
    # No request yet: the runner loads anyway (spec §2.7), then idles under keep_alive.
    wait_for(
        lambda: (
            [(e["model_name"], e.get("in_use", False)) for e in http.get("/engines/ps").json()]
            == [("ai/tiny2", False)]
        )
    )
    (runner,) = runner_processes(daemon)
    assert chat(http, "ai/tiny2").status_code == 200
    assert [p.pid for p in runner_processes(daemon)] == [runner.pid]
    # Only keep_alive changes (as Ollama clients send with each request): no restart.
    body = {"model": "ai/tiny2", "context-size": 256, "keep_alive": "10m"}
    assert http.post("/engines/_configure", json=body).status_code == 202
    assert [e["keep_alive"] for e in http.get("/engines/ps").json()] == ["10m0s"]
    assert [p.pid for p in runner_processes(daemon)] == [runner.pid]


def test_memory_admission_refuses_an_oversized_context(
    served: tuple[Daemon, httpx.Client],
) -> None:
    daemon, http = served
    http.post("/engines/_configure", json={"model": "ai/tiny", "context-size": 2_000_000_000})
    response = chat(http, "ai/tiny")
    assert response.status_code == 500
    assert "not enough memory" in response.text
    assert "context-size" in response.text or "KV cache" in response.text
    assert runner_processes(daemon) == []


def test_no_runner_survives_the_daemon(tmp_path: Path, kind_env: dict[str, str]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        daemon = start_daemon(tmp_path / f"home-{sig}", **kind_env)
        load_model(daemon, make_tiny_llama(tmp_path / "t.gguf"), "ai/tiny")
        with httpx.Client(base_url=daemon.url) as http:
            assert chat(http, "ai/tiny").status_code == 200
        (runner,) = runner_processes(daemon)
        daemon.process.send_signal(sig)
        daemon.process.wait(20)
        wait_for(lambda r=runner: not r.is_running() or r.status() == psutil.STATUS_ZOMBIE)


def test_configs_survive_a_daemon_restart(tmp_path: Path) -> None:
    home = tmp_path / "home"
    daemon = start_daemon(home)
    load_model(daemon, make_tiny_llama(tmp_path / "t.gguf"), "ai/tiny")
    with httpx.Client(base_url=daemon.url) as http:
        assert (
            http.post(
                "/engines/_configure",
                json={"model": "ai/tiny", "context-size": 200, "keep_alive": "30m"},
            ).status_code
            == 202
        )
    daemon.stop()
    daemon = start_daemon(home)
    try:
        with httpx.Client(base_url=daemon.url) as http:
            (entry,) = http.get("/engines/_configure").json()
        assert entry["Config"]["context-size"] == 200
        assert entry["ModelID"] == Store(daemon.models_path).get("ai/tiny").id
    finally:
        daemon.stop()


def test_invalid_configuration_is_rejected_with_dmr_messages(daemon: Daemon) -> None:
    with httpx.Client(base_url=daemon.url) as http:
        flag = http.post(
            "/engines/_configure", json={"model": "ai/x", "runtime-flags": ["--model", "x"]}
        )
        assert flag.status_code >= 400
        assert 'runtime flag "--model" is not allowed for backend "llama.cpp"' in flag.text
        path = http.post(
            "/engines/_configure",
            json={"model": "ai/x", "runtime-flags": ["--grammar-file=/etc/passwd"]},
        )
        assert path.status_code >= 400 and "not allowed" in path.text
        both = http.post(
            "/engines/_configure",
            json={
                "model": "ai/x",
                "runtime-flags": ["--temp", "0.5"],
                "raw-runtime-flags": "--temp 1",
            },
        )
        assert both.status_code == 400
        keep = http.post("/engines/_configure", json={"model": "ai/x", "keep_alive": "soon"})
        assert keep.status_code == 400 and "keep_alive" in keep.text
        assert http.post("/engines/_configure", content=b"{").status_code == 400
