"""End to end through the CLI: the real daemon, the real registry, real GGUF files."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmr_cli.store import Store
from tests.helpers.daemon import Daemon, start_daemon
from tests.helpers.gguf_factory import make_large_gguf, make_tiny_llama
from tests.helpers.oci import digest_of, hand_artifact, push_hand_artifact
from tests.helpers.proxy import CountingProxy
from tests.helpers.registry import RunningRegistry


def blobs_on_disk(store_root: Path) -> set[str]:
    blob_dir = store_root / "blobs" / "sha256"
    return {p.name for p in blob_dir.iterdir()} if blob_dir.exists() else set()


def ok(result: object) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"  # type: ignore[attr-defined]
    return result.stdout  # type: ignore[attr-defined,no-any-return]


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return make_tiny_llama(tmp_path / "tiny.gguf")


def test_pull_list_inspect_tag_rm(
    daemon: Daemon, registry: RunningRegistry, tiny_gguf: Path
) -> None:
    ref = f"{registry.host}/ai/tiny:v1"
    ok(daemon.cli("package", "--gguf", str(tiny_gguf), "--push", ref))

    out = ok(daemon.cli("pull", ref))
    assert "Model pulled successfully" in out
    again = ok(daemon.cli("pull", ref))
    assert "Using cached model" in again

    table = ok(daemon.cli("ls")).splitlines()
    assert table[0].split() == [
        "MODEL",
        "NAME",
        "PARAMETERS",
        "QUANTIZATION",
        "ARCHITECTURE",
        "MODEL",
        "ID",
        "CREATED",
        "CONTEXT",
        "SIZE",
    ]
    assert any(line.startswith(f"{registry.host}/ai/tiny:v1 ") for line in table[1:])
    assert " llama " in table[1] and " F32 " in table[1] and " 256 " in table[1]

    listed = json.loads(ok(daemon.cli("ls", "--json")))
    assert [m["tags"] for m in listed] == [[ref]]
    model_id = listed[0]["id"]
    inspected = json.loads(ok(daemon.cli("inspect", ref)))
    assert inspected["id"] == model_id
    assert inspected["config"]["architecture"] == "llama"
    assert inspected["config"]["gguf"]["general.name"] == "tiny-llama"

    ok(daemon.cli("tag", ref, "myorg/tiny:copy"))
    tags = {t for m in json.loads(ok(daemon.cli("ls", "--json"))) for t in m["tags"]}
    assert tags == {ref, "docker.io/myorg/tiny:copy"}
    shown = ok(daemon.cli("ls"))
    assert "myorg/tiny:copy" in shown and f"{registry.host}/ai/tiny:v1" in shown

    untag = ok(daemon.cli("rm", "myorg/tiny:copy"))
    assert untag.strip() == "Untagged: docker.io/myorg/tiny:copy"
    assert len(blobs_on_disk(daemon.models_path)) == 2  # weights + config remain

    missing = daemon.cli("rm", "myorg/nothing")
    assert missing.returncode == 4 and "no such model" in missing.stderr.lower()
    ok(daemon.cli("tag", ref, "myorg/tiny:again"))
    refused = daemon.cli("rm", model_id[7:19])
    assert refused.returncode == 6 and "must be forced" in refused.stderr
    deleted = ok(daemon.cli("rm", "-f", model_id[7:19]))
    assert f"Deleted: {model_id}" in deleted
    assert json.loads(ok(daemon.cli("ls", "--json"))) == []
    assert blobs_on_disk(daemon.models_path) == set()  # no orphan blob left


def test_push_to_another_repository_and_pull_back(
    daemon: Daemon, registry: RunningRegistry, tmp_path: Path
) -> None:
    # Pushed by an independent pusher, so pull is not only tested against our own push.
    weights = os.urandom(3 * 1024 * 1024)
    art = hand_artifact([weights, b"license text"])
    push_hand_artifact(registry.url, "ai/hand", "latest", art)
    ok(daemon.cli("pull", f"{registry.host}/ai/hand"))
    store = Store(daemon.models_path)
    assert store.get(f"{registry.host}/ai/hand").id == art.id

    ok(daemon.cli("tag", f"{registry.host}/ai/hand", f"{registry.host}/other/copy:v2"))
    assert "Model pushed successfully" in ok(daemon.cli("push", f"{registry.host}/other/copy:v2"))

    other = start_daemon(tmp_path / "other-home")
    try:
        ok(other.cli("pull", f"{registry.host}/other/copy:v2"))
        pulled = Store(other.models_path)
        model = pulled.get(f"{registry.host}/other/copy:v2")
        assert model.id == art.id  # same manifest bytes
        assert pulled.blob_path(digest_of(weights)).read_bytes() == weights
    finally:
        other.stop()


def test_corrupted_blob_in_registry_fails_and_stores_nothing(
    daemon: Daemon, registry: RunningRegistry
) -> None:
    weights = os.urandom(2 * 1024 * 1024)
    art = hand_artifact([weights])
    push_hand_artifact(registry.url, "ai/bad", "latest", art)
    hexpart = digest_of(weights)[7:]
    data = registry.root / "data/docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"
    corrupted = bytearray(data.read_bytes())
    corrupted[1000] ^= 0xFF
    data.write_bytes(bytes(corrupted))

    result = daemon.cli("pull", f"{registry.host}/ai/bad")
    assert result.returncode != 0
    assert "digest" in result.stderr.lower()
    assert not Store(daemon.models_path).has_blob(digest_of(weights))
    assert json.loads(ok(daemon.cli("ls", "--json"))) == []


def kept_bytes(partial: Path) -> int:
    """What a resume can reuse: the recorded ranges, or the contiguous prefix without them."""
    journal = partial.with_name(partial.name + ".ranges")
    if journal.exists():
        return sum(end - start for start, end in json.loads(journal.read_text())["ranges"])
    return partial.stat().st_size if partial.exists() else 0


@pytest.fixture
def slow_registry(registry: RunningRegistry) -> Iterator[CountingProxy]:
    host, port = registry.host.split(":")
    proxy = CountingProxy(host, int(port), rate=25 * 1024 * 1024)
    yield proxy
    proxy.close()


@pytest.mark.slow
def test_pull_killed_with_sigkill_resumes_only_the_remainder(
    tmp_path: Path, registry: RunningRegistry, slow_registry: CountingProxy
) -> None:
    gguf = make_large_gguf(tmp_path / "big.gguf", 80 * 1024 * 1024)
    weights = gguf.read_bytes()
    art = hand_artifact([weights])
    push_hand_artifact(registry.url, "ai/big", "latest", art)
    ref = f"{slow_registry.host}/ai/big"
    home = tmp_path / "home"

    daemon = start_daemon(home)
    pull = daemon.cli_background("pull", ref)
    partial = Store(daemon.models_path).incomplete_path(digest_of(weights))
    deadline = time.monotonic() + 60
    while slow_registry.downstream_bytes < 30 * 1024 * 1024:
        assert time.monotonic() < deadline, "the pull made no progress"
        time.sleep(0.05)
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait()
    pull.wait(30)
    first_run = slow_registry.downstream_bytes
    assert first_run < len(weights)
    kept = kept_bytes(partial)
    assert kept > 10 * 1024 * 1024, "completed work was lost"

    daemon = start_daemon(home)
    try:
        ok(daemon.cli("pull", ref))
        second_run = slow_registry.downstream_bytes - first_run
        # Only the remainder crossed the wire again: the size less what was kept, plus
        # HTTP headers (bytes still in socket buffers at the kill were never written).
        assert len(weights) - kept <= second_run < len(weights) - kept + 256 * 1024
        store = Store(daemon.models_path)
        blob = store.blob_path(digest_of(weights)).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == digest_of(weights)[7:]
        assert store.get(ref).id == art.id
    finally:
        daemon.stop()


def test_unsupported_config_media_type_is_refused(
    daemon: Daemon, registry: RunningRegistry
) -> None:
    art = hand_artifact([b"w"], config_media_type="application/vnd.docker.ai.model.config.v9+json")
    push_hand_artifact(registry.url, "ai/future", "latest", art)
    result = daemon.cli("pull", f"{registry.host}/ai/future")
    assert result.returncode == 1
    assert "is not supported" in result.stderr and "try upgrading" in result.stderr
    assert json.loads(ok(daemon.cli("ls", "--json"))) == []


def test_registry_errors_map_to_exit_codes(
    daemon: Daemon, registry: RunningRegistry, auth_registry: RunningRegistry
) -> None:
    missing = daemon.cli("pull", f"{registry.host}/ai/nothing-here")
    assert missing.returncode == 4, missing.stderr
    assert "not found" in missing.stderr.lower()
    denied = daemon.cli("pull", f"{auth_registry.host}/ai/private")
    assert denied.returncode == 5, denied.stderr
    assert "Hint:" in denied.stderr
    malformed = daemon.cli("pull", "ai/../../etc/passwd")
    assert malformed.returncode == 2 and "invalid reference" in malformed.stderr.lower()


def test_two_pulls_of_one_model_and_rm_during_a_pull(
    daemon: Daemon, registry: RunningRegistry, slow_registry: CountingProxy
) -> None:
    weights = os.urandom(20 * 1024 * 1024)
    art = hand_artifact([weights])
    push_hand_artifact(registry.url, "ai/twice", "latest", art)
    ref = f"{slow_registry.host}/ai/twice"
    first, second = daemon.cli_background("pull", ref), daemon.cli_background("pull", ref)
    time.sleep(0.3)  # both under way (20 MB at 25 MB/s)
    during = daemon.cli("rm", ref)
    assert during.returncode == 4  # not in the store until its pull completes
    assert first.wait(60) == 0 and second.wait(60) == 0, (first.stderr, second.stderr)
    store = Store(daemon.models_path)
    assert store.get(ref).id == art.id
    assert store.blob_path(digest_of(weights)).read_bytes() == weights
    assert blobs_on_disk(daemon.models_path) == {digest_of(weights)[7:], digest_of(art.config)[7:]}
    assert slow_registry.downstream_bytes < 1.5 * len(weights)  # downloaded once
