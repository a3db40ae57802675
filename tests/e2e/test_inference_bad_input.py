"""Bad input on the inference routes (DMR's errors, spec §2.6), clients that hang up
mid-stream, and many requests at once, against `dmr serve` with real runners."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from dmr_cli.store import Store
from tests.helpers.daemon import Daemon, runner_env, runner_processes, start_daemon
from tests.helpers.gguf_factory import make_slow_llama, make_tiny_llama

BODY_LIMIT = 10 * 1024 * 1024
# One route per mode and per prefix spelling.
ROUTES = [
    "/engines/v1/chat/completions",
    "/engines/llama.cpp/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/rerank",
]
# Banned in long generations: the tiny llama's end-of-generation tokens </s> (2) and
# <|im_end|> (260), so it runs until max_tokens, and its byte tokens (3-258), because random
# bytes are rarely valid UTF-8 and llama-cpp-python holds text back until it decodes: the
# stream would stay silent to the end.
TEXT_ONLY = {str(token): -100 for token in (2, 260, *range(3, 259))}


def package(daemon: Daemon, path: Path, tag: str) -> None:
    result = daemon.cli("package", "--gguf", str(path), tag)
    assert result.returncode == 0, result.stderr


def chat_body(model: str, **extra: object) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 2,
        **extra,
    }


def runners_of(daemon: Daemon, model: str) -> list[psutil.Process]:
    """The model's runner processes, recognised by its bundle path on their command line."""
    model_id = Store(daemon.models_path).get(model).id.removeprefix("sha256:")
    return [p for p in runner_processes(daemon) if any(model_id in a for a in p.cmdline())]


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


# -- errors answered by the daemon itself ----------------------------------------------------


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A daemon with one model and no runner binary: none of these requests may load one."""
    tmp = tmp_path_factory.mktemp("errors")
    daemon = start_daemon(tmp / "home", DMR_RUNNER_DIR=str(tmp / "no-runners"))
    try:
        package(daemon, make_tiny_llama(tmp / "tiny.gguf"), "ai/tiny")
        with httpx.Client(base_url=daemon.url, timeout=60) as client:
            yield client
            assert client.get("/engines/ps").json() == []
    finally:
        daemon.stop()


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "body", [b'{"model": "ai/tiny",', b"not json", b""], ids=["truncated", "text", "empty"]
)
def test_malformed_json_is_an_invalid_request(http: httpx.Client, route: str, body: bytes) -> None:
    response = http.post(route, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.text == "invalid request\n"


@pytest.mark.parametrize(
    "body", [b"[1, 2]", b'"ai/tiny"', b'{"model": 5}'], ids=["array", "string", "model-number"]
)
def test_json_that_is_not_a_request_object_is_an_invalid_request(
    http: httpx.Client, body: bytes
) -> None:
    # DMR decodes the body into a struct with a string `model` (OpenAIInferenceRequest):
    # anything that does not fit fails to decode, which is "invalid request", not a
    # missing model.
    response = http.post("/v1/chat/completions", content=body)
    assert response.status_code == 400
    assert response.text == "invalid request\n"


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "body",
    [{}, {"model": ""}, {"model": None}, {"messages": [{"role": "user", "content": "hi"}]}],
    ids=["empty-object", "empty-string", "null", "absent"],
)
def test_missing_model_is_required(http: httpx.Client, route: str, body: object) -> None:
    response = http.post(route, json=body)
    assert response.status_code == 400
    assert response.text == "model is required\n"


@pytest.mark.parametrize("route", ROUTES)
def test_unknown_model_is_not_found(http: httpx.Client, route: str) -> None:
    response = http.post(route, json=chat_body("ai/absent"))
    assert response.status_code == 404
    assert "ai/absent" in response.text


def test_body_over_ten_mib_is_too_large(http: httpx.Client) -> None:
    padding = "x" * (11 * 1024 * 1024)
    declared = http.post("/v1/chat/completions", json=chat_body("ai/tiny", padding=padding))
    assert declared.status_code == 400
    assert declared.text == "request too large\n"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the daemon has to count
        data = json.dumps(chat_body("ai/tiny", padding=padding)).encode()
        for start in range(0, len(data), 1 << 20):
            yield data[start : start + (1 << 20)]

    streamed = http.post("/engines/v1/chat/completions", content=chunks())
    assert streamed.status_code == 400
    assert streamed.text == "request too large\n"


def test_body_of_exactly_ten_mib_is_accepted(http: httpx.Client) -> None:
    head = json.dumps(chat_body("ai/absent")).encode()[:-1] + b', "pad": "'
    body = head + b"x" * (BODY_LIMIT - len(head) - 2) + b'"}'
    assert len(body) == BODY_LIMIT
    response = http.post("/v1/chat/completions", content=body)
    assert response.status_code == 404  # read and parsed: the model is what is missing


def test_unknown_backend_and_unknown_routes_are_not_found(http: httpx.Client) -> None:
    for path in ("/engines/nope/v1/chat/completions", "/engines/nope/rerank"):
        response = http.post(path, json=chat_body("ai/tiny"))
        assert response.status_code == 404
        assert response.text == "backend not found\n"
    # The backend is checked before the body is read (spec §2.6 step 1).
    assert http.post("/engines/nope/v1/chat/completions", content=b"{").status_code == 404
    for method, path in (
        ("GET", "/engines/v1/chat/completions"),  # known path, wrong method: 404, not 405
        ("GET", "/v1/chat/completions"),
        ("POST", "/engines/v1/nothing"),
        ("POST", "/engines/llama.cpp/v1/nothing"),
    ):
        response = http.request(method, path, json=chat_body("ai/tiny"))
        assert response.status_code == 404, (method, path)


# -- runners under abuse ---------------------------------------------------------------------


@pytest.fixture(scope="module", params=["native", "embedded"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Daemon, httpx.Client]]:
    """Two slots; three tiny models and one big enough to generate for minutes."""
    tmp = tmp_path_factory.mktemp(request.param)
    native = request.getfixturevalue("native_llama_server") if request.param == "native" else None
    env = {**runner_env(request.param, tmp, native), "DMR_SLOTS": "2"}
    daemon = start_daemon(tmp / "home", **env)
    try:
        for seed, tag in enumerate(("ai/tiny", "ai/tiny2", "ai/tiny3")):
            package(daemon, make_tiny_llama(tmp / f"{seed}.gguf", seed=seed), tag)
        slow = make_slow_llama(tmp / "slow.gguf")
        package(daemon, slow, "ai/slow")
        with httpx.Client(base_url=daemon.url, timeout=120) as client:
            yield daemon, client
    finally:
        daemon.stop()


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def test_client_hanging_up_mid_stream_frees_the_runner(
    served: tuple[Daemon, httpx.Client],
) -> None:
    daemon, http = served
    # 3000 tokens of the slow model take minutes on this machine: the stream is surely
    # still running when the client goes.
    body = chat_body("ai/slow", max_tokens=3000, logit_bias=TEXT_ONLY, stream=True)
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        # llama-cpp-python may send ": ping" comments first; wait for a real event.
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["object"] == "chat.completion.chunk"
    (runner,) = runners_of(daemon, "ai/slow")
    wait_for(
        lambda: any(
            e["model_name"] == "ai/slow" and not e.get("in_use")
            for e in http.get("/engines/ps").json()
        )
    )

    # The runner stops generating: a generating runner burns both cores, an idle one nothing.
    def quiet() -> bool:
        before = cpu_seconds(runner)
        time.sleep(0.5)
        return cpu_seconds(runner) - before < 0.1

    wait_for(quiet, timeout=30)
    again = http.post("/v1/chat/completions", json=chat_body("ai/slow"))
    assert again.status_code == 200, again.text
    assert runner in runner_processes(daemon)  # the same runner, still serving
    wait_for(lambda: all(not e.get("in_use") for e in http.get("/engines/ps").json()), timeout=10)


def test_many_concurrent_requests_to_one_model_share_a_runner(
    served: tuple[Daemon, httpx.Client],
) -> None:
    daemon, http = served
    with ThreadPoolExecutor(12) as pool:
        statuses = list(
            pool.map(
                lambda _: http.post("/v1/chat/completions", json=chat_body("ai/tiny")).status_code,
                range(12),
            )
        )
    assert statuses == [200] * 12
    entries = [e for e in http.get("/engines/ps").json() if e["model_name"] == "ai/tiny"]
    assert len(entries) == 1 and not entries[0].get("in_use")
    assert len(runners_of(daemon, "ai/tiny")) == 1


def test_many_concurrent_requests_to_more_models_than_slots(
    served: tuple[Daemon, httpx.Client],
) -> None:
    daemon, http = served
    models = ["ai/tiny", "ai/tiny2", "ai/tiny3"] * 8
    most_loaded = most_processes = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal most_loaded, most_processes
        with httpx.Client(base_url=daemon.url) as watcher:
            while not done.is_set():
                most_loaded = max(most_loaded, len(watcher.get("/engines/ps").json()))
                most_processes = max(most_processes, len(runner_processes(daemon)))
                time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(models)) as pool:
            responses = list(
                pool.map(lambda m: http.post("/v1/chat/completions", json=chat_body(m)), models)
            )
    finally:
        done.set()
        watcher.join()
    assert [r.status_code for r in responses] == [200] * len(models), [
        r.text for r in responses if r.status_code != 200
    ]
    assert 1 <= most_loaded <= 2  # DMR_SLOTS=2, never more runners than slots
    # An evicted runner has exited before its successor starts (spec §7.1: eviction waits
    # for the process), so its memory is free for the next model.
    assert most_processes <= 2, f"{most_processes} runner processes alive at once"
    assert len(http.get("/engines/ps").json()) <= 2
    # Evicted runners' processes are gone too: no leak.
    wait_for(lambda: len(runner_processes(daemon)) <= 2)
