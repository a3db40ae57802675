"""What two tools that pair with Docker Model Runner do to `dmr serve`, with both runner kinds
(a native llama-server and the embedded engine).

Olla (thushan/olla, config/profiles/dmr.yaml) proxies to DMR: it discovers models and checks
health with GET /engines/v1/models, forwards client bodies verbatim to the profile's paths, and
reads model, finish_reason and usage from the answers.

docker-agent (docker/docker-agent, pkg/model/provider/dmr) finds the daemon through
`status --json`, lists and inspects models under its base URL, configures the model with
POST <base without /v1>/_configure, then streams chats with include_usage and
chat_template_kwargs. The _configure checks here are the ones tests/integration/test_scheduler.py
does not make already (it covers context-size restarts, keep_alive 1s and 0, an invalid
keep_alive, and runtime-flags with raw-runtime-flags refused together).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import psutil
import pytest

from tests.helpers.daemon import Daemon, runner_env, runner_processes, start_daemon
from tests.helpers.gguf_factory import make_slow_llama, make_tiny_embedder, make_tiny_llama

NO_STOP = {"2": -100, "260": -100}  # the tiny model's end tokens, banned: answers run to the limit
TINY = "docker.io/ai/tiny:latest"
EMB = "docker.io/ai/emb:latest"
OLLA_PREFIXES = ["/engines/v1", "/engines/llama.cpp/v1"]
MESSAGES = [{"role": "user", "content": "hello"}]


class Served:
    def __init__(self, kind: str, daemon: Daemon, draft: Path) -> None:
        self.kind, self.daemon, self.draft = kind, daemon, draft
        self.http = httpx.Client(base_url=daemon.url, timeout=120)


@pytest.fixture(scope="module", params=["native", "embedded"])
def module_served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp(request.param)
    native = request.getfixturevalue("native_llama_server") if request.param == "native" else None
    daemon = start_daemon(tmp / "home", **runner_env(request.param, tmp, native))
    draft = make_tiny_llama(tmp / "draft.gguf", seed=1)
    try:
        for path, tag in (
            (make_tiny_llama(tmp / "tiny.gguf"), "ai/tiny"),
            (make_tiny_embedder(tmp / "emb.gguf"), "ai/emb"),
            (make_slow_llama(tmp / "slow.gguf"), "ai/slow"),
            (draft, "ai/draft"),
        ):
            result = daemon.cli("package", "--gguf", str(path), tag)
            assert result.returncode == 0, result.stderr
        served = Served(request.param, daemon, draft)
        with served.http:
            yield served
    finally:
        daemon.stop()


@pytest.fixture
def served(module_served: Served) -> Served:
    """Each test starts with no stored configuration and no runner."""
    http = module_served.http
    # Configuring preloads in the background; unload evicts idle runners only.
    wait_for(
        lambda: not any(e.get("loading") or e.get("in_use") for e in http.get("/engines/ps").json())
    )
    assert http.post("/engines/unload", json={"all": True}).status_code == 200
    wait_for(lambda: not runner_processes(module_served.daemon))
    return module_served


def wait_for(condition: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def the_runner(daemon: Daemon) -> list[str]:
    """The command line of the one runner left once evicted ones have exited."""
    runners: list[psutil.Process] = []

    def one() -> bool:
        runners[:] = runner_processes(daemon)
        return len(runners) == 1

    wait_for(one)
    return list(runners[0].cmdline())


def flag_value(cmdline: list[str], *names: str) -> str:
    name = next(n for n in names if n in cmdline)
    return cmdline[cmdline.index(name) + 1]


def chat(
    http: httpx.Client, model: str = "ai/tiny", path: str = "/engines/v1", **extra: Any
) -> Any:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 4, "logit_bias": NO_STOP, **extra}
    answer = http.post(path + "/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def configure(http: httpx.Client, body: dict[str, Any], url: str = "/engines/_configure") -> None:
    answer = http.post(url, json=body)
    assert (answer.status_code, answer.text) == (202, ""), answer.text


def stored(http: httpx.Client, model: str) -> list[dict[str, Any]]:
    return list(http.get("/engines/_configure", params={"model": model}).json())


# -- Olla ---------------------------------------------------------------------------------


def test_olla_discovers_models_and_uses_their_ids_on_every_profile_path(served: Served) -> None:
    http = served.http
    for prefix in OLLA_PREFIXES:
        listed = http.get(prefix + "/models")
        assert listed.status_code == 200 and listed.json()["object"] == "list"
        models = {m["id"]: m for m in listed.json()["data"]}
        assert {TINY, EMB} <= models.keys()
        assert all(m["object"] == "model" and m["created"] > 0 for m in models.values())

        # Olla forwards the client's body as it is, naming the model by its discovered id.
        answer = chat(http, TINY, prefix)
        assert answer["model"] and answer["choices"][0]["finish_reason"] == "length"
        usage = answer["usage"]  # what Olla's metrics read
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

        body = {"model": TINY, "prompt": "hello", "max_tokens": 4, "logit_bias": NO_STOP}
        completion = http.post(prefix + "/completions", json=body).json()
        assert completion["object"] == "text_completion"
        assert completion["choices"][0]["finish_reason"] == "length"
        assert completion["usage"]["completion_tokens"] == 4

        embedded = http.post(prefix + "/embeddings", json={"model": EMB, "input": "hello"}).json()
        assert len(embedded["data"][0]["embedding"]) == 32


def test_olla_streams_pass_through_as_server_sent_events(served: Served) -> None:
    body = {"model": TINY, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with served.http.stream("POST", "/engines/llama.cpp/v1/chat/completions", json=body) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in answer.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] is not None


def test_olla_health_checks_answer_while_a_model_generates(served: Served) -> None:
    http = served.http
    body = {
        "model": "ai/slow",
        "messages": MESSAGES,
        # Long enough to be mid-answer during the checks below; the embedded engine is slower.
        "max_tokens": 300 if served.kind == "native" else 40,
        "logit_bias": NO_STOP,
        "stream": True,
    }
    with http.stream("POST", "/engines/v1/chat/completions", json=body) as answer:
        lines = answer.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        (entry,) = http.get("/engines/ps").json()
        assert entry["in_use"] is True  # mid-answer
        for prefix in OLLA_PREFIXES:
            assert http.get(prefix + "/models", timeout=10).status_code == 200
        assert [line for line in lines if line][-1] == "data: [DONE]"


# -- docker-agent -------------------------------------------------------------------------


def docker_agent_base_url(status: dict[str, Any]) -> str:
    """dmrmodels.resolvePrimaryDMRURL on the host: localhost at the status endpoint's port."""
    port = urlsplit(status["endpoint"]).port or 12434
    return f"http://127.0.0.1:{port}/engines/v1/"


def docker_agent_engine(status: dict[str, Any]) -> str:
    """dmrmodels.DockerModelEndpointAndEngine: `engine`, else llama.cpp among the backends."""
    if status.get("engine"):
        return str(status["engine"])
    return "llama.cpp" if "llama.cpp" in status["backends"] else next(iter(status["backends"]))


def docker_agent_configure_url(base_url: str) -> str:
    """dmr.buildConfigureURL: the base URL without its trailing /v1, plus /_configure."""
    parts = urlsplit(base_url)
    path = parts.path.rstrip("/").removesuffix("/v1") + "/_configure"
    return urlunsplit(parts._replace(path=path))


def test_docker_agent_finds_configures_and_chats(served: Served) -> None:
    http, daemon = served.http, served.daemon
    result = daemon.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["running"] is True
    assert docker_agent_engine(status) == "llama.cpp"
    base = docker_agent_base_url(status)
    assert base == daemon.url + "/engines/v1/"

    listed = http.get(base.rstrip("/") + "/models")  # connectivity check, then ListModels
    assert listed.status_code == 200
    assert TINY in [m["id"] for m in listed.json()["data"]]
    # GetModel escapes the reference as one path segment (Go's url.PathEscape).
    model = http.get(base + "models/" + quote("ai/tiny", safe=""))
    assert model.status_code == 200 and model.json()["id"] == TINY
    assert isinstance(model.json()["dmr"]["context_window"], int)

    request = {
        "model": "ai/tiny",
        "mode": "completion",
        "context-size": 128,
        "keep_alive": "30m",
        "llamacpp": {"reasoning-budget": 0},
    }
    assert docker_agent_configure_url(base) == daemon.url + "/engines/_configure"
    configure(http, request, docker_agent_configure_url(base))
    # An engine-specific base URL configures through /engines/<engine>/_configure.
    engine_base = daemon.url + "/engines/llama.cpp/v1/"
    assert docker_agent_configure_url(engine_base) == daemon.url + "/engines/llama.cpp/_configure"
    configure(http, request, docker_agent_configure_url(engine_base))
    (entry,) = stored(http, "ai/tiny")
    assert (entry["Backend"], entry["Mode"]) == ("llama.cpp", "completion")
    assert entry["Config"]["context-size"] == 128
    assert entry["Config"]["keep_alive"] == "30m0s"
    assert entry["Config"]["llamacpp"] == {"reasoning-budget": 0}

    body = {
        "model": "ai/tiny",
        "messages": MESSAGES,
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
        "chat_template_kwargs": {"enable_thinking": False},
    }
    with http.stream("POST", base + "chat/completions", json=body) as answer:
        assert answer.status_code == 200
        events = [line for line in answer.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    if served.kind == "native":  # llama-cpp-python ignores stream_options
        assert json.loads(events[-2][5:])["usage"]["completion_tokens"] > 0

    (running,) = http.get("/engines/ps").json()
    assert (running["model_name"], running["keep_alive"]) == ("ai/tiny", "30m0s")
    cmdline = the_runner(daemon)
    assert flag_value(cmdline, "--ctx-size", "--n-ctx") == "128"
    if served.kind == "native":
        assert flag_value(cmdline, "--reasoning-budget") == "0"

    unloaded = http.post("/engines/unload", json={"models": ["ai/tiny"]})
    assert unloaded.json() == {"unloaded_runners": 1}
    assert http.get("/engines/ps").json() == []


def test_keep_alive_minus_one_and_negative_durations_mean_never(served: Served) -> None:
    http = served.http
    configure(http, {"model": "ai/tiny", "keep_alive": "-1"})
    chat(http)
    (running,) = http.get("/engines/ps").json()
    assert running["keep_alive"] == "-1"
    configure(http, {"model": "ai/tiny", "keep_alive": "-10m"})
    assert stored(http, "ai/tiny")[0]["Config"]["keep_alive"] == "-1"


def test_raw_runtime_flags_then_runtime_flags_reach_the_runner(served: Served) -> None:
    http, daemon = served.http, served.daemon
    configure(http, {"model": "ai/tiny", "raw-runtime-flags": "--temp 0.7 --top-k 40"})
    assert stored(http, "ai/tiny")[0]["Config"]["runtime-flags"] == [
        "--temp",
        "0.7",
        "--top-k",
        "40",
    ]
    chat(http)
    first = the_runner(daemon)
    configure(http, {"model": "ai/tiny", "runtime-flags": ["--top-k", "7"]})
    chat(http)
    second = the_runner(daemon)
    if served.kind == "native":
        assert (flag_value(first, "--temp"), flag_value(first, "--top-k")) == ("0.7", "40")
        assert flag_value(second, "--top-k") == "7" and "--temp" not in second
    else:
        # llama-server's flags do not apply to the embedded engine: it still serves.
        assert "--top-k" not in first + second


def test_speculative_decoding_loads_the_draft_model(served: Served) -> None:
    http, daemon = served.http, served.daemon
    speculative = {"draft_model": "ai/draft", "num_tokens": 4, "min_acceptance_rate": 0.5}
    configure(http, {"model": "ai/tiny", "speculative": speculative})
    assert stored(http, "ai/tiny")[0]["Config"]["speculative"] == speculative
    chat(http)
    cmdline = the_runner(daemon)
    if served.kind == "native":
        assert Path(flag_value(cmdline, "--model-draft")).read_bytes() == served.draft.read_bytes()
        assert flag_value(cmdline, "--spec-draft-n-max", "--draft-max") == "4"
        assert flag_value(cmdline, "--spec-draft-p-min", "--draft-p-min") == "0.50"
    else:
        assert "--model-draft" not in cmdline

    configure(http, {"model": "ai/tiny", "speculative": {"draft_model": "ai/absent"}})
    answer = http.post(
        "/engines/v1/chat/completions", json={"model": "ai/tiny", "messages": MESSAGES}
    )
    assert answer.status_code >= 400
    assert "draft model" in answer.text and "ai/absent" in answer.text


def test_mode_keys_the_configuration(served: Served) -> None:
    http, daemon = served.http, served.daemon
    configure(http, {"model": "ai/emb", "mode": "embedding", "context-size": 64})
    (entry,) = stored(http, "ai/emb")
    assert (entry["Mode"], entry["Config"]["context-size"]) == ("embedding", 64)
    assert (
        http.post("/engines/v1/embeddings", json={"model": "ai/emb", "input": "hi"}).status_code
        == 200
    )
    cmdline = the_runner(daemon)
    assert flag_value(cmdline, "--ctx-size", "--n-ctx") == "64"
    # A completion-mode configuration is another entry; it preloads a completion runner
    # (spec §2.7) and leaves the embedding runner alone.
    configure(http, {"model": "ai/emb", "context-size": 96})
    assert {(e["Mode"], e["Config"]["context-size"]) for e in stored(http, "ai/emb")} == {
        ("embedding", 64),
        ("completion", 96),
    }
    wait_for(
        lambda: (
            sorted(e["mode"] for e in http.get("/engines/ps").json())
            == [
                "completion",
                "embedding",
            ]
        )
    )
    assert cmdline in [list(p.cmdline()) for p in runner_processes(daemon)]


def test_unload_forgets_the_configuration_only_for_a_named_backend(served: Served) -> None:
    http = served.http
    configure(http, {"model": "ai/tiny", "keep_alive": "-1"})
    chat(http)
    # DMR deletes stored configurations for (backend, model): with no backend, none match.
    kept = http.post("/engines/unload", json={"models": ["ai/tiny"], "backend": ""})
    assert kept.json() == {"unloaded_runners": 1}
    assert len(stored(http, "ai/tiny")) == 1
    chat(http)
    named = http.post("/engines/unload", json={"models": ["ai/tiny"], "backend": "llama.cpp"})
    assert named.json() == {"unloaded_runners": 1}
    assert stored(http, "ai/tiny") == []
    assert http.get("/engines/ps").json() == []
