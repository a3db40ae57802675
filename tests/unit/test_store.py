"""The store: DMR's layout, tag equivalence, delete semantics (delete_test.go), GC and safety."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from dmr_cli.errors import BadRequest, Conflict, DigestMismatch, ModelNotFound, StoreError
from dmr_cli.store import Store
from tests.helpers.oci import HandArtifact, digest_of, hand_artifact


def add(store: Store, art: HandArtifact, *tags: str) -> str:
    store.write_blob_bytes(art.config)
    for layer in art.layers:
        store.write_blob_bytes(layer)
    return store.write_model(art.manifest, tags)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "models")
    s.ensure_layout()
    return s


def test_layout_matches_dmr(store: Store) -> None:
    art = hand_artifact([b"weights"])
    model_id = add(store, art, "ai/smollm2")
    assert json.loads((store.root / "layout.json").read_text()) == {"version": "1.0.0"}
    index = json.loads((store.root / "models.json").read_text())
    assert index == {
        "models": [
            {
                "id": model_id,
                "tags": ["docker.io/ai/smollm2:latest"],
                "files": [digest_of(b"weights"), digest_of(art.config)],
            }
        ]
    }
    assert (store.root / "manifests/sha256" / model_id[7:]).read_bytes() == art.manifest
    assert (store.root / "blobs/sha256" / digest_of(b"weights")[7:]).read_bytes() == b"weights"


@pytest.mark.parametrize(
    "ref",
    [
        "smollm2",
        "ai/smollm2",
        "ai/smollm2:latest",
        "docker.io/ai/smollm2:latest",
        "index.docker.io/ai/smollm2",
        "SmolLM2",
    ],
)
def test_equivalent_references_find_the_model(store: Store, ref: str) -> None:
    model_id = add(store, hand_artifact([b"w"]), "ai/smollm2")
    assert store.get(ref).id == model_id


def test_ids_and_digest_references(store: Store) -> None:
    model_id = add(store, hand_artifact([b"w"]), "ai/smollm2")
    for ref in (model_id, model_id[7:], model_id[7:19], f"ai/smollm2@{model_id}"):
        assert store.get(ref).id == model_id


def test_legacy_unprefixed_tags_still_match(store: Store) -> None:
    model_id = add(store, hand_artifact([b"w"]), "ai/smollm2")
    index = json.loads((store.root / "models.json").read_text())
    index["models"][0]["tags"] = ["ai/smollm2:latest"]  # written by an older DMR
    (store.root / "models.json").write_text(json.dumps(index))
    assert store.get("docker.io/ai/smollm2:latest").id == model_id
    assert store.delete("smollm2")[-1] == {"Deleted": model_id}


def test_partial_name_fallback_only_when_asked(store: Store) -> None:
    model_id = add(store, hand_artifact([b"w"]), "myorg/smollm2:v1")
    assert store.find("smollm2") is None
    assert store.get("smollm2", partial=True).id == model_id


def test_unknown_model(store: Store) -> None:
    with pytest.raises(ModelNotFound):
        store.get("ai/nothing")


def test_tag_moves_between_models(store: Store) -> None:
    first = add(store, hand_artifact([b"one"]), "ai/x:a")
    second = add(store, hand_artifact([b"two"]), "ai/y")
    store.tag("ai/y", "ai/x:a")
    assert store.get("ai/x:a").id == second
    assert store.get(first).tags == []


# -- delete semantics, after DMR's delete_test.go --------------------------------------------


def test_delete_by_only_tag_deletes_the_model(store: Store) -> None:
    model_id = add(store, hand_artifact([b"w"]), "ai/m")
    assert store.delete("ai/m") == [
        {"Untagged": "docker.io/ai/m:latest"},
        {"Deleted": model_id},
    ]
    assert store.models() == []
    assert list((store.root / "blobs/sha256").iterdir()) == []
    assert list((store.root / "manifests/sha256").iterdir()) == []


def test_delete_by_one_of_several_tags_only_untags(store: Store) -> None:
    model_id = add(store, hand_artifact([b"w"]), "ai/m", "ai/m:v2")
    assert store.delete("ai/m:v2") == [{"Untagged": "docker.io/ai/m:v2"}]
    assert store.get("ai/m").id == model_id


def test_delete_by_id_with_several_tags_needs_force(store: Store) -> None:
    model_id = add(store, hand_artifact([b"w"]), "ai/m", "ai/m:v2")
    with pytest.raises(Conflict) as err:
        store.delete(model_id[7:19])
    assert err.value.status == 409
    assert "must be forced" in err.value.message
    assert store.get(model_id).tags  # nothing changed
    result = store.delete(model_id[7:19], force=True)
    assert result == [
        {"Untagged": "docker.io/ai/m:latest"},
        {"Untagged": "docker.io/ai/m:v2"},
        {"Deleted": model_id},
    ]


def test_delete_by_id_with_one_tag_and_untagged(store: Store) -> None:
    one = add(store, hand_artifact([b"a"]), "ai/a")
    untagged = add(store, hand_artifact([b"b"]))
    assert store.delete(one) == [{"Untagged": "docker.io/ai/a:latest"}, {"Deleted": one}]
    assert store.delete(untagged) == [{"Deleted": untagged}]


def test_delete_keeps_blobs_other_models_use(store: Store) -> None:
    add(store, hand_artifact([b"shared", b"only-a"]), "ai/a")
    b_id = add(store, hand_artifact([b"shared", b"only-b"]), "ai/b")
    store.delete("ai/a")
    assert store.has_blob(digest_of(b"shared"))
    assert not store.has_blob(digest_of(b"only-a"))
    assert store.get("ai/b").id == b_id


def test_delete_spares_blobs_pinned_by_a_pull(store: Store) -> None:
    add(store, hand_artifact([b"shared"]), "ai/a")
    with store.pinned([digest_of(b"shared")]):
        store.delete("ai/a")
    assert store.has_blob(digest_of(b"shared"))


# -- integrity and safety -----------------------------------------------------------------


def test_corrupt_stream_leaves_nothing_under_the_digest(store: Store) -> None:
    digest = digest_of(b"expected")
    with pytest.raises(DigestMismatch):
        store.write_blob_stream(digest, [b"not what", b" was promised"])
    assert not store.has_blob(digest)
    assert not store.incomplete_path(digest).exists()


def test_write_model_refuses_missing_blobs(store: Store) -> None:
    art = hand_artifact([b"w"])
    store.write_blob_bytes(art.config)
    with pytest.raises(StoreError, match="not in the store"):
        store.write_model(art.manifest, ["ai/m"])
    assert store.models() == []


def test_write_model_rejects_traversal_in_manifest(store: Store) -> None:
    manifest = json.dumps(
        {"config": {"digest": "sha256:../../../etc/passwd"}, "layers": []}
    ).encode()
    with pytest.raises(BadRequest):
        store.write_model(manifest)


def test_purge_refuses_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match=r"layout\.json"):
        Store(home).purge()
    assert (home / "precious.txt").exists()


def test_purge_empties_and_reinitialises(store: Store) -> None:
    add(store, hand_artifact([b"w"]), "ai/m")
    store.purge()
    assert store.models() == []
    assert (store.root / "layout.json").exists()
    assert not (store.root / "blobs").exists()


def test_disk_usage_counts_hard_links_once(store: Store) -> None:
    big = os.urandom(1 << 20)
    add(store, hand_artifact([big]), "ai/m")
    before = store.disk_usage().models
    blob = store.blob_path(digest_of(big))
    os.link(blob, store.root / "bundle-link")
    assert store.disk_usage().models == before
    assert store.disk_usage().reclaimable == 0


def test_disk_usage_reports_reclaimable_partials(store: Store) -> None:
    partial = store.incomplete_path(digest_of(b"x"))
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(os.urandom(1 << 20))
    assert store.disk_usage().reclaimable >= 1 << 20


def test_stale_partials_removed_only_after_seven_days(store: Store) -> None:
    fresh = store.incomplete_path(digest_of(b"fresh"))
    old = store.incomplete_path(digest_of(b"old"))
    fresh.parent.mkdir(parents=True, exist_ok=True)
    fresh.write_bytes(b"1")
    old.write_bytes(b"2")
    eight_days_ago = time.time() - 8 * 24 * 3600
    os.utime(old, (eight_days_ago, eight_days_ago))
    assert store.clean_stale_partials() == [old]
    assert fresh.exists()


def _add_in_process(root: str, n: int) -> None:
    store = Store(Path(root))
    for i in range(n):
        add(store, hand_artifact([f"{os.getpid()}-{i}".encode()]), f"ai/p{os.getpid()}-{i}")


def test_index_updates_from_several_processes_are_not_lost(store: Store) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_in_process, args=(str(store.root), 15)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(store.models()) == 45
