"""Model archives: DMR's export/load tar layout (spec §2.5).

```
blobs/                 directory entries
blobs/sha256/
blobs/sha256/<hex>     each layer, then the config (mode 0666)
manifest.json          the raw manifest, last; its sha256 is the model ID
```
Both directions stream: writing works on a pipe, reading never seeks, and each blob goes
to the store through its verifying writer.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol, cast

from dmr_cli.errors import BadRequest, InvalidReference
from dmr_cli.reference import validate_digest

if TYPE_CHECKING:
    from dmr_cli.store import Store

MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_SIZE = 4 << 20  # real manifests are a few KB; refuse to buffer anything huge

_CHUNK = 1 << 20
_BLOB_NAME = re.compile(r"^blobs/(?P<algorithm>[a-z0-9]+)/(?P<hex>[^/]+)$")
_DIR_NAME = re.compile(r"^blobs(/[a-z0-9]+)?$")


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


def write_model_tar(
    out: Writable, manifest: bytes, blobs: Sequence[tuple[str, Path | bytes]]
) -> None:
    """Write the archive of a model: `blobs` (digest, file or bytes) in order, then the manifest."""
    # Stream modes ("w|", "r|") only ever call write() or read(): a pipe or a socket will do;
    # a large bufsize keeps those calls few.
    fileobj = cast(IO[bytes], out)
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT, bufsize=_CHUNK) as tar:
        directories: set[str] = set()
        written: set[str] = set()
        for digest, source in blobs:
            algorithm, hexpart = _split_digest(digest)
            if digest in written:
                continue
            written.add(digest)
            for directory in ("blobs", f"blobs/{algorithm}"):
                if directory not in directories:
                    directories.add(directory)
                    tar.addfile(_entry(directory, tarfile.DIRTYPE, 0, 0o755))
            name = f"blobs/{algorithm}/{hexpart}"
            if isinstance(source, bytes):
                tar.addfile(_entry(name, tarfile.REGTYPE, len(source)), io.BytesIO(source))
            else:
                with open(source, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    tar.addfile(_entry(name, tarfile.REGTYPE, size), f)
        tar.addfile(_entry(MANIFEST_NAME, tarfile.REGTYPE, len(manifest)), io.BytesIO(manifest))


def read_model_tar(stream: Readable, store: Store) -> str:
    """Load an archive into the store (no tags) and return the model ID.

    Only `blobs/<algorithm>/<hex>` files, their directories and `manifest.json` are
    accepted; a link, a device or any other path is refused when it is met. Nothing is
    written outside the store's blob directory, and the model is recorded only once the
    whole archive has been read and every blob its manifest names is present.
    """
    manifest: bytes | None = None
    try:
        # A large bufsize: each read() may be a thread hop into an HTTP body.
        with tarfile.open(fileobj=cast(IO[bytes], stream), mode="r|", bufsize=_CHUNK) as tar:
            for member in tar:
                name = _clean_name(member.name)
                if member.isdir() and _DIR_NAME.match(name):
                    continue
                if not member.isreg():
                    raise BadRequest(
                        f"model archive entry {member.name!r} is not a regular file "
                        "(links, devices and other special entries are not allowed)"
                    )
                if name == MANIFEST_NAME:
                    if manifest is not None:
                        raise BadRequest("model archive has more than one manifest.json")
                    manifest = _read_manifest(tar, member)
                    continue
                digest = _blob_digest(name, member.name)
                if store.has_blob(digest):
                    continue  # verified when it was stored; this copy is passed over
                source = tar.extractfile(member)
                if source is None:
                    raise BadRequest(f"model archive entry {member.name!r} has no data")
                store.write_blob_stream(digest, _chunks(source))
    except (tarfile.TarError, EOFError) as exc:
        raise BadRequest(f"invalid model archive: {exc}") from exc
    if manifest is None:
        raise BadRequest("model archive has no manifest.json")
    for digest in _referenced_digests(manifest):
        if not store.has_blob(digest):
            raise BadRequest(
                f"model archive is incomplete: blob {digest} named by its manifest is missing"
            )
    return store.write_model(manifest)


def _entry(name: str, kind: bytes, size: int, mode: int = 0o666) -> tarfile.TarInfo:
    # Fixed owner and times: the same model always gives the same archive bytes.
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.mtime = kind, size, mode, 0
    return info


def _split_digest(digest: str) -> tuple[str, str]:
    algorithm, hexpart = validate_digest(digest).split(":", 1)
    return algorithm, hexpart


def _clean_name(name: str) -> str:
    """The entry name without `./` and trailing `/`; absolute or `..` names are refused."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or "\\" in name:
        raise BadRequest(f"model archive entry {name!r} has an unsafe path")
    return "/".join(parts)


def _blob_digest(name: str, raw_name: str) -> str:
    match = _BLOB_NAME.match(name)
    if not match:
        raise BadRequest(
            f"unexpected entry {raw_name!r} in model archive "
            "(expected blobs/<algorithm>/<hex> and manifest.json)"
        )
    digest = f"{match['algorithm']}:{match['hex']}"
    try:
        return validate_digest(digest)
    except InvalidReference as exc:
        raise BadRequest(f"model archive entry {raw_name!r}: {exc}") from exc


def _read_manifest(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if member.size > MAX_MANIFEST_SIZE:
        raise BadRequest(f"manifest.json is too large ({member.size} bytes)")
    source = tar.extractfile(member)
    return source.read() if source is not None else b""


def _referenced_digests(manifest: bytes) -> list[str]:
    try:
        parsed = json.loads(manifest)
        descriptors = [parsed["config"], *parsed["layers"]]
        return [validate_digest(d["digest"]) for d in descriptors]
    except (ValueError, KeyError, TypeError, InvalidReference) as exc:
        raise BadRequest(f"invalid manifest.json in model archive: {exc}") from exc


def _chunks(source: IO[bytes]) -> Iterator[bytes]:
    while chunk := source.read(_CHUNK):
        yield chunk
