from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import pytest

from dmr_cli.distribution.artifact import Artifact, build_gguf_artifact
from dmr_cli.distribution.tarball import read_model_tar, write_model_tar
from dmr_cli.errors import BadRequest, DigestMismatch
from dmr_cli.store import Store
from tests.helpers.gguf_factory import make_sharded, make_tiny_llama

CREATED = datetime(2025, 3, 24, 12, 9, 41, tzinfo=timezone.utc)


@pytest.fixture
def artifact(tmp_path: Path) -> Artifact:
    shards = make_sharded(tmp_path / "tiny", 2)
    license_path = tmp_path / "LICENSE"
    license_path.write_text("MIT")
    return build_gguf_artifact(shards[0], licenses=[license_path], created=CREATED)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def tar_bytes(artifact: Artifact) -> bytes:
    out = io.BytesIO()
    write_model_tar(out, artifact.manifest, artifact.blobs())
    return out.getvalue()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class WriteOnly:
    """Nothing but write(): no tell, no seek, like a socket or an HTTP request body."""

    def __init__(self, target: BinaryIO) -> None:
        self._target = target

    def write(self, data: bytes) -> int:
        return self._target.write(data)


class ReadOnly:
    def __init__(self, source: BinaryIO) -> None:
        self._source = source

    def read(self, size: int = -1) -> bytes:
        return self._source.read(size)


def test_round_trip_through_a_pipe(artifact: Artifact, store: Store) -> None:
    """The writer streams into a pipe (not seekable) while the reader loads from it."""
    read_fd, write_fd = os.pipe()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(write_fd, "wb") as out:
                write_model_tar(WriteOnly(out), artifact.manifest, artifact.blobs())
        except BaseException as exc:  # surfaced in the test thread below
            errors.append(exc)

    producer = threading.Thread(target=produce)
    producer.start()
    with os.fdopen(read_fd, "rb") as source:
        model_id = read_model_tar(ReadOnly(source), store)
    producer.join()
    assert errors == []

    assert model_id == artifact.id
    assert store.manifest_bytes(model_id) == artifact.manifest
    for digest, source in artifact.blobs():
        expected = source if isinstance(source, bytes) else source.read_bytes()
        assert store.blob_path(digest).read_bytes() == expected
    model = store.get(model_id)
    assert model.tags == []  # loading never tags; the CLI tags afterwards
    assert model.config == json.loads(artifact.config)["config"]


def test_archive_layout(artifact: Artifact) -> None:
    data = tar_bytes(artifact)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        blob_names = [f"blobs/{d.replace(':', '/')}" for d, _ in artifact.blobs()]
        assert [m.name for m in members] == ["blobs", "blobs/sha256", *blob_names, "manifest.json"]
        assert [m.isdir() for m in members[:2]] == [True, True]
        for member, (digest, source) in zip(members[2:-1], artifact.blobs(), strict=True):
            assert member.isreg() and member.mode == 0o666
            content = tar.extractfile(member)
            assert content is not None
            assert digest_of(content.read()) == digest
            size = len(source) if isinstance(source, bytes) else source.stat().st_size
            assert member.size == size
        manifest = tar.extractfile(members[-1])
        assert manifest is not None and manifest.read() == artifact.manifest
    assert tar_bytes(artifact) == data  # the same model always gives the same bytes


def test_repeated_blobs_are_written_once(tmp_path: Path) -> None:
    gguf_path = make_tiny_llama(tmp_path / "t.gguf")
    license_path = tmp_path / "LICENSE"
    license_path.write_text("MIT")
    twice = build_gguf_artifact(gguf_path, licenses=[license_path, license_path])
    with tarfile.open(fileobj=io.BytesIO(tar_bytes(twice))) as tar:
        names = tar.getnames()
    assert len(names) == len(set(names)) == 2 + 3 + 1  # dirs, gguf + license + config, manifest


def test_blobs_already_stored_are_skipped(artifact: Artifact, store: Store) -> None:
    data = tar_bytes(artifact)
    first = read_model_tar(io.BytesIO(data), store)
    assert read_model_tar(io.BytesIO(data), store) == first
    # A manifest whose blobs are all in the store loads from an archive holding only it.
    only_manifest = build_tar([("manifest.json", tarfile.REGTYPE, artifact.manifest)])
    assert read_model_tar(io.BytesIO(only_manifest), store) == first


def test_leading_dot_slash_names_are_accepted(artifact: Artifact, store: Store) -> None:
    entries: list[tuple[str, bytes, bytes]] = [("./blobs/", tarfile.DIRTYPE, b"")]
    for digest, source in artifact.blobs():
        data = source if isinstance(source, bytes) else source.read_bytes()
        entries.append((f"./blobs/{digest.replace(':', '/')}", tarfile.REGTYPE, data))
    entries.append(("./manifest.json", tarfile.REGTYPE, artifact.manifest))
    assert read_model_tar(io.BytesIO(build_tar(entries)), store) == artifact.id


def build_tar(
    entries: list[tuple[str, bytes, bytes]], tweak: Callable[[tarfile.TarInfo], None] | None = None
) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(data)
            elif kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = data.decode()
            if tweak:
                tweak(info)
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return out.getvalue()


BLOB = b"hello blob"
BLOB_NAME = f"blobs/sha256/{hashlib.sha256(BLOB).hexdigest()}"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (("../evil", tarfile.REGTYPE, BLOB), "unsafe path"),
        (("blobs/sha256/../../../evil", tarfile.REGTYPE, BLOB), "unsafe path"),
        (("/etc/evil", tarfile.REGTYPE, BLOB), "unsafe path"),
        ((BLOB_NAME, tarfile.SYMTYPE, b"/etc/passwd"), "not a regular file"),
        ((BLOB_NAME, tarfile.LNKTYPE, b"/etc/passwd"), "not a regular file"),
        (("blobs/sha256/dev", tarfile.CHRTYPE, b""), "not a regular file"),
        (("blobs/sha256/fifo", tarfile.FIFOTYPE, b""), "not a regular file"),
        (("other/", tarfile.DIRTYPE, b""), "not a regular file"),
        (("notes.txt", tarfile.REGTYPE, BLOB), "unexpected entry"),
        (("blobs/sha256/xyz", tarfile.REGTYPE, BLOB), "invalid digest"),
        (("blobs/md5/" + "0" * 32, tarfile.REGTYPE, BLOB), "invalid digest"),
        (("blobs/sha256/a/b", tarfile.REGTYPE, BLOB), "unexpected entry"),
    ],
)
def test_malicious_entries_are_refused(
    tmp_path: Path, store: Store, entry: tuple[str, bytes, bytes], message: str
) -> None:
    archive = build_tar([entry, ("manifest.json", tarfile.REGTYPE, b"{}")])
    with pytest.raises(BadRequest, match=message):
        read_model_tar(io.BytesIO(archive), store)
    assert not (tmp_path / "evil").exists()
    assert not (store.root / "manifests").exists()


def test_manifest_naming_a_missing_blob(artifact: Artifact, store: Store) -> None:
    manifest = json.loads(artifact.manifest)
    missing = manifest["layers"][0]["digest"]
    config_name = f"blobs/{artifact.config_digest.replace(':', '/')}"
    entries = [  # the config travels, the layers do not
        (config_name, tarfile.REGTYPE, artifact.config),
        ("manifest.json", tarfile.REGTYPE, artifact.manifest),
    ]
    with pytest.raises(BadRequest, match=missing):
        read_model_tar(io.BytesIO(build_tar(entries)), store)
    assert store.find(artifact.id) is None


def test_archive_without_manifest(store: Store) -> None:
    with pytest.raises(BadRequest, match=r"no manifest\.json"):
        read_model_tar(io.BytesIO(build_tar([(BLOB_NAME, tarfile.REGTYPE, BLOB)])), store)


def test_two_manifests(store: Store) -> None:
    entries = [("manifest.json", tarfile.REGTYPE, b"{}")] * 2
    with pytest.raises(BadRequest, match="more than one"):
        read_model_tar(io.BytesIO(build_tar(entries)), store)


def test_oversized_manifest(store: Store) -> None:
    archive = build_tar([("manifest.json", tarfile.REGTYPE, b" " * (5 << 20))])
    with pytest.raises(BadRequest, match="too large"):
        read_model_tar(io.BytesIO(archive), store)


def test_invalid_manifest(store: Store) -> None:
    archive = build_tar([("manifest.json", tarfile.REGTYPE, b'{"layers": "nope"}')])
    with pytest.raises(BadRequest, match="invalid manifest"):
        read_model_tar(io.BytesIO(archive), store)


def test_blob_whose_bytes_do_not_match_its_name(store: Store) -> None:
    wrong = f"blobs/sha256/{'ab' * 32}"
    archive = build_tar([(wrong, tarfile.REGTYPE, BLOB), ("manifest.json", tarfile.REGTYPE, b"{}")])
    with pytest.raises(DigestMismatch):
        read_model_tar(io.BytesIO(archive), store)
    assert not store.has_blob("sha256:" + "ab" * 32)


def test_truncated_and_garbage_archives(artifact: Artifact, store: Store) -> None:
    data = tar_bytes(artifact)
    with pytest.raises(BadRequest, match="unexpected end of data"):
        read_model_tar(io.BytesIO(data[: len(data) // 2]), store)
    assert store.find(artifact.id) is None
    with pytest.raises(BadRequest, match="invalid model archive"):
        read_model_tar(io.BytesIO(b"\x01" * 2048), store)
