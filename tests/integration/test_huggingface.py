"""Hugging Face native pulls against a local Hub stand-in (a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from dmr_cli.distribution.huggingface import pull_huggingface
from dmr_cli.errors import (
    Cancelled,
    DigestMismatch,
    ModelNotFound,
    RegistryError,
    Unauthorized,
    UnsupportedMediaType,
)
from dmr_cli.reference import parse_reference
from tests.helpers.hf_hub import FakeHub, HubFile, start_hub

TOKEN = "hf_s3cret-test-token"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    server = start_hub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.stop()


class Events(list[dict[str, Any]]):
    def __call__(self, event: dict[str, Any]) -> None:
        self.append(event)

    def messages(self) -> list[str]:
        return [e["message"] for e in self if "id" not in e["layer"]]

    def by_layer(self) -> dict[str, list[dict[str, Any]]]:
        layers: dict[str, list[dict[str, Any]]] = {}
        for e in self:
            if "id" in e["layer"]:
                layers.setdefault(e["layer"]["id"], []).append(e)
        return layers


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob(label: str, size: int = 3000) -> bytes:
    return (label.encode() * (size // len(label) + 1))[:size]


Q4 = blob("q4-weights ", 2 * 1024 * 1024 + 17)  # > 1 MiB: several progress lines
Q8 = blob("q8-weights ")
MMPROJ_F16 = blob("projector f16 ")
TEMPLATE = b"{% for m in messages %}{{ m.content }}{% endfor %}"
LICENSE = b"Apache License 2.0\n"


def add_gguf_repo(hub: FakeHub, repo_id: str = "TestOrg/Tiny-GGUF", **kw: Any) -> None:
    hub.add_repo(
        repo_id,
        {
            "tiny-Q4_K_M.gguf": Q4,
            "tiny-Q8_0.gguf": Q8,
            "mmproj-tiny-F16.gguf": MMPROJ_F16,
            "mmproj-tiny-F32.gguf": blob("projector f32 "),
            "template.jinja": TEMPLATE,
            "LICENSE": LICENSE,
            "README.md": b"# tiny\n",
        },
        last_modified="2025-03-24T12:09:41.000Z",
        **kw,
    )


def pull(
    ref: str, dest: Path, events: Events | None = None, token: str | None = None, **kw: Any
) -> Any:
    return pull_huggingface(
        parse_reference(ref),
        dest,
        token=token,
        progress=Events() if events is None else events,
        **kw,
    )


def test_pull_default_quantization_with_progress(hub: FakeHub, tmp_path: Path) -> None:
    add_gguf_repo(hub)
    events = Events()
    result = pull("hf.co/TestOrg/Tiny-GGUF", tmp_path, events)

    assert [p.read_bytes() for p in result.weights] == [Q4]
    assert result.weights == [tmp_path / "tiny-Q4_K_M.gguf"]
    assert result.mmproj is not None and result.mmproj.read_bytes() == MMPROJ_F16
    assert result.chat_template is not None and result.chat_template.read_bytes() == TEMPLATE
    assert [p.read_bytes() for p in result.licenses] == [LICENSE]
    assert result.format == "gguf"
    assert result.last_modified == datetime(2025, 3, 24, 12, 9, 41, tzinfo=timezone.utc)
    assert result.revision == hub.repos["testorg/tiny-gguf"].sha
    # Nothing but the selection was downloaded, and at the commit the listing saw.
    downloads = hub.paths_requested("/testorg/tiny-gguf/resolve/")
    assert sorted(downloads) == sorted(
        f"/testorg/tiny-gguf/resolve/{result.revision}/{name}"
        for name in ["tiny-Q4_K_M.gguf", "mmproj-tiny-F16.gguf", "template.jinja", "LICENSE"]
    )
    assert not list(tmp_path.rglob("*.part"))

    total = len(Q4) + len(MMPROJ_F16) + len(TEMPLATE) + len(LICENSE)
    assert events.messages() == [
        "Fetching file list...",
        "Selected Q4_K_M quantization (default)",
        f"Found 4 files ({total / 1024 / 1024:.2f} MB total)",
    ]
    assert all(e["type"] == "progress" and e["mode"] == "pull" for e in events)
    assert events[2]["total"] == total
    layers = events.by_layer()
    # Layer ids are the files' sha256 digests: LFS oids, or computed for plain git files.
    assert set(layers) == {sha(Q4), sha(MMPROJ_F16), sha(TEMPLATE), sha(LICENSE)}
    for layer_id, lines in layers.items():
        size = lines[-1]["layer"]["size"]
        assert [e["layer"]["current"] for e in lines][-1] == size
        assert all(e["total"] == total for e in lines)
        assert sum(1 for e in lines if e["layer"]["current"] == size) == 1, layer_id
    q4_progress = [e["layer"]["current"] for e in layers[sha(Q4)]]
    assert len(q4_progress) >= 2 and q4_progress == sorted(q4_progress)
    assert layers[sha(Q4)][-1]["message"] == f"Downloaded: {len(Q4) / 1024 / 1024:.2f} MB"


def test_explicit_sharded_quantization_in_a_subdirectory(hub: FakeHub, tmp_path: Path) -> None:
    shard1, shard2 = blob("shard one "), blob("shard two ")
    hub.add_repo(
        "org/Sharded-GGUF",
        {
            "Q8_0/sharded-Q8_0-00002-of-00002.gguf": shard2,
            "Q8_0/sharded-Q8_0-00001-of-00002.gguf": shard1,
            "sharded-Q4_K_M.gguf": Q8,
            "docs/deep/LICENSE.txt": LICENSE,
        },
    )
    events = Events()
    result = pull("hf.co/org/sharded-gguf:Q8_0", tmp_path, events)
    assert result.weights == [
        tmp_path / "Q8_0" / "sharded-Q8_0-00001-of-00002.gguf",
        tmp_path / "Q8_0" / "sharded-Q8_0-00002-of-00002.gguf",
    ]
    assert [p.read_bytes() for p in result.weights] == [shard1, shard2]
    assert [p.read_bytes() for p in result.licenses] == [LICENSE]
    assert result.mmproj is None and result.chat_template is None
    assert "Selected Q8_0 quantization" in events.messages()


def test_paginated_listing(hub: FakeHub, tmp_path: Path) -> None:
    hub.page_size = 2
    add_gguf_repo(hub)
    result = pull("hf.co/testorg/tiny-gguf:Q8_0", tmp_path)
    assert [p.read_bytes() for p in result.weights] == [Q8]
    assert any("cursor=" in p for p in hub.paths_requested("/api/models/testorg/tiny-gguf/tree/"))


def test_token_required(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_gguf_repo(hub, "org/private-gguf", token=TOKEN)

    events = Events()
    with pytest.raises(Unauthorized) as no_token:
        pull("hf.co/org/private-gguf", tmp_path / "a", events)
    assert no_token.value.hint is not None and "HF_TOKEN" in no_token.value.hint
    with pytest.raises(Unauthorized, match="403"):
        pull("hf.co/org/private-gguf", tmp_path / "b", token="hf_wrong")

    result = pull("hf.co/org/private-gguf", tmp_path / "c", events, token=TOKEN)
    assert [p.read_bytes() for p in result.weights] == [Q4]
    api_calls = [r for r in hub.requests if r.path.startswith("/api/")]
    assert api_calls[-1].headers.get("Authorization") == f"Bearer {TOKEN}"
    assert all(TOKEN not in str(e) for e in events)

    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the daemon's environment is the fallback
    assert pull("hf.co/org/private-gguf:Q8_0", tmp_path / "d").weights[0].read_bytes() == Q8


def test_missing_repository_is_not_found(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"huggingface\.co/org/nothing-here"):
        pull("hf.co/org/nothing-here", tmp_path)


def test_missing_quantization_is_not_found(hub: FakeHub, tmp_path: Path) -> None:
    add_gguf_repo(hub)
    with pytest.raises(ModelNotFound, match="IQ2_XXS"):
        pull("hf.co/testorg/tiny-gguf:IQ2_XXS", tmp_path)
    assert not hub.paths_requested("/testorg/tiny-gguf/resolve/")


def test_bytes_not_matching_the_lfs_oid(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo(
        "org/corrupt-gguf",
        {"m-Q4_K_M.gguf": HubFile(blob("tampered "), lfs_oid=hashlib.sha256(b"x").hexdigest())},
    )
    with pytest.raises(DigestMismatch, match=r"m-Q4_K_M\.gguf"):
        pull("hf.co/org/corrupt-gguf", tmp_path)
    assert not list(tmp_path.rglob("*.gguf*"))


def test_fewer_bytes_than_listed(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/short-gguf", {"m.gguf": HubFile(b"0123456789", lfs=False, size=20)})
    with pytest.raises(RegistryError, match="fewer bytes than the 20"):
        pull("hf.co/org/short-gguf", tmp_path)
    assert not (tmp_path / "m.gguf").exists()


def test_resumes_a_partial_file_and_keeps_complete_ones(hub: FakeHub, tmp_path: Path) -> None:
    add_gguf_repo(hub)
    (tmp_path / "tiny-Q4_K_M.gguf.part").write_bytes(Q4[:1000])
    (tmp_path / "mmproj-tiny-F16.gguf").write_bytes(MMPROJ_F16)
    result = pull("hf.co/testorg/tiny-gguf", tmp_path)

    assert result.weights[0].read_bytes() == Q4
    cdn = [r for r in hub.requests if r.path.startswith("/cdn/")]
    assert [r.headers.get("Range") for r in cdn] == ["bytes=1000-"]
    assert not hub.paths_requested(f"/testorg/tiny-gguf/resolve/{result.revision}/mmproj")


def test_a_server_ignoring_range_restarts_the_file(hub: FakeHub, tmp_path: Path) -> None:
    add_gguf_repo(hub)
    hub.honour_range = False
    (tmp_path / "tiny-Q4_K_M.gguf.part").write_bytes(b"garbage" * 100)
    result = pull("hf.co/testorg/tiny-gguf", tmp_path)
    assert result.weights[0].read_bytes() == Q4


def test_a_corrupt_partial_file_fails_verification_and_is_dropped(
    hub: FakeHub, tmp_path: Path
) -> None:
    add_gguf_repo(hub)
    part = tmp_path / "tiny-Q4_K_M.gguf.part"
    part.write_bytes(b"garbage" * 100)
    with pytest.raises(DigestMismatch):
        pull("hf.co/testorg/tiny-gguf", tmp_path)
    assert not part.exists()
    assert pull("hf.co/testorg/tiny-gguf", tmp_path).weights[0].read_bytes() == Q4


def test_cancel_stops_before_downloading(hub: FakeHub, tmp_path: Path) -> None:
    add_gguf_repo(hub)
    cancel = threading.Event()
    events = Events()

    def progress(event: dict[str, Any]) -> None:
        events(event)
        if event["message"].startswith("Found"):
            cancel.set()

    with pytest.raises(Cancelled):
        pull_huggingface(
            parse_reference("hf.co/testorg/tiny-gguf"),
            tmp_path,
            token=None,
            progress=progress,
            cancel=cancel,
        )
    assert not hub.paths_requested("/testorg/tiny-gguf/resolve/")
    assert events.by_layer() == {}


def test_safetensors_repository_is_refused_before_download(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("org/st-model", {"model.safetensors": blob("st "), "config.json": b"{}"})
    with pytest.raises(UnsupportedMediaType, match="safetensors"):
        pull("hf.co/org/st-model", tmp_path)
    assert not hub.paths_requested("/org/st-model/resolve/")

    result = pull("hf.co/org/st-model", tmp_path, formats=("gguf", "safetensors"))
    assert result.format == "safetensors"
    assert [p.name for p in result.configs] == ["config.json"]
    assert result.weights[0].read_bytes() == blob("st ")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from tests.helpers.gguf_factory import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


def test_pulled_files_build_a_deterministic_artifact(
    hub: FakeHub, tmp_path: Path, tiny_gguf: bytes
) -> None:
    from dmr_cli.distribution.artifact import build_gguf_artifact

    hub.add_repo(
        "org/Real-GGUF",
        {
            "real-Q4_K_M.gguf": tiny_gguf,
            "real-Q8_0.gguf": Q8,
            "template.jinja": TEMPLATE,
            "LICENSE": LICENSE,
        },
        last_modified="2024-11-02T08:15:00.000Z",
    )
    artifacts = []
    for attempt in ("first", "second"):
        dest = tmp_path / attempt
        dest.mkdir(mode=0o700)
        result = pull("hf.co/org/real-gguf", dest)
        artifacts.append(
            build_gguf_artifact(
                result.weights[0],
                licenses=result.licenses,
                chat_template=result.chat_template,
                mmproj=result.mmproj,
                created=result.last_modified,
            )
        )
    first, second = artifacts
    assert first.id == second.id
    assert first.manifest == second.manifest
    assert [layer.digest for layer in first.layers] == [sha(tiny_gguf), sha(LICENSE), sha(TEMPLATE)]
    assert b'"created":"2024-11-02T08:15:00Z"' in first.config
