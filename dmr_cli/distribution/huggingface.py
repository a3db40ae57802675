"""Hugging Face native pulls (spec §6.4): list a repository, pick the files, download them.

`select_files` is DMR's choice of files (weights of one quantization, a multimodal projector,
a chat template, licenses); `pull_huggingface` lists the repository at its current commit,
selects, and downloads into a directory, verifying sizes and LFS sha256 digests. Building
the OCI artifact and storing it is the caller's job (`distribution/pull.py`).

Deliberate differences from DMR, each because DMR's behaviour surprises its users:
* an explicit quantization that matches none of several files is an error listing what the
  repository has, instead of silently pulling another quantization under the requested tag;
* when several distinct files match a quantization, one set (a file or all its shards) is
  chosen, never files of different models mixed together;
* `tokenizer_config.json` is not used as a Jinja chat template (it is JSON);
* progress messages never claim a quantization that was not found.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from dmr_cli import __version__, config
from dmr_cli.distribution.pull import LayerProgress, event
from dmr_cli.errors import (
    Cancelled,
    DigestMismatch,
    InvalidReference,
    ModelNotFound,
    RegistryError,
    Unauthorized,
    UnsupportedMediaType,
)
from dmr_cli.reference import Reference
from dmr_cli.store.fsutil import translate_os_errors

if TYPE_CHECKING:
    import httpx

HF_ENDPOINT = "https://huggingface.co"
DEFAULT_QUANTIZATION = "Q4_K_M"
MAX_PARALLEL_DOWNLOADS = 4
MiB = 1024 * 1024

_DEFAULT_TAGS = ("", "latest", "main")
_WEIGHT_FORMATS = ("gguf", "safetensors", "dduf")  # preference order in a mixed repository
_LICENSE_WORDS = ("license", "licence", "copying", "notice")
_CONFIG_SUFFIXES = (".md", ".txt", ".json", ".vocab")
_SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 256 * 1024
_TOKEN_HINT = "set HF_TOKEN to a Hugging Face access token that can read the repository"

Progress = Callable[[dict[str, Any]], None]


def endpoint() -> str:
    """The Hub's base URL: `HF_ENDPOINT` (a mirror, or a test server) or huggingface.co."""
    return (config.env("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")


@dataclass(frozen=True)
class HFFile:
    """A file of a repository as the tree API lists it."""

    path: str
    size: int  # the real size (the LFS size for LFS files)
    sha256: str | None = None  # LFS oid: the sha256 of the content
    oid: str = ""  # git blob id

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @classmethod
    def from_api(cls, entry: Mapping[str, Any]) -> HFFile:
        """Parse a tree entry; paths that could escape the download directory are refused."""
        path = entry.get("path")
        if not isinstance(path, str) or not _safe_path(path):
            raise RegistryError(f"Hugging Face listed an unusable file path: {path!r}")
        lfs = entry.get("lfs") or {}
        sha = lfs.get("oid") or lfs.get("sha256")
        if sha is not None and not (isinstance(sha, str) and _SHA256_HEX.match(sha)):
            raise RegistryError(f"Hugging Face listed {path} with a malformed LFS oid")
        size = lfs.get("size", entry.get("size", 0))
        if not isinstance(size, int) or size < 0:
            raise RegistryError(f"Hugging Face listed {path} with a malformed size")
        return cls(path=path, size=size, sha256=sha, oid=str(entry.get("oid") or ""))


def _safe_path(path: str) -> bool:
    # Split by hand: PurePosixPath would silently drop "." and empty components.
    return (
        "\\" not in path
        and "\0" not in path
        and all(part not in ("", ".", "..") for part in path.split("/"))
    )


@dataclass(frozen=True)
class Selection:
    """The files a pull downloads, by role."""

    format: str  # gguf | safetensors | dduf
    weights: tuple[HFFile, ...]  # shards in order
    mmproj: HFFile | None = None
    chat_template: HFFile | None = None
    licenses: tuple[HFFile, ...] = ()
    configs: tuple[HFFile, ...] = ()  # only for safetensors/dduf: GGUF carries its own
    message: str | None = None  # "Selected Q4_K_M quantization (default)" when there was a choice

    @property
    def files(self) -> list[HFFile]:
        extra = [f for f in (self.mmproj, self.chat_template) if f is not None]
        unique = {f.path: f for f in [*self.weights, *extra, *self.licenses, *self.configs]}
        return list(unique.values())

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class HFResult:
    """Local paths of a finished download."""

    repo: str
    revision: str  # the commit the files were read at
    format: str
    weights: list[Path]
    mmproj: Path | None
    chat_template: Path | None
    licenses: list[Path]
    configs: list[Path]
    last_modified: datetime | None  # repo lastModified: the artifact's `created`, for stable IDs


def classify(name: str) -> str:
    """DMR's file classes: gguf, safetensors, dduf, chat_template, license, config, other."""
    lower = PurePosixPath(name).name.lower()
    for fmt in _WEIGHT_FORMATS:
        if lower.endswith(f".{fmt}"):
            return fmt
    if lower.endswith(".jinja") or "chat_template" in lower:
        return "chat_template"
    if any(word in lower for word in _LICENSE_WORDS):
        return "license"
    if lower.endswith(_CONFIG_SUFFIXES) or lower == "tokenizer.model":
        return "config"
    return "other"


def select_files(files: list[HFFile], tag: str, *, repo: str = "the repository") -> Selection:
    """Choose what to download for `tag` (spec §6.4 steps 3–4)."""
    by_class: dict[str, list[HFFile]] = {}
    for f in sorted(files, key=lambda f: (f.path.count("/"), f.path)):
        by_class.setdefault(classify(f.path), []).append(f)
    fmt = next((fmt for fmt in _WEIGHT_FORMATS if by_class.get(fmt)), None)
    if fmt is None:
        raise ModelNotFound(f"no GGUF, safetensors or DDUF weights in {repo}")
    templates = by_class.get("chat_template", [])
    template = templates[0] if templates else None
    licenses = tuple(sorted(by_class.get("license", []), key=lambda f: f.path))
    if fmt == "gguf":
        weights, mmproj, message = _select_gguf(by_class["gguf"], tag, repo)
        return Selection(
            format=fmt,
            weights=weights,
            mmproj=mmproj,
            chat_template=template,
            licenses=licenses,
            message=message,
        )
    others = sorted(by_class[fmt], key=lambda f: f.path)
    return Selection(
        format=fmt,
        weights=tuple(others[:1] if fmt == "dduf" else others),  # one DDUF = a whole pipeline
        chat_template=template,
        licenses=licenses,
        configs=tuple(sorted(by_class.get("config", []), key=lambda f: f.path)),
    )


def _select_gguf(
    ggufs: list[HFFile], tag: str, repo: str
) -> tuple[tuple[HFFile, ...], HFFile | None, str | None]:
    """Weights (one file or one shard set), projector, and the "Selected ..." message."""
    projectors = sorted((f for f in ggufs if "mmproj" in f.name.lower()), key=_name_key)
    models = [f for f in ggufs if "mmproj" not in f.name.lower()]
    if not models:
        raise ModelNotFound(f"{repo} holds only multimodal projector GGUF files, no model")
    sets = _file_sets(models)
    quant = None if tag.lower() in _DEFAULT_TAGS else tag
    message = None
    if len(sets) == 1:
        chosen = sets[0]
    else:
        wanted = quant or DEFAULT_QUANTIZATION
        chosen_or_none = _best_match(sets, wanted)
        if chosen_or_none is not None:
            chosen = chosen_or_none
            message = f"Selected {wanted} quantization" + ("" if quant else " (default)")
        elif quant:
            names = ", ".join(s[0].name for s in sets[:12])
            raise ModelNotFound(
                f"no GGUF file in {repo} matches quantization {quant!r}",
                hint=f"files there: {names}",
            )
        else:
            chosen = sets[0]
            message = f"Selected {chosen[0].name} (no {DEFAULT_QUANTIZATION} quantization found)"
    _check_shards(chosen, repo)
    # Prefer an F16 projector (not BF16, which fewer backends accept), as DMR does.
    f16 = [f for f in projectors if re.search(r"(?<!b)f16", f.name.lower())]
    return tuple(chosen), next(iter(f16 or projectors), None), message


def _name_key(f: HFFile) -> tuple[str, str]:
    return (f.name, f.path)


def _file_sets(models: Iterable[HFFile]) -> list[list[HFFile]]:
    """Group shards (`x-00001-of-00003.gguf`, ...) with their siblings; sorted by first name."""
    groups: dict[tuple[str, ...], list[HFFile]] = {}
    for f in models:
        shard = _SHARD_RE.search(f.name)
        parent = str(PurePosixPath(f.path).parent)
        key = (parent, f.name[: shard.start()], shard.group(2)) if shard else (f.path,)
        groups.setdefault(key, []).append(f)
    return sorted(
        (sorted(g, key=_name_key) for g in groups.values()), key=lambda g: _name_key(g[0])
    )


def _match_rank(f: HFFile, quant: str) -> int:
    """2: `<sep>QUANT` followed by end, `-` or `.` (or a directory named QUANT);
    1: followed by `_` (so `Q4_K` still finds `Q4_K_M` when nothing is exactly `Q4_K`); 0: no.
    """
    q = quant.lower()
    if any(part.lower() == q for part in PurePosixPath(f.path).parts[:-1]):
        return 2
    stem = f.name.lower().removesuffix(".gguf")
    ranks = [
        2 if m.group(1) != "_" else 1 for m in re.finditer(rf"[-._]{re.escape(q)}($|[-._])", stem)
    ]
    return max(ranks, default=0)


def _best_match(sets: list[list[HFFile]], quant: str) -> list[HFFile] | None:
    ranked = [(max(_match_rank(f, quant) for f in s), s) for s in sets]
    best = max(rank for rank, _ in ranked)
    return next((s for rank, s in ranked if rank == best), None) if best else None


def _check_shards(chosen: list[HFFile], repo: str) -> None:
    shard = _SHARD_RE.search(chosen[0].name)
    if shard is None:
        return
    expected = int(shard.group(2))
    numbers = sorted(int(m.group(1)) for f in chosen if (m := _SHARD_RE.search(f.name)))
    if numbers != list(range(1, expected + 1)):
        raise ModelNotFound(
            f"{repo} has an incomplete shard set for {chosen[0].name}: "
            f"{len(numbers)} of {expected} shards listed"
        )


def pull_huggingface(
    ref: Reference,
    dest_dir: Path,
    *,
    token: str | None,
    progress: Progress,
    cancel: threading.Event | None = None,
    formats: Collection[str] = ("gguf",),
) -> HFResult:
    """List, select and download `ref`'s files into `dest_dir` (paths as in the repository).

    `token` falls back to `HF_TOKEN`. Files already complete in `dest_dir` with a matching
    LFS digest are kept, and `<file>.part` leftovers are resumed with a Range request, so a
    stable `dest_dir` makes a retried pull cheap. `formats` lists the weight formats the
    caller can package; others fail before anything is downloaded.
    """
    if ref.digest:
        raise InvalidReference(
            f"{ref}: Hugging Face models are pulled by quantization tag, not by digest"
        )
    name = f"{ref.registry}/{ref.repository}"
    progress(event("progress", "Fetching file list...", mode="pull"))
    with _Hub(ref.repository, token or config.env("HF_TOKEN") or None, name) as hub:
        revision, last_modified = hub.revision()
        selection = select_files(hub.list_files(revision), ref.tag or "", repo=name)
        if selection.format not in formats:
            raise UnsupportedMediaType(
                f"{name} holds {selection.format} weights; only "
                f"{', '.join(sorted(formats))} can be pulled from Hugging Face",
                hint="look for a GGUF conversion of the model (repositories named ...-GGUF)",
            )
        if selection.message:
            progress(event("progress", selection.message, mode="pull"))
        files, total = selection.files, selection.total_size
        progress(
            event(
                "progress",
                f"Found {len(files)} files ({total / MiB:.2f} MB total)",
                mode="pull",
                total=total,
            )
        )
        local = hub.download_all(files, revision, dest_dir, total, progress, cancel)
    _normalise_metadata(local.values(), last_modified)
    return HFResult(
        repo=ref.repository,
        revision=revision,
        format=selection.format,
        weights=[local[f.path] for f in selection.weights],
        mmproj=local[selection.mmproj.path] if selection.mmproj else None,
        chat_template=local[selection.chat_template.path] if selection.chat_template else None,
        licenses=[local[f.path] for f in selection.licenses],
        configs=[local[f.path] for f in selection.configs],
        last_modified=last_modified,
    )


class _Hub:
    """The few Hub API calls a pull makes, with DMR's error mapping."""

    def __init__(self, repo: str, token: str | None, name: str) -> None:
        import httpx

        self.repo, self.name, self.base = repo, name, endpoint()
        self._origin = urlsplit(self.base)[:2]
        self._has_token = bool(token)
        # The token is sent as a header only; httpx drops it on redirects to other hosts
        # (the CDN), and it never appears in URLs, messages or progress lines.
        headers = {"User-Agent": f"dmr-cli/{__version__}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.client = httpx.Client(
            headers=headers,
            follow_redirects=True,
            timeout=httpx.Timeout(60.0, connect=30.0),
        )

    def __enter__(self) -> _Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def _get(self, url: str, what: str) -> httpx.Response:
        import httpx

        try:
            response = self.client.get(url)
        except httpx.HTTPError as exc:
            raise RegistryError(f"cannot reach Hugging Face ({self.base}): {exc}") from exc
        self._check(response, what)
        return response

    def _check(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if status < 400:
            return
        if status == 401:
            raise Unauthorized(
                f"Hugging Face refused access to {self.name} (401)",
                hint=("check that HF_TOKEN is valid" if self._has_token else _TOKEN_HINT)
                + "; private and missing repositories both answer 401",
            )
        if status == 403:
            raise Unauthorized(
                f"access to {self.name} is forbidden (403): the repository may be gated",
                hint="accept the model's terms on huggingface.co, then " + _TOKEN_HINT,
            )
        if status == 404:
            raise ModelNotFound(f"{what} not found on Hugging Face")
        if status == 429:
            raise RegistryError(
                "rate limited by Hugging Face (429)",
                hint="wait a minute; authenticated requests (HF_TOKEN) get higher limits",
                http_status=status,
            )
        response.read()
        detail = response.text.strip()[:200]
        raise RegistryError(
            f"Hugging Face answered {status} for {what}" + (f": {detail}" if detail else ""),
            http_status=status,
        )

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise RegistryError(f"Hugging Face sent malformed JSON for {self.name}") from exc

    def revision(self) -> tuple[str, datetime | None]:
        """The commit `main` points at now, so listing and downloads see one snapshot."""
        url = f"{self.base}/api/models/{self.repo}/revision/main"
        info = self._json(self._get(url, f"repository {self.name}"))
        if not isinstance(info, dict):
            raise RegistryError(f"Hugging Face sent an unexpected answer for {self.name}")
        sha = info.get("sha")
        revision = sha if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{40}", sha) else "main"
        return revision, _parse_time(info.get("lastModified"))

    def list_files(self, revision: str) -> list[HFFile]:
        """Every file of the repository: the tree API lists one directory per call."""
        files: list[HFFile] = []
        pending, seen = [""], {""}
        while pending:
            directory = pending.pop(0)
            suffix = f"/{quote(directory)}" if directory else ""
            url: str | None = f"{self.base}/api/models/{self.repo}/tree/{revision}{suffix}"
            while url:
                response = self._get(url, f"repository {self.name}")
                entries = self._json(response)
                if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                    raise RegistryError(f"Hugging Face sent an unexpected tree for {self.name}")
                for entry in entries:
                    if entry.get("type") == "directory":
                        path = str(entry.get("path", ""))
                        if _safe_path(path) and path not in seen:
                            seen.add(path)
                            pending.append(path)
                    elif entry.get("type") == "file":
                        files.append(HFFile.from_api(entry))
                url = self._next_page(response)
        return files

    def _next_page(self, response: httpx.Response) -> str | None:
        url = response.links.get("next", {}).get("url")
        if url is None:
            return None
        # Pages elsewhere would receive the token: only follow links on the Hub's origin.
        if urlsplit(url)[:2] != self._origin:
            raise RegistryError(f"Hugging Face's listing for {self.name} points off-site")
        return url

    def download_all(
        self,
        files: list[HFFile],
        revision: str,
        dest_dir: Path,
        total: int,
        progress: Progress,
        cancel: threading.Event | None,
    ) -> dict[str, Path]:
        """Download up to four files at a time; the first failure stops the others."""
        stop = threading.Event()

        def work(f: HFFile) -> Path:
            target = dest_dir.joinpath(*PurePosixPath(f.path).parts)
            try:
                self._download(f, revision, target, total, progress, stop, cancel)
            except BaseException:
                stop.set()
                raise
            return target

        with ThreadPoolExecutor(max_workers=MAX_PARALLEL_DOWNLOADS) as pool:
            futures = [(f, pool.submit(work, f)) for f in files]
            errors = [e for _, fut in futures if (e := fut.exception()) is not None]
        if errors:
            # Workers stopped because another failed raise Cancelled: report the cause.
            raise next((e for e in errors if not isinstance(e, Cancelled)), errors[0])
        return {f.path: fut.result() for f, fut in futures}

    def _download(
        self,
        f: HFFile,
        revision: str,
        target: Path,
        total: int,
        progress: Progress,
        stop: threading.Event,
        cancel: threading.Event | None,
    ) -> None:
        def check_cancel() -> None:
            if stop.is_set() or (cancel is not None and cancel.is_set()):
                raise Cancelled("pull cancelled")

        check_cancel()
        # Without an LFS digest a file's id is known only once it is read (small git files).
        report = (
            LayerProgress(
                progress,
                mode="pull",
                verb="Downloaded",
                total=total,
                digest=f"sha256:{f.sha256}",
                size=f.size,
            )
            if f.sha256
            else None
        )
        digest = f.sha256
        with translate_os_errors(f"downloading {f.path}"):
            target.parent.mkdir(parents=True, exist_ok=True)
            if f.sha256 is None or _sha256_file(target, f.size) != f.sha256:
                part = target.with_name(target.name + ".part")
                digest = self._fetch(f, revision, part, report, check_cancel)
                if f.sha256 and digest != f.sha256:
                    part.unlink()
                    raise DigestMismatch(
                        f"{f.path}: content hashes to sha256:{digest}, "
                        f"but Hugging Face lists sha256:{f.sha256}"
                    )
                os.replace(part, target)
        # One completion line per file; LayerProgress drops it if the throttle sent it already.
        done = report or LayerProgress(
            progress,
            mode="pull",
            verb="Downloaded",
            total=total,
            digest=f"sha256:{digest}",
            size=f.size,
        )
        done.start_at(f.size - 1)
        done(1)

    def _fetch(
        self,
        f: HFFile,
        revision: str,
        part: Path,
        report: LayerProgress | None,
        check_cancel: Callable[[], None],
    ) -> str:
        """Stream `f` into `part`, resuming what is there when the server honours Range;
        returns the sha256 hex of the whole file."""
        import httpx

        offset = part.stat().st_size if part.is_file() else 0
        if offset >= f.size:
            offset = 0
        url = f"{self.base}/{self.repo}/resolve/{revision}/{quote(f.path)}"
        hasher = hashlib.sha256()
        written = 0
        try:
            with self.client.stream(
                "GET", url, headers={"Range": f"bytes={offset}-"} if offset else {}
            ) as response:
                self._check(response, f"file {f.path} of {self.name}")
                content_range = response.headers.get("content-range", "")
                if (
                    offset
                    and response.status_code == 206
                    and content_range.startswith(f"bytes {offset}-")
                ):
                    written = _hash_into(hasher, part)
                if report:
                    report.start_at(written)
                with part.open("ab" if written else "wb") as out:
                    for chunk in response.iter_bytes(_CHUNK):
                        check_cancel()
                        written += len(chunk)
                        if written > f.size:
                            break
                        out.write(chunk)
                        hasher.update(chunk)
                        if report:
                            report(len(chunk))
        except httpx.HTTPError as exc:
            raise RegistryError(f"downloading {f.path} from Hugging Face failed: {exc}") from exc
        if written != f.size:
            if written > f.size:
                part.unlink()  # a short file is kept: the next attempt resumes it
            raise RegistryError(
                f"{f.path}: Hugging Face sent {'more' if written > f.size else 'fewer'} "
                f"bytes than the {f.size} it listed"
            )
        return hasher.hexdigest()


def _normalise_metadata(paths: Iterable[Path], last_modified: datetime | None) -> None:
    """Mode and mtime end up in layer annotations: fix them so two pulls of one commit
    build the same artifact, whatever the umask or the time of download."""
    with translate_os_errors("setting file times"):
        for path in paths:
            os.chmod(path, 0o644)
            if last_modified is not None:
                stamp = last_modified.timestamp()
                os.utime(path, (stamp, stamp))


def _hash_into(hasher: Any, path: Path) -> int:
    size = 0
    with path.open("rb") as existing:
        for chunk in iter(lambda: existing.read(MiB), b""):
            hasher.update(chunk)
            size += len(chunk)
    return size


def _sha256_file(path: Path, size: int) -> str | None:
    """The digest of a file an earlier attempt left complete (None when absent or wrong size)."""
    if not path.is_file() or path.stat().st_size != size:
        return None
    hasher = hashlib.sha256()
    _hash_into(hasher, path)
    return hasher.hexdigest()


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
