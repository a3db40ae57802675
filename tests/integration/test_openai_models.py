"""The OpenAI model list through the real daemon: `/engines/v1/models`,
`/engines/{backend}/v1/models`, the `/v1/models` alias, with httpx and the openai SDK."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from dmr_cli.store import Store
from tests.helpers.daemon import Daemon, start_daemon
from tests.helpers.gguf_factory import make_tiny_llama
from tests.helpers.oci import hand_artifact

PREFIXES = ("/engines/v1", "/engines/llama.cpp/v1", "/v1")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("openai-models")
    home = tmp / "home"
    # An untagged model, written to the store before the daemon starts.
    store = Store(home / "models")
    store.ensure_layout()
    art = hand_artifact([b"not really a GGUF"])
    for blob in [*art.layers, art.config]:
        store.write_blob_bytes(blob)
    store.write_model(art.manifest)
    daemon = start_daemon(home)
    tiny = make_tiny_llama(tmp / "tiny.gguf", context_length=256)
    for args in (
        ("package", "--gguf", str(tiny), "ai/tiny"),
        ("tag", "ai/tiny", "ai/tiny:v2"),
        ("package", "--gguf", str(tiny), "--context-size", "1024", "myorg/ctx:v1"),
    ):
        result = daemon.cli(*args)
        assert result.returncode == 0, result.stderr
    with httpx.Client(base_url=daemon.url) as http:
        models = {m["tags"][0] if m.get("tags") else m["id"]: m for m in http.get("/models").json()}
    yield daemon, {"untagged": art.id, "models": models}
    daemon.stop()


def test_list_on_every_prefix(served: tuple[Daemon, dict[str, Any]]) -> None:
    daemon, known = served
    tiny = known["models"]["docker.io/ai/tiny:latest"]
    with httpx.Client(base_url=daemon.url) as http:
        answers = [http.get(prefix + "/models") for prefix in PREFIXES]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/json"
        assert answer.json() == answers[0].json()
    listing = answers[0].json()
    assert listing["object"] == "list"
    by_id = {m["id"]: m for m in listing["data"]}
    # One entry per model (not per tag), named by its first tag, or its ID when untagged.
    assert set(by_id) == {"docker.io/ai/tiny:latest", "docker.io/myorg/ctx:v1", known["untagged"]}
    entry = by_id["docker.io/ai/tiny:latest"]
    assert entry["object"] == "model" and entry["owned_by"] == "docker"
    assert entry["created"] == tiny["created"]
    config = tiny["config"]
    assert entry["dmr"] == {
        "context_window": 256,  # from the GGUF: no context size configured
        "architecture": config["architecture"],
        "parameters": config["parameters"],
        "quantization": config["quantization"],
        "size": config["size"],
    }
    assert by_id["docker.io/myorg/ctx:v1"]["dmr"]["context_window"] == 1024
    # The hand-made config has only format and architecture: empty fields are left out.
    assert by_id[known["untagged"]]["dmr"] == {"architecture": "llama"}


def test_one_model_strict_lookup(served: tuple[Daemon, dict[str, Any]]) -> None:
    daemon, known = served
    tiny_id = known["models"]["docker.io/ai/tiny:latest"]["id"]
    with httpx.Client(base_url=daemon.url) as http:
        for prefix in PREFIXES:
            for ref in ("ai/tiny", "tiny", "ai/tiny:v2", tiny_id, tiny_id[7:19]):
                answer = http.get(f"{prefix}/models/{ref}")
                assert answer.status_code == 200, (prefix, ref, answer.text)
                assert answer.json()["id"] == "docker.io/ai/tiny:latest"
        untagged = http.get(f"/engines/v1/models/{known['untagged']}").json()
        assert untagged["id"] == known["untagged"]
        # No partial-name fallback here, unlike GET /models/{ref}.
        assert http.get("/models/ctx").status_code == 200
        missing = http.get("/engines/v1/models/ctx")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("text/plain")
        assert "model not found" in missing.text


def test_unknown_backend_and_other_methods(served: tuple[Daemon, dict[str, Any]]) -> None:
    daemon, _ = served
    with httpx.Client(base_url=daemon.url) as http:
        for path in ("/engines/nope/v1/models", "/engines/nope/v1/models/ai/tiny"):
            answer = http.get(path)
            assert (answer.status_code, answer.text) == (404, "backend not found\n")
        # A known path with another method is DMR's catch-all 404, not 405.
        answer = http.post("/engines/v1/models", json={})
        assert (answer.status_code, answer.text) == (404, "not found\n")


def test_openai_sdk(served: tuple[Daemon, dict[str, Any]]) -> None:
    daemon, known = served
    for prefix in PREFIXES:
        client = openai.OpenAI(base_url=daemon.url + prefix, api_key="unused", max_retries=0)
        ids = {m.id for m in client.models.list()}
        assert "docker.io/ai/tiny:latest" in ids and known["untagged"] in ids
        # The SDK escapes the slash (ai%2Ftiny): the daemon still finds the model.
        model = client.models.retrieve("ai/tiny:v2")
        assert model.id == "docker.io/ai/tiny:latest" and model.owned_by == "docker"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("ai/absent")


def test_empty_store_still_answers(tmp_path: Path) -> None:
    """Gateways (Olla) use the list as a health check: 200 even with nothing pulled."""
    daemon = start_daemon(tmp_path / "home")
    try:
        with httpx.Client(base_url=daemon.url) as http:
            for prefix in PREFIXES:
                answer = http.get(prefix + "/models")
                assert answer.status_code == 200
                assert answer.json() == {"object": "list", "data": []}
    finally:
        daemon.stop()
