"""`/metrics` through the real daemon: dmr's own series, and the metrics of native
llama-server runners merged with backend, model and mode labels."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from dmr_cli.server.metrics import Family, parse
from tests.helpers.daemon import Daemon, start_daemon
from tests.helpers.gguf_factory import make_tiny_llama
from tests.helpers.oci import hand_artifact, push_hand_artifact
from tests.helpers.registry import RunningRegistry

SAMPLE_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-z_]+="[^"]*",?)*\})? \S+$')


def scrape(http: httpx.Client) -> dict[str, Family]:
    answer = http.get("/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = answer.text
    # Valid exposition: one HELP/TYPE per family, every other line a sample.
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    for line in text.splitlines():
        assert line.startswith("#") or SAMPLE_LINE.match(line), line
    return {f.name: f for f in parse(text)}


def value(families: dict[str, Family], name: str, **labels: str) -> float:
    """The sample NAME with (at least) LABELS; 0 when there is none yet."""
    for family in families.values():
        for sample in family.samples:
            found = dict(sample.labels)
            if sample.name == name and all(found.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def chat(http: httpx.Client, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    return http.post("/engines/v1/chat/completions", json={**body, **extra})


def test_without_runners(daemon: Daemon) -> None:
    with httpx.Client(base_url=daemon.url) as http:
        families = scrape(http)
        assert http.get("/metrics").text.endswith("# No active runners\n")
        assert families["dmr_requests_total"].type == "counter"
        assert families["dmr_time_to_first_byte_seconds"].type == "histogram"
        assert value(families, "dmr_pull_bytes_total") == 0
        assert value(families, "dmr_runner_evictions_total", reason="crashed") == 0
        refused = http.post("/metrics")
        assert (refused.status_code, refused.text) == (405, "Method Not Allowed\n")


def test_disabled(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "home", DISABLE_METRICS="1")
    try:
        answer = httpx.get(daemon.url + "/metrics")
        assert (answer.status_code, answer.text) == (404, "404 page not found\n")
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, native_llama_server: Path
) -> Iterator[tuple[Daemon, httpx.Client]]:
    tmp = tmp_path_factory.mktemp("metrics")
    daemon = start_daemon(
        tmp / "home",
        DMR_SLOTS="2",
        LLAMA_SERVER_PATH=str(native_llama_server),
        DMR_RUNNER_DIR=str(tmp / "no-runners"),
    )
    for seed, tag in enumerate(("ai/tiny", "ai/tiny2", "ai/tiny3")):
        gguf = make_tiny_llama(tmp / f"{seed}.gguf", seed=seed)
        result = daemon.cli("package", "--gguf", str(gguf), tag)
        assert result.returncode == 0, result.stderr
    with httpx.Client(base_url=daemon.url, timeout=120) as http:
        yield daemon, http
    daemon.stop()


def runner_pids(daemon: Daemon) -> set[int]:
    pids = set()
    for child in psutil.Process(daemon.process.pid).children(recursive=True):
        try:
            if "llama-server" in " ".join(child.cmdline()):
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


def test_runner_metrics_are_merged_and_labelled(served: tuple[Daemon, httpx.Client]) -> None:
    _, http = served
    http.post("/engines/unload", json={"all": True})
    assert chat(http, "ai/tiny").status_code == 200
    assert chat(http, "tiny2").status_code == 200
    families = scrape(http)
    prompt_tokens = families["llamacpp:prompt_tokens_total"]
    assert prompt_tokens.type == "counter" and prompt_tokens.help
    by_model = {dict(s.labels)["model"]: s for s in prompt_tokens.samples}
    # Labelled with the reference each runner was loaded with, found although loaded by tag.
    assert set(by_model) == {"ai/tiny", "tiny2"}
    for sample in by_model.values():
        assert dict(sample.labels) == {
            "backend": "llama.cpp",
            "mode": "completion",
            "model": dict(sample.labels)["model"],
        }
        assert float(sample.value) > 0
    assert len(families["llamacpp:requests_processing"].samples) == 2


def test_request_load_and_ttfb_series(served: tuple[Daemon, httpx.Client]) -> None:
    _, http = served
    http.post("/engines/unload", json={"all": True})
    before = scrape(http)
    route = "/v1/chat/completions"
    assert chat(http, "ai/tiny").status_code == 200  # loads a runner
    assert chat(http, "ai/tiny", stream=True).status_code == 200
    assert chat(http, "ai/absent").status_code == 404
    assert http.post("/v1/chat/completions", json={"messages": []}).status_code == 400
    embeddings = http.post("/engines/v1/embeddings", json={"model": "ai/absent", "input": "x"})
    assert embeddings.status_code == 404

    def settled() -> bool:
        families = scrape(http)
        ok = value(families, "dmr_requests_total", route=route, status="200")
        return ok == value(before, "dmr_requests_total", route=route, status="200") + 2

    wait_for(settled)  # a relayed exchange is counted when it is over
    after = scrape(http)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("dmr_requests_total", route=route, status="404") == 1
    assert delta("dmr_requests_total", route=route, status="400") == 1
    assert delta("dmr_requests_total", route="/v1/embeddings", status="404") == 1
    assert delta("dmr_time_to_first_byte_seconds_count", route=route) == 2
    assert delta("dmr_runner_loads_total", backend="llama.cpp", mode="completion") == 1
    assert delta("dmr_runner_load_seconds_count") == 1
    load_sum = delta("dmr_runner_load_seconds_sum")
    assert 0 < load_sum < delta("dmr_time_to_first_byte_seconds_sum", route=route)


def test_evictions_by_reason(served: tuple[Daemon, httpx.Client]) -> None:
    daemon, http = served
    http.post("/engines/unload", json={"all": True})
    before = scrape(http)

    def count(reason: str) -> float:
        return value(scrape(http), "dmr_runner_evictions_total", reason=reason) - value(
            before, "dmr_runner_evictions_total", reason=reason
        )

    assert chat(http, "ai/tiny").status_code == 200
    assert http.post("/engines/unload", json={"models": ["ai/tiny"]}).json()["unloaded_runners"]
    assert count("unload") == 1

    assert chat(http, "ai/tiny").status_code == 200
    assert chat(http, "ai/tiny2").status_code == 200
    assert chat(http, "ai/tiny3").status_code == 200  # two slots: the oldest idle one goes
    assert count("slots") == 1

    configured = http.post("/engines/_configure", json={"model": "ai/tiny3", "context-size": 512})
    assert configured.status_code == 202
    assert count("configure") == 1

    http.post("/engines/_configure", json={"model": "ai/tiny2", "keep_alive": "0"})
    assert chat(http, "ai/tiny2").status_code == 200
    wait_for(lambda: count("idle") == 1)

    # The configure preloaded ai/tiny3 in the background; unload takes idle runners only.
    wait_for(lambda: not any(e.get("loading") for e in http.get("/engines/ps").json()))
    http.post("/engines/unload", json={"all": True})
    wait_for(lambda: not runner_pids(daemon))
    assert chat(http, "ai/tiny").status_code == 200
    (pid,) = runner_pids(daemon)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: count("crashed") == 1)
    assert http.get("/engines/ps").json() == []


def test_embedded_runner_is_skipped(tmp_path: Path) -> None:
    path = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "llama-server").exists()
    )
    daemon = start_daemon(tmp_path / "home", PATH=path, DMR_RUNNER_DIR=str(tmp_path / "none"))
    try:
        gguf = make_tiny_llama(tmp_path / "tiny.gguf")
        assert daemon.cli("package", "--gguf", str(gguf), "ai/tiny").returncode == 0
        with httpx.Client(base_url=daemon.url, timeout=120) as http:
            assert chat(http, "ai/tiny").status_code == 200
            families = scrape(http)
            assert value(families, "dmr_runner_loads_total", mode="completion") == 1
            assert not any(name.startswith("llamacpp:") for name in families)
        assert "metrics of the runner" not in (tmp_path / "home" / "daemon.log").read_text()
    finally:
        daemon.stop()


def test_pull_bytes(daemon: Daemon, registry: RunningRegistry) -> None:
    art = hand_artifact([b"layer one " * 1000, b"layer two " * 500])
    push_hand_artifact(registry.url, "ai/hand", "latest", art)
    with httpx.Client(base_url=daemon.url) as http:
        before = value(scrape(http), "dmr_pull_bytes_total")
        for _ in range(2):  # the second pull finds everything local
            result = daemon.cli("pull", f"{registry.host}/ai/hand")
            assert result.returncode == 0, result.stderr
        pulled = value(scrape(http), "dmr_pull_bytes_total") - before
    assert pulled == sum(len(layer) for layer in art.layers) + len(art.config)
