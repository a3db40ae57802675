"""The content-addressed model store, in Docker Model Runner's on-disk layout (spec §5).

```
<root>/layout.json                       {"version": "1.0.0"}
<root>/models.json                       the index
<root>/blobs/sha256/<hex>                layers and configs (verified before they get this name)
<root>/blobs/sha256/<hex>.incomplete     partial downloads, kept for resume
<root>/manifests/sha256/<hex>            raw manifests, named by their digest (= model ID)
<root>/bundles/sha256/<hex>/             runtime view: config.json + model/ hard links
```
Metadata is written atomically; the index is read-modified-written under `IndexLock`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmr_cli.errors import (
    BadRequest,
    Conflict,
    DigestMismatch,
    InvalidReference,
    ModelNotFound,
    StoreError,
)
from dmr_cli.reference import (
    is_model_id,
    normalize_model_name,
    parse_reference,
    try_canonical,
    validate_digest,
)
from dmr_cli.store.fsutil import (
    IndexLock,
    atomic_write,
    file_footprint,
    fsync_dir,
    translate_os_errors,
)
from dmr_cli.store.model import IndexEntry, Model, load_json

LAYOUT_VERSION = "1.0.0"
STALE_PARTIAL_AGE = 7 * 24 * 3600
RESOLVED_CACHE = 1024  # references remembered per index version
_PARTIAL_SUFFIXES = (".incomplete", ".corrupt")


@dataclass
class DiskUsage:
    models: int  # bytes on disk, each (device, inode) counted once
    reclaimable: int  # partial downloads, blobs no model references, and bundles


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = IndexLock(self.root / ".models.json.lock")
        self._pins: Counter[str] = Counter()
        self._pins_lock = threading.Lock()
        self._blob_locks: dict[str, threading.Lock] = {}
        self._index_cache: tuple[tuple[int, int, int], list[IndexEntry]] | None = None
        self._index_path = str(self.root / "models.json")
        # Reference → entry for the current index version: normalising a reference costs
        # more than the rest of a model lookup.
        self._resolved: dict[str, IndexEntry] = {}
        self._content_cache: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}

    # -- layout ---------------------------------------------------------------------------

    def ensure_layout(self) -> None:
        layout = self.root / "layout.json"
        if layout.exists():
            return
        with self._lock.hold():
            if not layout.exists():
                atomic_write(layout, _dumps({"version": LAYOUT_VERSION}))
            if not (self.root / "models.json").exists():
                atomic_write(self.root / "models.json", _dumps({"models": []}))

    # -- blobs ----------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        algorithm, hexpart = validate_digest(digest).split(":", 1)
        return self.root / "blobs" / algorithm / hexpart

    def incomplete_path(self, digest: str) -> Path:
        return self.blob_path(digest).with_name(self.blob_path(digest).name + ".incomplete")

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    @contextlib.contextmanager
    def blob_lock(self, digest: str) -> Iterator[None]:
        """One writer per blob: two pulls sharing a layer download it once."""
        with self._pins_lock:
            lock = self._blob_locks.setdefault(digest, threading.Lock())
        with lock:
            yield

    @contextlib.contextmanager
    def pinned(self, digests: Iterable[str]) -> Iterator[None]:
        """Keep blobs a pull in progress relies on safe from a concurrent delete's GC."""
        pinned = list(digests)
        with self._pins_lock:
            self._pins.update(pinned)
        try:
            yield
        finally:
            with self._pins_lock:
                self._pins.subtract(pinned)
                self._pins += Counter()  # drop zero counts

    def write_blob_bytes(self, data: bytes, digest: str | None = None) -> str:
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest is not None and digest != actual:
            raise DigestMismatch(f"blob digest mismatch: expected {digest}, got {actual}")
        path = self.blob_path(actual)
        if not path.exists():
            atomic_write(path, data)
        return actual

    def write_blob_stream(
        self,
        digest: str,
        chunks: Iterable[bytes],
        progress: Callable[[int], None] | None = None,
    ) -> None:
        final = self.blob_path(digest)
        partial = self.incomplete_path(digest)
        algorithm = digest.split(":", 1)[0]
        hasher = hashlib.new(algorithm)
        final.parent.mkdir(parents=True, exist_ok=True)
        with self.blob_lock(digest), translate_os_errors(f"writing blob {digest[:19]}"):
            with open(partial, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    hasher.update(chunk)
                    if progress:
                        progress(len(chunk))
                f.flush()
                os.fsync(f.fileno())
            actual = f"{algorithm}:{hasher.hexdigest()}"
            if actual != digest:
                partial.unlink(missing_ok=True)
                raise DigestMismatch(
                    f"blob digest mismatch: expected {digest}, got {actual}; nothing was stored"
                )
            os.replace(partial, final)
            fsync_dir(final.parent)

    # -- index ----------------------------------------------------------------------------

    def _read_index(self) -> list[IndexEntry]:
        """The index; callers get copies they may modify."""
        return [IndexEntry(e.id, list(e.tags), list(e.files)) for e in self._entries()]

    def _entries(self) -> list[IndexEntry]:
        """The index as parsed, not to be modified: parsed once per version of the file
        (every request resolves a model, so this is on the inference hot path)."""
        path = self._index_path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._resolved.clear()
            return []
        version = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._index_cache is None or self._index_cache[0] != version:
            self._resolved.clear()
            try:
                entries = [
                    IndexEntry.from_json(m)
                    for m in (load_json(Path(path).read_bytes()).get("models") or [])
                ]
            except FileNotFoundError:
                return []
            except (ValueError, KeyError, TypeError) as exc:
                raise StoreError(
                    f"the model index {path} is corrupt: {exc}",
                    hint="restore it from a backup or run `dmr purge` to start over",
                ) from exc
            self._index_cache = (version, entries)
        return self._index_cache[1]

    def _write_index(self, entries: Sequence[IndexEntry]) -> None:
        atomic_write(self.root / "models.json", _dumps({"models": [e.to_json() for e in entries]}))

    def _load(self, entry: IndexEntry) -> Model:
        # Manifests and configs are content-addressed, so what was read once stays true.
        cached = self._content_cache.get(entry.id)
        if cached is None:
            manifest = load_json(self.manifest_bytes(entry.id))
            raw_config = load_json(self.blob_path(manifest["config"]["digest"]).read_bytes())
            cached = self._content_cache[entry.id] = (manifest, raw_config)
        return Model(
            id=entry.id,
            tags=list(entry.tags),
            files=list(entry.files),
            manifest=cached[0],
            raw_config=cached[1],
        )

    def manifest_bytes(self, model_id: str) -> bytes:
        _, hexpart = validate_digest(model_id).split(":", 1)
        try:
            return (self.root / "manifests" / "sha256" / hexpart).read_bytes()
        except FileNotFoundError as exc:
            raise StoreError(f"manifest of model {model_id} is missing from the store") from exc

    def models(self) -> list[Model]:
        out = []
        for entry in self._read_index():
            with contextlib.suppress(OSError, ValueError, KeyError, StoreError):
                out.append(self._load(entry))
        return out

    def _resolve_id(self, short: str, entries: Sequence[IndexEntry]) -> str | None:
        hexpart = short.removeprefix("sha256:")
        for entry in entries:
            if entry.id.removeprefix("sha256:").startswith(hexpart):
                return entry.id
        return None

    def _match(self, ref: str, entries: Sequence[IndexEntry]) -> IndexEntry | None:
        """DMR's `MatchesReference`: ID, digest reference, or canonical tag equality."""
        name = normalize_model_name(ref, lambda s: self._resolve_id(s, entries))
        for entry in entries:
            if name == entry.id:
                return entry
        if is_model_id(name):
            return None
        canonical = try_canonical(name)
        if canonical is None:
            return None
        if "@" in canonical:
            digest = canonical.split("@", 1)[1]
            return next((e for e in entries if e.id == digest), None)
        return next((e for e in entries if e.has_tag(canonical)), None)

    def find(self, ref: str, *, partial: bool = False) -> Model | None:
        entries = self._entries()
        entry = self._resolved.get(ref) if not partial else None
        if entry is None:
            entry = self._match(ref, entries)
            if entry is None and partial:
                entry = _partial_match(ref, entries)
            elif entry is not None and len(self._resolved) < RESOLVED_CACHE:
                self._resolved[ref] = entry
        return self._load(entry) if entry else None

    def get(self, ref: str, *, partial: bool = False) -> Model:
        model = self.find(ref, partial=partial)
        if model is None:
            raise ModelNotFound(f"model not found: {ref}", hint=f"pull it first: dmr pull {ref}")
        return model

    # -- writes ---------------------------------------------------------------------------

    def write_model(self, manifest: bytes, tags: Sequence[str] = ()) -> str:
        """Record a model whose blobs are all present; idempotent by ID; adds `tags`."""
        try:
            parsed = load_json(manifest)
            config_digest = validate_digest(parsed["config"]["digest"])
            layer_digests = [validate_digest(layer["digest"]) for layer in parsed["layers"]]
        except (ValueError, KeyError, TypeError, InvalidReference) as exc:
            raise BadRequest(f"invalid manifest: {exc}") from exc
        missing = [d for d in [*layer_digests, config_digest] if not self.has_blob(d)]
        if missing:
            raise StoreError(f"cannot write manifest: blob {missing[0]} is not in the store")
        model_id = "sha256:" + hashlib.sha256(manifest).hexdigest()
        canonical_tags = [parse_reference(normalize_model_name(t)).tag_string for t in tags]
        self.ensure_layout()
        with self._lock.hold():
            manifest_path = self.root / "manifests" / "sha256" / model_id[7:]
            if not manifest_path.exists():
                atomic_write(manifest_path, manifest)
            entries = self._read_index()
            entry = next((e for e in entries if e.id == model_id), None)
            if entry is None:
                entry = IndexEntry(id=model_id, files=[*layer_digests, config_digest])
                entries.append(entry)
            for tag in canonical_tags:
                _move_tag(entries, entry, tag)
            self._write_index(entries)
        return model_id

    def tag(self, source: str, target: str) -> str:
        """Add `target` to the model `source` names; a tag lives on one model only."""
        canonical = parse_reference(normalize_model_name(target)).tag_string
        with self._lock.hold():
            entries = self._read_index()
            entry = self._match(source, entries) or _partial_match(source, entries)
            if entry is None:
                raise ModelNotFound(f"model not found: {source}")
            _move_tag(entries, entry, canonical)
            self._write_index(entries)
        return canonical

    def delete(self, ref: str, *, force: bool = False) -> list[dict[str, str]]:
        """Untag or delete, exactly as DMR's DeleteModel (spec §2.5)."""
        with self._lock.hold():
            entries = self._read_index()
            entry = self._match(ref, entries)
            if entry is None:
                raise ModelNotFound(f"model not found: {ref}")
            name = normalize_model_name(ref, lambda s: self._resolve_id(s, entries))
            by_id = name == entry.id or "@" in name
            result: list[dict[str, str]] = []
            if not by_id:
                canonical = try_canonical(name)
                removed = [t for t in entry.tags if t == canonical or try_canonical(t) == canonical]
                entry.tags = [t for t in entry.tags if t not in removed]
                result += [{"Untagged": t} for t in removed]
                if entry.tags:
                    self._write_index(entries)
                    return result
            elif len(entry.tags) > 1 and not force:
                raise Conflict(
                    f'unable to delete "{ref}" (must be forced) due to multiple tag references: '
                    "resource conflict",
                    hint=f"untag with dmr rm <tag>, or force: dmr rm -f {ref}",
                )
            result += [{"Untagged": t} for t in entry.tags]
            entries.remove(entry)
            self._write_index(entries)
            self._remove_model_files(entry, entries)
            result.append({"Deleted": entry.id})
            return result

    def _remove_model_files(self, entry: IndexEntry, remaining: Sequence[IndexEntry]) -> None:
        """GC: the manifest, the bundle and every blob no remaining model (or pull) uses."""
        hexpart = entry.id.removeprefix("sha256:")
        (self.root / "manifests" / "sha256" / hexpart).unlink(missing_ok=True)
        shutil.rmtree(self.root / "bundles" / "sha256" / hexpart, ignore_errors=True)
        in_use = {f for e in remaining for f in e.files}
        with self._pins_lock:
            in_use |= set(self._pins)
        for digest in entry.files:
            if digest not in in_use:
                with contextlib.suppress(FileNotFoundError, StoreError):
                    self.blob_path(digest).unlink()

    def purge(self) -> None:
        """Remove everything in the store, refusing a directory that is not a store."""
        with self._lock.hold():
            if not self.root.exists():
                self.ensure_layout()
                return
            children = [p for p in self.root.iterdir() if p.name != self._lock_name]
            if children and not (self.root / "layout.json").exists():
                raise StoreError(
                    f"refusing to purge {self.root}: it has no layout.json, so it does not look "
                    "like a model store"
                )
            for child in children:
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            self.ensure_layout()

    @property
    def _lock_name(self) -> str:
        return ".models.json.lock"

    # -- bundles --------------------------------------------------------------------------

    def bundle(self, model_id: str) -> Path:
        """The runtime view of a model: hard links into blobs (copies across filesystems)."""
        from dmr_cli.distribution.artifact import model_files

        model = self._load(IndexEntry(id=validate_digest(model_id)))
        root = self.root / "bundles" / "sha256" / model_id.removeprefix("sha256:")
        config_path = root / "config.json"
        placements = model_files(model.manifest)
        if config_path.exists() and all((root / rel).exists() for _, rel in placements):
            return root
        shutil.rmtree(root, ignore_errors=True)
        with translate_os_errors("building the model bundle"):
            for layer, rel in placements:
                target = root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                source = self.blob_path(layer["digest"])
                try:
                    os.link(source, target)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                        raise
                    shutil.copyfile(source, target)
            atomic_write(config_path, json.dumps(model.config).encode())
        return root

    # -- disk usage and cleanup -----------------------------------------------------------

    def disk_usage(self) -> DiskUsage:
        seen: set[tuple[int, int]] = set()
        total = 0
        referenced = {f for e in self._read_index() for f in e.files}
        reclaimable_inodes: set[tuple[int, int]] = set()
        kept_inodes: set[tuple[int, int]] = set()
        sizes: dict[tuple[int, int], int] = {}
        for path in _walk_files(self.root):
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            key = (st.st_dev, st.st_ino)
            sizes[key] = file_footprint(st)
            if key not in seen:
                seen.add(key)
                total += sizes[key]
            rel = path.relative_to(self.root).parts
            if rel[0] == "blobs" and len(rel) == 3:
                digest = f"{rel[1]}:{rel[2]}"
                if rel[2].endswith(_PARTIAL_SUFFIXES) or digest not in referenced:
                    reclaimable_inodes.add(key)
                else:
                    kept_inodes.add(key)
            elif rel[0] in ("bundles", "tmp"):
                reclaimable_inodes.add(key)
        reclaimable = sum(sizes[k] for k in reclaimable_inodes - kept_inodes)
        return DiskUsage(models=total, reclaimable=reclaimable)

    def clean_stale_partials(self, max_age: float = STALE_PARTIAL_AGE) -> list[Path]:
        """Remove partial downloads untouched for `max_age` seconds (never called at start-up)."""
        removed = []
        cutoff = time.time() - max_age
        for algorithm_dir in (self.root / "blobs").glob("*"):
            for path in algorithm_dir.iterdir():
                if ".incomplete" in path.name or path.name.endswith(".corrupt"):
                    with contextlib.suppress(FileNotFoundError):
                        if path.stat().st_mtime < cutoff:
                            path.unlink()
                            removed.append(path)
        for staging in (self.root / "tmp").glob("*"):  # Hugging Face downloads kept for resume
            newest = max((p.stat().st_mtime for p in _walk_files(staging)), default=0.0)
            if max(newest, staging.stat().st_mtime) < cutoff:
                shutil.rmtree(staging, ignore_errors=True)
                removed.append(staging)
        return removed


def _dumps(value: Any) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


def _move_tag(entries: Sequence[IndexEntry], target: IndexEntry, canonical: str) -> None:
    for entry in entries:
        if entry is not target:
            entry.tags = [t for t in entry.tags if t != canonical and try_canonical(t) != canonical]
    if not target.has_tag(canonical):
        target.tags.append(canonical)


def _partial_match(ref: str, entries: Sequence[IndexEntry]) -> IndexEntry | None:
    """DMR's fallback: a tag whose last path element (without `:tag`) equals `ref`."""
    for entry in entries:
        for tag in entry.tags:
            last = tag.rsplit("/", 1)[-1]
            if last.split(":", 1)[0] == ref:
                return entry
    return None


def _walk_files(root: Path) -> Iterator[Path]:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            yield Path(dirpath) / name
