"""The daemon's model-management API over real HTTP (spec §2.2–2.5)."""

from __future__ import annotations

import json

import httpx
import pytest

from dmr_cli.store import Store
from tests.helpers.daemon import Daemon
from tests.helpers.oci import HandArtifact, hand_artifact


def seed(daemon: Daemon, art: HandArtifact, *tags: str) -> str:
    store = Store(daemon.models_path)
    store.write_blob_bytes(art.config)
    for layer in art.layers:
        store.write_blob_bytes(layer)
    return store.write_model(art.manifest, tags)


@pytest.fixture
def http(daemon: Daemon) -> httpx.Client:
    return httpx.Client(base_url=daemon.url, timeout=30)


def test_liveness_and_version(http: httpx.Client) -> None:
    assert http.get("/").text == "Docker Model Runner is running"
    assert http.get("/version").json()["version"]


def test_list_and_inspect(daemon: Daemon, http: httpx.Client) -> None:
    assert http.get("/models").json() == []
    inner = {"format": "gguf", "parameters": "1.2M", "architecture": "llama", "context_size": 256}
    model_id = seed(daemon, hand_artifact([b"w"], inner_config=inner), "ai/tiny")
    listed = http.get("/models").json()
    assert listed == [
        {
            "id": model_id,
            "tags": ["docker.io/ai/tiny:latest"],
            "created": 1742818181,
            "config": inner,
        }
    ]
    for ref in ("ai/tiny", "tiny", "docker.io/ai/tiny:latest", model_id[7:19]):
        assert http.get(f"/models/{ref}").json()["id"] == model_id


def test_errors_are_plain_text_with_dmr_status(http: httpx.Client) -> None:
    missing = http.get("/models/ai/missing")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("text/plain")
    assert missing.headers["x-content-type-options"] == "nosniff"
    assert "not found" in missing.text and missing.text.endswith("\n")
    bad = http.post("/models/create", content=b"{not json")
    assert (bad.status_code, bad.text) == (400, "invalid request body\n")
    invalid = http.post("/models/create", json={"from": "../etc/passwd"})
    assert invalid.status_code == 400 and "Invalid model reference" in invalid.text
    unknown = http.post("/models/ai/tiny/frobnicate")
    assert (unknown.status_code, unknown.text) == (404, 'unknown action "frobnicate"\n')
    assert http.put("/models/ai/tiny").status_code == 404
    assert http.get("/nowhere").status_code == 404


def test_body_limit(http: httpx.Client) -> None:
    big = json.dumps({"from": "ai/x", "pad": "x" * (11 * 1024 * 1024)})
    response = http.post("/models/create", content=big)
    assert (response.status_code, response.text) == (400, "request too large\n")


def test_tag_untag_delete(daemon: Daemon, http: httpx.Client) -> None:
    model_id = seed(daemon, hand_artifact([b"w"]), "ai/tiny")
    assert http.post("/models/ai/tiny/tag", params={"repo": "myorg/copy"}).status_code == 400
    tagged = http.post("/models/ai/tiny/tag", params={"repo": "myorg/copy", "tag": "v1"})
    assert tagged.status_code == 201
    assert tagged.json() == {
        "message": 'Model tagged successfully with "myorg/copy:v1"',
        "target": "myorg/copy:v1",
    }
    assert sorted(http.get(f"/models/{model_id}").json()["tags"]) == [
        "docker.io/ai/tiny:latest",
        "docker.io/myorg/copy:v1",
    ]
    conflict = http.delete(f"/models/{model_id}")
    assert conflict.status_code == 409 and "must be forced" in conflict.text
    assert http.delete("/models/myorg/copy:v1").json() == [{"Untagged": "docker.io/myorg/copy:v1"}]
    assert http.delete(f"/models/{model_id}?force").json() == [
        {"Untagged": "docker.io/ai/tiny:latest"},
        {"Deleted": model_id},
    ]
    assert http.get("/models").json() == []


def test_repackage_sets_context_size(daemon: Daemon, http: httpx.Client) -> None:
    seed(daemon, hand_artifact([b"w"]), "ai/tiny")
    response = http.post(
        "/models/ai/tiny/repackage", json={"target": "ai/tiny:ctx8k", "context_size": 8192}
    )
    assert response.status_code == 201, response.text
    assert http.get("/models/ai/tiny:ctx8k").json()["config"]["context_size"] == 8192
    assert "context_size" not in http.get("/models/ai/tiny").json()["config"]
    assert http.post("/models/ai/tiny/repackage", json={}).text == "target is required\n"


def test_export_then_load_round_trip(daemon: Daemon, http: httpx.Client) -> None:
    art = hand_artifact([b"weights" * 1000, b"license"])
    model_id = seed(daemon, art, "ai/tiny")
    exported = http.get("/models/ai/tiny/export")
    assert exported.status_code == 200
    assert exported.headers["content-type"] == "application/x-tar"
    http.request("DELETE", "/models/purge")
    assert http.get("/models").json() == []
    loaded = http.post(
        "/models/load",
        content=exported.content,
        headers={"Content-Type": "application/x-tar", "Accept": "application/json"},
    )
    assert loaded.status_code == 200
    assert json.loads(loaded.text.splitlines()[-1])["message"] == "Model loaded successfully"
    model = http.get(f"/models/{model_id}").json()
    assert model["id"] == model_id and "tags" not in model


def test_df_and_purge(daemon: Daemon, http: httpx.Client) -> None:
    seed(daemon, hand_artifact([b"x" * 100_000]), "ai/tiny")
    usage = http.get("/engines/df").json()
    assert usage["models_disk_usage"] >= 100_000
    assert set(usage) == {"models_disk_usage", "default_backend_disk_usage", "reclaimable"}
    assert http.delete("/models/purge").status_code == 200
    assert http.get("/engines/df").json()["models_disk_usage"] < 100_000
