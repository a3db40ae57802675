"""The request log through the real daemon and a native llama-server: `/engines/requests`
as JSON and as an event stream, and `dmr requests`."""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.daemon import Daemon, start_daemon
from tests.helpers.gguf_factory import make_tiny_llama

SECRET = "sk-do-not-log-me"


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, native_llama_server: Path
) -> Iterator[tuple[Daemon, httpx.Client, str]]:
    tmp = tmp_path_factory.mktemp("requests-log")
    daemon = start_daemon(
        tmp / "home",
        LLAMA_SERVER_PATH=str(native_llama_server),
        DMR_RUNNER_DIR=str(tmp / "no-runners"),
    )
    result = daemon.cli("package", "--gguf", str(make_tiny_llama(tmp / "tiny.gguf")), "ai/tiny")
    assert result.returncode == 0, result.stderr
    with httpx.Client(base_url=daemon.url, timeout=120) as http:
        model_id = http.get("/models/ai/tiny").json()["id"]
        yield daemon, http, model_id
    daemon.stop()


@pytest.fixture
def http(served: tuple[Daemon, httpx.Client, str]) -> httpx.Client:
    """The shared client, with an empty log: unloading the model's runner drops its records."""
    _, client, _ = served
    log(client)  # the previous test's last exchange is over: its runner is idle
    assert client.post("/engines/unload", json={"all": True}).status_code == 200
    assert client.get("/engines/requests").json() == []
    return client


def chat(http: httpx.Client, path: str = "/engines/v1/chat/completions", **extra: Any) -> Any:
    body = {"model": "ai/tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    return http.post(path, json={**body, **extra}, headers={"Authorization": f"Bearer {SECRET}"})


def log(http: httpx.Client, model: str | None = None) -> list[dict[str, Any]]:
    """The log once every exchange in it is over. A client has the last byte of an answer
    a moment before the daemon closes the record (status 0 until then)."""
    deadline = time.monotonic() + 30
    while True:
        groups = http.get("/engines/requests", params={"model": model} if model else None).json()
        if all(r["status_code"] for g in groups for r in g["records"]):
            return list(groups)
        assert time.monotonic() < deadline, groups
        time.sleep(0.02)


def records(http: httpx.Client, model: str | None = None) -> list[dict[str, Any]]:
    return [r for g in log(http, model) for r in g["records"]]


def test_plain_and_streamed_chats_are_recorded(
    served: tuple[Daemon, httpx.Client, str], http: httpx.Client
) -> None:
    _, _, model_id = served
    plain = chat(http)
    assert plain.status_code == 200, plain.text
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 4,
        "stream": True,
    }
    with http.stream(
        "POST", "/v1/chat/completions", json=body, headers={"User-Agent": "log-test/1"}
    ) as streamed:
        lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    deltas = [json.loads(line[6:]) for line in lines[:-1]]
    content = "".join(d["choices"][0]["delta"].get("content") or "" for d in deltas if d["choices"])

    (group,) = log(http)
    assert group["model"] == model_id and group["count"] == 2 and group["config"] == {}
    first, second = group["records"]
    assert first["id"].startswith(model_id + "_") and first["id"] < second["id"]
    assert first["model"] == "ai/tiny" and first["method"] == "POST"
    assert first["url"] == "/engines/v1/chat/completions"
    assert json.loads(first["request"])["messages"][0]["content"] == "hi"
    assert json.loads(first["response"]) == plain.json()
    assert first["status_code"] == 200
    assert first["user_agent"].startswith("python-httpx/")
    assert "origin" not in first and "error" not in first
    # The alias is recorded under its /engines path; the stream as one chat.completion.
    assert second["url"] == "/engines/v1/chat/completions" and second["model"] == "tiny"
    assert second["user_agent"] == "log-test/1"
    final = json.loads(second["response"])
    assert final["object"] == "chat.completion"
    assert final["id"] == deltas[0]["id"]
    assert final["choices"][0]["message"] == {"role": "assistant", "content": content}
    assert final["choices"][0]["finish_reason"] == "length"
    assert SECRET not in http.get("/engines/requests").text


def test_last_ten_per_model_and_the_model_filter(
    served: tuple[Daemon, httpx.Client, str], http: httpx.Client
) -> None:
    _, _, model_id = served
    for n in range(12):
        assert chat(http, messages=[{"role": "user", "content": f"n{n}"}]).status_code == 200
    kept = records(http)
    assert [json.loads(r["request"])["messages"][0]["content"] for r in kept] == [
        f"n{n}" for n in range(2, 12)
    ]
    for spelling in ("tiny", "ai/tiny:latest", model_id):
        assert records(http, spelling) == kept
    assert http.get("/engines/requests", params={"model": "ai/other"}).json() == []


def test_errors_and_truncated_media(http: httpx.Client) -> None:
    image = "data:image/png;base64," + "iVBORw0KGgo" * 100
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": image}},
    ]
    answer = chat(http, messages=[{"role": "user", "content": content}])
    assert answer.status_code >= 400  # a text-only model refuses images
    (record,) = records(http)
    assert record["status_code"] == answer.status_code
    assert "response" not in record
    assert json.loads(record["error"]) == answer.json()
    url = json.loads(record["request"])["messages"][0]["content"][1]["image_url"]["url"]
    assert url == image[:122] + f"...[truncated {len(image) - 122} chars]"


def test_unload_drops_the_log(http: httpx.Client) -> None:
    assert chat(http).status_code == 200
    assert len(records(http)) == 1
    assert http.post("/engines/unload", json={"models": ["ai/tiny"]}).json() == {
        "unloaded_runners": 1
    }
    assert http.get("/engines/requests").json() == []


def read_events(response: httpx.Response, out: queue.Queue[tuple[str, str]]) -> None:
    event = ""
    # The test closes the stream under this thread when it is done.
    with contextlib.suppress(httpx.HTTPError):
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                out.put((event, line[6:]))


def test_follow_as_an_event_stream(
    served: tuple[Daemon, httpx.Client, str], http: httpx.Client
) -> None:
    daemon, _, model_id = served
    assert chat(http).status_code == 200
    log(http)  # over before following starts: it shows as existing, not new
    events: queue.Queue[tuple[str, str]] = queue.Queue()
    with (
        httpx.Client(base_url=daemon.url, timeout=httpx.Timeout(60)) as follower,
        follower.stream(
            "GET",
            "/engines/requests",
            params={"include_existing": "true", "model": "tiny"},
            headers={"Accept": "text/event-stream"},
        ) as stream,
    ):
        assert stream.headers["content-type"].startswith("text/event-stream")
        threading.Thread(target=read_events, args=(stream, events), daemon=True).start()
        assert events.get(timeout=30) == ("connected", '{"status": "connected"}')
        kind, data = events.get(timeout=30)
        assert kind == "existing_request"
        (existing,) = json.loads(data)
        assert existing["count"] == 1 and existing["model"] == model_id
        assert chat(http, messages=[{"role": "user", "content": "later"}]).status_code == 200
        kind, data = events.get(timeout=30)
        assert kind == "new_request"
        (group,) = json.loads(data)
        (record,) = group["records"]
        assert json.loads(record["request"])["messages"][0]["content"] == "later"
        assert record["status_code"] == 200 and "response" in record


def test_cli(served: tuple[Daemon, httpx.Client, str], http: httpx.Client) -> None:
    daemon, _, model_id = served
    assert chat(http).status_code == 200
    log(http)
    shown = daemon.cli("requests", "--model", "tiny")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == log(http)
    assert shown.stdout.startswith("[\n    {")  # DMR's 4-space JSON
    misuse = daemon.cli("requests", "--include-existing")
    assert misuse.returncode == 2
    assert "'--include-existing': can only be used with --follow" in misuse.stderr

    follower = daemon.cli_background("requests", "-f", "--include-existing")
    try:
        assert follower.stderr is not None and follower.stdout is not None
        assert follower.stderr.readline() == "Connected to request stream. Press Ctrl+C to stop.\n"
        (existing,) = json.loads(follower.stdout.readline())
        assert existing["model"] == model_id
        assert chat(http, messages=[{"role": "user", "content": "cli"}]).status_code == 200
        (new,) = json.loads(follower.stdout.readline())
        assert json.loads(new["records"][0]["request"])["messages"][0]["content"] == "cli"
        follower.send_signal(signal.SIGINT)
        assert follower.wait(30) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
