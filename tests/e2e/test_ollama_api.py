"""The real `ollama` Python client against `dmr serve`'s Ollama API (spec §2.8), with both
runner kinds (a native llama-server and the embedded engine); pulls from a real registry;
bad input sent raw with httpx gets Ollama's `{"error": ...}` with the right status."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from tests.helpers.daemon import Daemon, runner_env, start_daemon
from tests.helpers.gguf_factory import (
    CHATML_TEMPLATE,
    make_slow_llama,
    make_tiny_embedder,
    make_tiny_llama,
)
from tests.helpers.registry import RunningRegistry

PREDICT = 8
# Greedy decoding of the tiny llama: for this prompt it runs to num_predict on both runners
# (no end token comes first), so answers are reproducible and of known length.
OPTIONS = {"num_predict": PREDICT, "temperature": 0}
MESSAGES = [{"role": "user", "content": "hello world"}]
MISSING = 'model "ai/absent" not found, try pulling it first'


@pytest.fixture(scope="module", params=["native", "embedded"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Daemon]]:
    """One daemon per runner kind: a chat model (ai/tiny), an embedding model (ai/emb) and
    a second chat model (ai/spare) for the tests that reconfigure or unload."""
    tmp = tmp_path_factory.mktemp(f"ollama-{request.param}")
    native = request.getfixturevalue("native_llama_server") if request.param == "native" else None
    daemon = start_daemon(tmp / "home", **runner_env(request.param, tmp, native))
    try:
        for path, tag in (
            (make_tiny_llama(tmp / "tiny.gguf"), "ai/tiny"),
            (make_tiny_embedder(tmp / "emb.gguf"), "ai/emb"),
            (make_tiny_llama(tmp / "spare.gguf", seed=1, name="spare"), "ai/spare"),
        ):
            result = daemon.cli("package", "--gguf", str(path), tag)
            assert result.returncode == 0, result.stderr
        yield request.param, daemon
    finally:
        daemon.stop()


@pytest.fixture
def client(served: tuple[str, Daemon]) -> Iterator[ollama.Client]:
    with ollama.Client(host=served[1].url, timeout=120) as sdk:
        yield sdk


def engines_ps(daemon: Daemon) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = httpx.get(daemon.url + "/engines/ps").json()
    return result


def test_version_and_list(client: ollama.Client, served: tuple[str, Daemon]) -> None:
    _, daemon = served
    assert httpx.get(daemon.url + "/api/version").json() == {"version": "0.1.0"}
    listed = {m.model: m for m in client.list().models}
    assert {"ai/tiny:latest", "ai/emb:latest", "ai/spare:latest"} <= listed.keys()
    tiny = listed["ai/tiny:latest"]
    stored = httpx.get(daemon.url + "/models/ai/tiny").json()
    assert tiny.digest == stored["id"].removeprefix("sha256:")
    assert tiny.size is not None and tiny.size > 100_000  # the GGUF's bytes, not DMR's 0
    assert tiny.modified_at is not None and tiny.modified_at.year >= 2025
    assert tiny.details is not None
    assert tiny.details.format == "gguf" and tiny.details.family == "llama"
    assert tiny.details.families == ["llama"]
    assert tiny.details.parameter_size == stored["config"]["parameters"]
    assert tiny.details.quantization_level == "F32"
    raw = httpx.get(daemon.url + "/api/tags").json()["models"]
    assert {m["name"] for m in raw} == {m["model"] for m in raw}


def test_show(client: ollama.Client) -> None:
    shown = client.show("ai/tiny")
    assert shown.details is not None and shown.details.family == "llama"
    info = shown.modelinfo or {}
    assert info["general.architecture"] == "llama"
    assert info["llama.context_length"] == 256 and info["llama.embedding_length"] == 64
    assert info["llama.attention.layer_norm_rms_epsilon"] == 1e-05
    assert info["general.parameter_count"] > 100_000
    assert info["tokenizer.ggml.tokens"] is None  # arrays only with verbose, as Ollama
    assert "general.name" not in info and "tokenizer.chat_template" not in info
    assert shown.template == CHATML_TEMPLATE
    assert shown.parameters is not None and shown.parameters.split() == ["num_ctx", "256"]
    assert shown.capabilities == ["completion"]
    assert shown.modelfile is not None and "FROM " in shown.modelfile
    assert client.show("ai/emb").capabilities == ["embedding"]
    # Short names resolve like the rest of dmr.
    assert client.show("tiny").modelinfo == shown.modelinfo


def test_chat_whole_and_streamed(client: ollama.Client, served: tuple[str, Daemon]) -> None:
    kind, _ = served
    whole = client.chat(model="ai/tiny", messages=MESSAGES, options=OPTIONS)
    assert whole.model == "ai/tiny" and whole.done is True
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.done_reason == "length"
    # llama-cpp-python's chat handler counts one token more than it generated.
    assert whole.eval_count == (PREDICT if kind == "native" else PREDICT + 1)
    assert whole.prompt_eval_count is not None and whole.prompt_eval_count > 0
    assert whole.total_duration is not None and whole.total_duration > 0
    assert whole.load_duration is not None
    datetime.fromisoformat(str(whole.created_at).replace("Z", "+00:00"))

    parts = list(client.chat(model="ai/tiny", messages=MESSAGES, options=OPTIONS, stream=True))
    *pieces, last = parts
    assert pieces and not any(p.done for p in pieces)
    # Greedy decoding: the streamed pieces, put together, are the whole answer.
    assert "".join(p.message.content or "" for p in pieces) == whole.message.content
    assert last.done is True and last.done_reason == "length" and last.message.content == ""
    assert last.total_duration is not None and last.total_duration > 0
    if kind == "native":
        # llama-server ends its stream with usage and timings; llama-cpp-python sends neither.
        assert last.eval_count == PREDICT and last.prompt_eval_count == whole.prompt_eval_count
        assert last.eval_duration is not None and last.eval_duration > 0
        assert last.prompt_eval_duration is not None and last.prompt_eval_duration > 0


def test_generate_is_a_one_message_chat(client: ollama.Client) -> None:
    chat = client.chat(model="ai/tiny", messages=MESSAGES, options=OPTIONS)
    whole = client.generate(model="ai/tiny", prompt="hello world", options=OPTIONS)
    assert whole.response == chat.message.content
    assert whole.done is True and whole.done_reason == "length"
    parts = list(
        client.generate(model="ai/tiny", prompt="hello world", options=OPTIONS, stream=True)
    )
    assert "".join(p.response or "" for p in parts) == whole.response
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]


def test_embed_and_embeddings(client: ollama.Client) -> None:
    embedded = client.embed(model="ai/emb", input=["hello world", "the cat is tiny"])
    first, second = embedded.embeddings
    assert len(first) == len(second) == 32  # the embedder's n_embd
    assert first != second
    for vector in (first, second):
        assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-6)
    assert embedded.prompt_eval_count is not None and embedded.prompt_eval_count > 0
    single = client.embed(model="ai/emb", input="hello world")
    assert single.embeddings[0] == pytest.approx(first, rel=1e-4, abs=1e-5)
    short = client.embed(model="ai/emb", input="hello world", dimensions=8).embeddings[0]
    assert len(short) == 8
    assert math.isclose(math.fsum(x * x for x in short), 1.0, rel_tol=1e-6)
    # The older route answers the runner's vector as it is.
    legacy = client.embeddings(model="ai/emb", prompt="hello world").embedding
    norm = math.sqrt(math.fsum(x * x for x in legacy))
    assert [x / norm for x in legacy] == pytest.approx(first, rel=1e-4, abs=1e-5)
    assert client.embeddings(model="ai/emb", prompt="").embedding == []


def test_ps_reports_runners(client: ollama.Client) -> None:
    client.chat(model="ai/tiny", messages=MESSAGES, options=OPTIONS)
    after = datetime.now(timezone.utc)
    running = {m.model: m for m in client.ps().models}
    tiny = running["ai/tiny:latest"]
    assert tiny.name == "ai/tiny:latest"
    listed = {m.model: m for m in client.list().models}
    assert tiny.digest == listed["ai/tiny:latest"].digest
    assert tiny.size is not None and tiny.size > 0  # the scheduler's memory estimate
    assert tiny.context_length == 256
    assert tiny.details is not None and tiny.details.family == "llama"
    # Idle with the default keep_alive of 5 minutes: it goes 5 minutes after its last use.
    assert tiny.expires_at is not None
    assert after - timedelta(seconds=30) < tiny.expires_at - timedelta(minutes=5) <= after


def test_request_settings_go_through_configure(
    client: ollama.Client, served: tuple[str, Daemon]
) -> None:
    _, daemon = served
    client.chat(
        model="ai/spare",
        messages=MESSAGES,
        options={**OPTIONS, "num_ctx": 128},
        keep_alive="10m",
        think=False,
    )

    def configured() -> dict[str, Any]:
        (entry,) = httpx.get(daemon.url + "/engines/_configure?model=ai/spare").json()
        config: dict[str, Any] = entry["Config"]
        return config

    assert configured() == {
        "context-size": 128,
        "keep_alive": "10m0s",
        "llamacpp": {"reasoning-budget": 0},
    }
    spare = next(m for m in client.ps().models if m.model == "ai/spare:latest")
    assert spare.context_length == 128
    assert spare.expires_at is not None
    remaining = spare.expires_at - datetime.now(timezone.utc)
    assert timedelta(minutes=9) < remaining <= timedelta(minutes=10)
    # A later request's keep_alive is applied on top: the context size stays.
    client.generate(model="ai/spare", prompt="hi", options=OPTIONS, keep_alive=1200)
    assert configured()["keep_alive"] == "20m0s" and configured()["context-size"] == 128


def test_load_and_unload_idioms(client: ollama.Client, served: tuple[str, Daemon]) -> None:
    _, daemon = served

    def spare_loaded() -> bool:
        return any(r["model_name"] == "ai/spare" for r in engines_ps(daemon))

    client.generate(model="ai/spare", keep_alive=0)
    assert not spare_loaded()
    loaded = client.generate(model="ai/spare")
    assert loaded.done is True and loaded.done_reason == "load" and loaded.response == ""
    assert spare_loaded()
    unloaded = client.generate(model="ai/spare", keep_alive="0s")
    assert unloaded.done_reason == "unload"
    assert not spare_loaded()
    chat_loaded = client.chat(model="ai/spare", messages=[])
    assert chat_loaded.done_reason == "load" and chat_loaded.message.content == ""
    assert spare_loaded()
    assert client.chat(model="ai/spare", messages=[], keep_alive=0).done_reason == "unload"
    assert not spare_loaded()


def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
      a: the first number
      b: the second number
    """
    return a + b


def test_tool_history_and_tools_reach_the_runner(client: ollama.Client) -> None:
    """The tiny model cannot choose to call a tool; what it can show is that tools and a tool
    round trip in the history (arguments as objects, results by tool name) are accepted."""
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "hello world"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}],
        },
        {"role": "tool", "content": "3", "tool_name": "add"},
    ]
    plain = client.chat(model="ai/tiny", messages=history, options=OPTIONS)
    answer = client.chat(model="ai/tiny", messages=history, tools=[add], options=OPTIONS)
    assert answer.done is True and answer.message.role == "assistant"
    # The tool round trip reached the prompt: more tokens than the question alone.
    alone = client.chat(model="ai/tiny", messages=MESSAGES, options=OPTIONS)
    assert plain.prompt_eval_count is not None and alone.prompt_eval_count is not None
    assert plain.prompt_eval_count > alone.prompt_eval_count
    streamed = list(
        client.chat(model="ai/tiny", messages=history, tools=[add], options=OPTIONS, stream=True)
    )
    assert streamed[-1].done is True


@pytest.mark.parametrize(
    "message",
    [
        {"role": "user", "content": "hello world " * 400},  # past the 256-token context
        {"role": "user", "content": "what is it?", "images": ["iVBORw0KGgo="]},  # no vision
    ],
    ids=["too-long", "image"],
)
def test_runner_errors_keep_the_runner_status(
    served: tuple[str, Daemon], message: dict[str, Any]
) -> None:
    """The Ollama route answers with the status the runner gives the translated request; an
    error comes as Ollama's `{"error": message}`, and a stream the runner broke off (without
    `[DONE]`) ends with an error line instead of a silent, empty answer."""
    _, daemon = served
    content: Any = message["content"]
    if "images" in message:
        url = f"data:image/png;base64,{message['images'][0]}"
        content = [
            {"type": "text", "text": content},
            {"type": "image_url", "image_url": {"url": url}},
        ]
    for stream in (False, True):
        openai = httpx.post(
            daemon.url + "/engines/v1/chat/completions",
            json={
                "model": "ai/tiny",
                "messages": [{"role": "user", "content": content}],
                "stream": stream,
            },
            timeout=120,
        )
        response = httpx.post(
            daemon.url + "/api/chat",
            json={"model": "ai/tiny", "messages": [message], "stream": stream},
            timeout=120,
        )
        assert response.status_code == openai.status_code, response.text
        if openai.status_code >= 400:
            assert response.json() == {"error": openai.json()["error"]["message"]}
        else:
            # Both requests fail on both runners: a 200 can only be a stream cut short.
            assert stream and "[DONE]" not in openai.text
            last = json.loads(response.text.splitlines()[-1])
            assert set(last) == {"error"} and last["error"]


@pytest.mark.parametrize("served", ["native"], indirect=True)
def test_client_hang_up_stops_the_generation(served: tuple[str, Daemon], tmp_path: Path) -> None:
    """Leaving an Ollama stream early cancels the runner request and the runner stops: its
    recorded answer is the few tokens sent before the hang-up. (llama-cpp-python holds back
    undecodable bytes, so its first line may come only with the whole answer: the native
    runner shows it.)"""
    _, daemon = served
    slow = make_slow_llama(tmp_path / "slow.gguf")
    packaged = daemon.cli("package", "--gguf", str(slow), "ai/slow")
    assert packaged.returncode == 0, packaged.stderr
    greedy = {"model": "ai/slow", "messages": MESSAGES, "stream": False}
    # Greedy, this prompt runs to num_predict (no end token comes first) ...
    probe = httpx.post(
        daemon.url + "/api/chat",
        json={**greedy, "options": {"num_predict": 200, "temperature": 0}},
        timeout=120,
    )
    assert probe.json()["done_reason"] == "length"
    httpx.post(daemon.url + "/engines/unload", json={"models": ["ai/slow"]})  # log: one record
    # ... so this stream would run for 3000 tokens, were it not cut.
    body = {**greedy, "stream": True, "options": {"num_predict": 3000, "temperature": 0}}
    with httpx.stream("POST", daemon.url + "/api/chat", json=body, timeout=120) as response:
        assert not json.loads(next(response.iter_lines()))["done"]
    deadline = time.monotonic() + 60
    while any(r["model_name"] == "ai/slow" and r.get("in_use") for r in engines_ps(daemon)):
        assert time.monotonic() < deadline, "the runner is still generating"
        time.sleep(0.05)
    (log,) = httpx.get(daemon.url + "/engines/requests?model=ai/slow").json()
    (record,) = log["records"]
    content = json.loads(record["response"])["choices"][0]["message"]["content"]
    assert 0 < len(content) < 300
    httpx.post(daemon.url + "/engines/unload", json={"models": ["ai/slow"]})


def test_delete_unloads_then_deletes(client: ollama.Client, served: tuple[str, Daemon]) -> None:
    _, daemon = served
    client.copy("ai/spare", "ai/spare-copy:v1")
    client.chat(model="ai/spare-copy:v1", messages=MESSAGES, options=OPTIONS)
    spare_id = httpx.get(daemon.url + "/models/ai/spare").json()["id"]
    assert client.delete("ai/spare-copy:v1").status == "success"  # a tag: untagged
    names = {m.model for m in client.list().models}
    assert "ai/spare:latest" in names and "ai/spare-copy:v1" not in names
    client.chat(model="ai/spare", messages=MESSAGES, options=OPTIONS)
    assert client.delete("ai/spare").status == "success"
    assert "ai/spare:latest" not in {m.model for m in client.list().models}
    runners = httpx.get(daemon.url + "/engines/ps").json()
    assert not [r for r in runners if r["model_name"] in ("ai/spare", "ai/spare-copy:v1")]
    assert httpx.get(daemon.url + "/models/" + spare_id).status_code == 404
    with pytest.raises(ollama.ResponseError) as missing:
        client.delete("ai/spare")
    assert missing.value.status_code == 404


# -- model management and bad input: no runner involved, one daemon ---------------------------


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("ollama-plain")
    daemon = start_daemon(tmp / "home")
    try:
        result = daemon.cli("package", "--gguf", str(make_tiny_llama(tmp / "t.gguf")), "ai/tiny")
        assert result.returncode == 0, result.stderr
        yield daemon
    finally:
        daemon.stop()


def test_pull_from_a_registry(plain: Daemon, registry: RunningRegistry, tmp_path: Path) -> None:
    ref = f"{registry.host}/ai/pulled:v1"
    gguf = make_tiny_llama(tmp_path / "pulled.gguf", seed=2)
    pushed = plain.cli("package", "--gguf", str(gguf), "--push", ref)
    assert pushed.returncode == 0, pushed.stderr
    client = ollama.Client(host=plain.url, timeout=120)
    statuses = list(client.pull(ref, stream=True))
    assert statuses[0].status == "pulling manifest"
    assert statuses[-1].status == "success"
    layers = [s for s in statuses if s.digest]
    assert layers
    for line in layers:
        assert line.digest is not None and line.digest.startswith("sha256:")
        assert line.status == f"pulling {line.digest[7:19]}"
        assert line.total is not None and line.total > 0
    gguf_size = gguf.stat().st_size
    assert any(s.total == gguf_size and s.completed == gguf_size for s in layers)
    assert ref in {m.model for m in client.list().models}
    assert client.show(ref).capabilities == ["completion"]
    # Pulled again, not streamed: one status.
    assert client.pull(ref).status == "success"
    raw = httpx.post(plain.url + "/api/pull", json={"model": ref}, timeout=60)
    assert raw.headers["content-type"] == "application/x-ndjson"
    assert raw.text.splitlines()[-1] == '{"status":"success"}'
    absent = f"{registry.host}/ai/nothing-here"
    with pytest.raises(ollama.ResponseError) as whole:
        client.pull(absent)
    with pytest.raises(ollama.ResponseError) as streamed:
        list(client.pull(absent, stream=True))
    for missing in (whole, streamed):
        assert missing.value.status_code == 404
        assert "Failed to pull model" in missing.value.error


def test_copy_and_delete(plain: Daemon) -> None:
    client = ollama.Client(host=plain.url, timeout=60)
    assert client.copy("ai/tiny", "me/copy:v2").status == "success"
    listed = {m.model: m for m in client.list().models}
    assert listed["me/copy:v2"].digest == listed["ai/tiny:latest"].digest
    assert client.show("me/copy:v2").details == client.show("ai/tiny").details
    assert client.delete("me/copy:v2").status == "success"
    assert "me/copy:v2" not in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as missing:
        client.copy("ai/absent", "me/x")
    assert missing.value.status_code == 404 and missing.value.error == MISSING
    bad = httpx.post(plain.url + "/api/copy", json={"source": "ai/tiny", "destination": "A B!"})
    assert bad.status_code == 400 and "error" in bad.json()
    no_destination = httpx.post(plain.url + "/api/copy", json={"source": "ai/tiny"})
    assert no_destination.status_code == 400
    assert no_destination.json() == {"error": "source and destination are required"}


MODEL_ROUTES = [
    ("POST", "/api/show"),
    ("POST", "/api/chat"),
    ("POST", "/api/generate"),
    ("POST", "/api/embed"),
    ("POST", "/api/embeddings"),
    ("DELETE", "/api/delete"),
]


def send(daemon: Daemon, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, daemon.url + path, timeout=60, **kwargs)


@pytest.mark.parametrize(("method", "path"), [*MODEL_ROUTES, ("POST", "/api/pull")])
def test_bad_json_and_missing_model_are_400(plain: Daemon, method: str, path: str) -> None:
    bad = send(plain, method, path, content=b"{not json")
    assert bad.status_code == 400
    assert bad.headers["content-type"] == "application/json"
    assert bad.json()["error"].startswith("invalid JSON in request body")
    assert send(plain, method, path, content=b"[1, 2]").status_code == 400
    missing = send(plain, method, path, json={"messages": []})
    assert missing.status_code == 400 and missing.json() == {"error": "model is required"}


@pytest.mark.parametrize(("method", "path"), MODEL_ROUTES)
def test_unknown_model_is_404(plain: Daemon, method: str, path: str) -> None:
    body = {"model": "ai/absent", "messages": MESSAGES, "prompt": "hi", "input": "hi"}
    response = send(plain, method, path, json=body)
    assert response.status_code == 404 and response.json() == {"error": MISSING}


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/api/chat", {"messages": "hello"}, "messages must be a list"),
        ("/api/chat", {"messages": [{"content": "x"}]}, "invalid message 0"),
        ("/api/chat", {"messages": MESSAGES, "stream": "yes"}, "stream must be"),
        ("/api/chat", {"messages": MESSAGES, "keep_alive": "soon"}, "invalid keep_alive"),
        ("/api/chat", {"messages": MESSAGES, "think": "very"}, "invalid think"),
        ("/api/chat", {"messages": MESSAGES, "options": {"temperature": "hot"}}, "option"),
        ("/api/chat", {"messages": MESSAGES, "format": "yaml"}, "invalid format"),
        ("/api/chat", {"messages": MESSAGES, "tools": "add"}, "tools must be"),
        ("/api/generate", {"prompt": "hi", "options": {"num_ctx": "big"}}, "num_ctx"),
        ("/api/generate", {"prompt": "hi", "images": ["", "x"]}, "invalid image"),
        ("/api/embed", {"input": [1, 2]}, "invalid input"),
        ("/api/embed", {"input": "hi", "dimensions": 0}, "invalid dimensions"),
        ("/api/embeddings", {"prompt": ["hi"]}, "prompt must be"),
        ("/api/pull", {"stream": False, "model": "Bad Name!!"}, "invalid reference"),
    ],
)
def test_bad_fields_are_400(plain: Daemon, path: str, body: dict[str, Any], message: str) -> None:
    response = send(plain, "POST", path, json={"model": "ai/tiny", **body})
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"} and message in response.json()["error"]


def test_client_sees_ollama_errors(plain: Daemon) -> None:
    client = ollama.Client(host=plain.url, timeout=60)
    with pytest.raises(ollama.ResponseError) as shown:
        client.show("ai/absent")
    assert shown.value.status_code == 404 and shown.value.error == MISSING
    with pytest.raises(ollama.ResponseError) as streamed:
        list(client.chat(model="ai/absent", messages=MESSAGES, stream=True))
    assert streamed.value.status_code == 404
    assert client.ps().models == []  # nothing was loaded by any of the above
