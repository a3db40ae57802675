"""OCI distribution client (DMR spec §6): manifests, blobs, push. Sync and thread-safe.

Blob downloads (`download_blob`) are built for speed and for surviving anything
(performance.md §2): large blobs, and the holes a resume fills, are cut into `chunk_size`
pieces handed out from one queue to `connections` workers, each with its own keep-alive
connection, writing with `os.pwrite` at the final offsets; a worker left without work splits
the largest remaining range (work stealing), and a connection that stalls, or crawls far below
the best rate near the end, is dropped and its remainder re-requested on a fresh one. SHA-256
advances over the contiguous prefix while bytes arrive (the worker at the frontier hashes what
it just read; ranges finished ahead are read back from the page cache when the frontier reaches
them), so the digest is known as soon as the last byte lands.

On-disk state, correct after a SIGKILL at any instant:

* `<hex>.incomplete` holds downloaded bytes at their final offsets.
* `<hex>.incomplete.ranges` (JSON `{"digest", "size", "ranges": [[start, end], ...]}`) lists
  the ranges known to be in the file. It is replaced atomically four times a second, each
  time after an fdatasync of the data, and exists before the first out-of-order write.
* Without a `.ranges` file the `.incomplete` is a contiguous prefix (DMR's own format, and
  what single-stream downloads write), so any prefix left by DMR resumes too.

A blob whose bytes do not hash to its digest is moved aside to `<hex>.corrupt`, never
silently deleted (it may be the only copy of a costly download); the next pull starts clean.

The data path talks HTTP/1.1 through `http.client`, taking whatever each `recv` brings (up to
1 MiB): it costs a third of the CPU of httpx's 64 KiB chunks, which matters when the hash, the
writes and the sockets share two cores, and a slow link still shows steady progress. httpx
carries everything else, and the data path too when a transport is injected or an HTTP proxy
is configured in the environment.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import functools
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import urljoin, urlsplit

import httpx

from dmr_cli import __version__
from dmr_cli.distribution.auth import AUTH_HINT, Authenticator
from dmr_cli.errors import (
    BadRequest,
    Cancelled,
    DigestMismatch,
    DiskFull,
    DmrError,
    ModelNotFound,
    RegistryError,
    StoreError,
    Unauthorized,
    UnsupportedMediaType,
)
from dmr_cli.reference import Reference, validate_digest

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
_INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
# Index types are accepted so that a multi-platform image gets a clear error, not a 404.
_ACCEPT = ", ".join((*_MANIFEST_TYPES, *_INDEX_TYPES))
USER_AGENT = f"dmr/{__version__}"

MiB = 1024 * 1024
_MAX_MANIFEST_BYTES = 4 * MiB  # distribution's own limit
_MAX_ERROR_BODY = 64 * 1024
_TRANSIENT_STATUSES = (502, 503, 504)
_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 10
_MAX_BACKOFF = 8.0
_READ = 1 * MiB  # most bytes one read returns; it returns as soon as any have arrived
_HASH_READ = 4 * MiB
_MONOLITHIC_UPLOAD_CHUNKS = 2  # blobs up to this many chunks go up in one PUT
_STEAL_MIN = 4 * MiB  # never split off less than this
# The last pieces are this small, so every connection finishes within a few milliseconds of
# the others even when each one is rate-limited (the "stuck at 99 %" tail).
_PIECE_MIN = 1 * MiB
_STEAL_ALIGN = 64 * 1024
_TICK = 0.1  # monitor: progress, cancel
_RATE_INTERVAL = 0.5  # monitor: per-connection rates, stalls
_SYNC_INTERVAL = 0.25  # fdatasync + .ranges record; keeps the final fsync short too
_SLOW_FACTOR = 8  # drop a connection slower than 1/8 of the best ...
_SLOW_MIN_AGE = 2.0  # ... once it has had this long to ramp up ...
_SLOW_MIN_SECONDS_LEFT = 2.0  # ... and would need longer than this to finish
_PEAK_DECAY = 0.9  # per rate interval: the reference rate follows a link that slows down
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")

T = TypeVar("T")


class _Transient(Exception):
    """A failure worth retrying (network error, 502/503/504); `error` is raised when retries end."""

    def __init__(self, error: RegistryError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    try:
        return min(max(float(value), 0.0), 30.0) if value else None
    except ValueError:
        return None


def _registry_errors(body: bytes) -> tuple[set[str], str]:
    """Error codes and a one-line detail from a distribution `{"errors": [...]}` body."""
    try:
        errors = json.loads(body).get("errors") or []
    except (ValueError, AttributeError):
        return set(), ""
    codes = {str(e.get("code", "")) for e in errors if isinstance(e, dict)}
    messages = [
        f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
        for e in errors
        if isinstance(e, dict)
    ]
    return codes, "; ".join(messages)


def _status_error(
    status: int,
    body: bytes,
    ref: Reference,
    what: str,
    *,
    retry_after: str | None = None,
    missing: str | None = None,
) -> DmrError | _Transient:
    """Map a registry error answer to the error to raise (or a `_Transient` to retry)."""
    codes, detail = _registry_errors(body)
    suffix = f" ({detail})" if detail else ""
    host = ref.api_host
    if status in (401, 403) or codes & {"UNAUTHORIZED", "DENIED"}:
        return Unauthorized(
            f"{what}: registry {host} denied access to {ref.name} ({status}){suffix}",
            hint=AUTH_HINT,
        )
    if status == 404 or codes & {"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"}:
        return ModelNotFound(missing or f"Model not found: {ref} is not in registry {host}")
    error = RegistryError(f"{what}: registry {host} answered {status}{suffix}", http_status=status)
    if status in _TRANSIENT_STATUSES:
        return _Transient(error, _retry_after(retry_after))
    return error


def _network_error(ref: Reference, exc: BaseException, what: str) -> _Transient:
    reason = str(exc) or type(exc).__name__
    return _Transient(RegistryError(f"{what}: cannot reach registry {ref.api_host}: {reason}"))


def _env_proxy() -> bool:
    names = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
    return any(
        os.environ.get(n, "").strip() or os.environ.get(n.lower(), "").strip() for n in names
    )


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def _disk_error(exc: OSError, path: Path) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"no space left on device while writing {path}")
    return StoreError(f"cannot write {path}: {exc.strerror or exc}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not every platform can open a directory; the rename itself is done
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _mb(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


class RegistryClient:
    """Talks to one or more OCI registries on behalf of pulls and pushes."""

    def __init__(
        self,
        *,
        bearer_token: str | None = None,
        insecure_registries: Sequence[str] = (),
        connections: int = 8,
        chunk_size: int = 32 * MiB,
        stall_timeout: float = 10.0,
        retries: int = 4,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._insecure = tuple(insecure_registries)
        self.connections = max(1, connections)
        self.chunk_size = max(MiB, chunk_size)
        self.stall_timeout = stall_timeout
        self.retries = max(0, retries)
        self.backoff_base = 0.5
        self._client = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(60.0, connect=min(stall_timeout, 30.0)),
            follow_redirects=True,
            headers={"User-Agent": USER_AGENT},
        )
        self._auth = Authenticator(self._client, bearer_token=bearer_token)
        self._direct = transport is None and not _env_proxy()
        self._ssl_lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None

    # -- plumbing ---------------------------------------------------------------------------

    def _url(self, ref: Reference, path: str) -> str:
        return f"{ref.base_url(self._insecure)}/v2/{ref.repository}/{path}"

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return retry_after
        return float(min(_MAX_BACKOFF, self.backoff_base * (2**attempt)))

    def _retrying(self, call: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return call()
            except _Transient as exc:
                if attempt >= self.retries:
                    raise exc.error from None
                delay = self.backoff(attempt, exc.retry_after)
                log.info(
                    "%s; retrying in %.1fs (attempt %d/%d)", exc, delay, attempt + 1, self.retries
                )
                time.sleep(delay)
                attempt += 1

    def _send(
        self,
        method: str,
        ref: Reference,
        url: str,
        *,
        what: str,
        push: bool = False,
        headers: dict[str, str] | None = None,
        body: bytes | Callable[[], Iterator[bytes]] | None = None,
    ) -> httpx.Response:
        """One request with auth (anonymous first, then what the 401 challenge asks for).

        The response is streamed; the caller closes it. Network errors become `_Transient`."""
        auth = self._auth.header(ref, push)

        def send(authorization: str | None) -> httpx.Response:
            request_headers = dict(headers or {})
            if authorization:
                request_headers["Authorization"] = authorization
            content = body() if callable(body) else body
            request = self._client.build_request(
                method, url, headers=request_headers, content=content
            )
            return self._client.send(request, stream=True)

        try:
            response = send(auth)
            if response.status_code != 401:
                return response
            challenge = response.headers.get("www-authenticate")
            new = self._auth.on_unauthorized(ref, push, challenge, auth)
            if new is None or new == auth:
                return response
            response.close()
            return send(new)
        except httpx.TransportError as exc:
            raise _network_error(ref, exc, what) from exc

    def _error(
        self, response: httpx.Response, ref: Reference, what: str, missing: str | None = None
    ) -> DmrError | _Transient:
        try:
            body = b""
            for piece in response.iter_bytes():
                body += piece
                if len(body) > _MAX_ERROR_BODY:
                    break
        except httpx.HTTPError:
            body = b""
        finally:
            response.close()
        return _status_error(
            response.status_code,
            body,
            ref,
            what,
            retry_after=response.headers.get("retry-after"),
            missing=missing,
        )

    def _read(self, response: httpx.Response, ref: Reference, limit: int, what: str) -> bytes:
        length = response.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            response.close()
            raise RegistryError(f"{what}: {int(length)} bytes is over the {limit}-byte limit")
        data = bytearray()
        try:
            for piece in response.iter_bytes():
                data += piece
                if len(data) > limit:
                    raise RegistryError(f"{what}: more than the {limit}-byte limit")
        except httpx.TransportError as exc:
            raise _network_error(ref, exc, what) from exc
        finally:
            response.close()
        return bytes(data)

    def _ssl_context(self) -> ssl.SSLContext:
        with self._ssl_lock:
            if self._ssl is None:
                # The same trust store as httpx (certifi, or SSL_CERT_FILE / SSL_CERT_DIR).
                self._ssl = httpx.create_ssl_context()
            return self._ssl

    def _new_connection(self) -> _Connection:
        if self._direct:
            return _DirectConnection(self._ssl_context, self.stall_timeout)
        return _HttpxConnection(self._client, self.stall_timeout)

    # -- manifests --------------------------------------------------------------------------

    def get_manifest(self, ref: Reference, *, accept_index: bool = False) -> tuple[str, bytes, str]:
        """`(digest, raw bytes, media type)`, verified by digest. Models are single manifests;
        `accept_index` also admits an image index (runner images are multi-platform)."""
        return self._retrying(lambda: self._get_manifest(ref, accept_index))

    def _get_manifest(self, ref: Reference, accept_index: bool) -> tuple[str, bytes, str]:
        what = f"fetching manifest of {ref}"
        url = self._url(ref, f"manifests/{ref.reference}")
        response = self._send("GET", ref, url, what=what, headers={"Accept": _ACCEPT})
        if response.status_code != 200:
            raise self._error(response, ref, what)
        raw = self._read(response, ref, _MAX_MANIFEST_BYTES, what)
        media_type = response.headers.get("content-type", "").split(";", 1)[0].strip()
        parsed: object = None
        try:
            parsed = json.loads(raw)
        except ValueError as exc:
            raise RegistryError(f"{what}: the manifest is not valid JSON") from exc
        if media_type not in (*_MANIFEST_TYPES, *_INDEX_TYPES) and isinstance(parsed, dict):
            media_type = str(parsed.get("mediaType") or media_type)
        is_index = media_type in _INDEX_TYPES or (
            isinstance(parsed, dict) and "manifests" in parsed
        )
        if is_index and not accept_index:
            raise UnsupportedMediaType(
                f"{ref} is an image index (a multi-platform image), not a model: "
                "models are published as a single OCI manifest"
            )
        if not is_index and media_type not in _MANIFEST_TYPES:
            raise UnsupportedMediaType(f"{ref}: unsupported manifest media type {media_type!r}")
        algorithm = ref.digest.split(":", 1)[0] if ref.digest else "sha256"
        digest = f"{algorithm}:{hashlib.new(algorithm, raw).hexdigest()}"
        if ref.digest and digest != ref.digest:
            raise DigestMismatch(
                f"manifest of {ref.name} does not match the requested digest: "
                f"expected {ref.digest}, got {digest}"
            )
        announced = response.headers.get("docker-content-digest", "")
        if announced.startswith(f"{algorithm}:") and announced != digest:
            raise DigestMismatch(
                f"manifest of {ref} does not match the digest the registry announced: "
                f"{announced} announced, {digest} received"
            )
        return digest, raw, media_type

    def put_manifest(self, ref: Reference, manifest: bytes, media_type: str) -> str:
        """Upload a manifest under the reference's tag (or digest); returns its sha256 digest."""
        digest = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
        if ref.digest and not ref.tag and ref.digest != digest:
            raise DigestMismatch(
                f"cannot push the manifest as {ref.digest}: its bytes hash to {digest}"
            )
        target = ref.tag or ref.reference
        what = f"pushing manifest to {ref.name}:{target}"
        url = self._url(ref, f"manifests/{target}")

        def put() -> str:
            response = self._send(
                "PUT",
                ref,
                url,
                what=what,
                push=True,
                headers={"Content-Type": media_type},
                body=manifest,
            )
            if response.status_code not in (200, 201, 202):
                raise self._error(response, ref, what)
            response.close()
            announced = response.headers.get("docker-content-digest", "")
            if announced.startswith("sha256:") and announced != digest:
                raise RegistryError(
                    f"{what}: the registry stored the manifest as {announced}, expected {digest}"
                )
            return digest

        return self._retrying(put)

    # -- blobs ------------------------------------------------------------------------------

    def get_blob(self, ref: Reference, digest: str, *, max_size: int = 16 * MiB) -> bytes:
        """A small blob (a config), verified against its digest."""
        validate_digest(digest)
        what = f"fetching blob {digest} of {ref.name}"

        def get() -> bytes:
            response = self._send("GET", ref, self._url(ref, f"blobs/{digest}"), what=what)
            if response.status_code != 200:
                raise self._error(response, ref, what, missing=self._missing_blob(ref, digest))
            return self._read(response, ref, max_size, what)

        data = self._retrying(get)
        algorithm = digest.split(":", 1)[0]
        actual = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
        if actual != digest:
            raise DigestMismatch(
                f"blob {digest} of {ref.name} does not match its digest: got {actual} "
                f"({len(data)} bytes)"
            )
        return data

    @staticmethod
    def _missing_blob(ref: Reference, digest: str) -> str:
        return f"Model not found: blob {digest} of {ref} is not in registry {ref.api_host}"

    def blob_exists(self, ref: Reference, digest: str) -> bool:
        validate_digest(digest)
        return self._retrying(lambda: self._blob_exists(ref, digest, push=False))

    def _blob_exists(self, ref: Reference, digest: str, *, push: bool) -> bool:
        what = f"checking blob {digest} in {ref.name}"
        response = self._send("HEAD", ref, self._url(ref, f"blobs/{digest}"), what=what, push=push)
        if response.status_code == 404:
            response.close()
            return False
        if response.status_code != 200:
            raise self._error(response, ref, what)
        response.close()
        return True

    def download_blob(
        self,
        ref: Reference,
        digest: str,
        size: int,
        incomplete: Path,
        final: Path,
        on_progress: Callable[[int], None],
        cancel: threading.Event | None = None,
    ) -> int:
        """Download a blob to `final` (verified, fsync'd, renamed atomically); resumes from
        `incomplete`. Returns the bytes received over the network by this call.

        `on_progress(n)` gets increments of bytes present in the file, starting with those kept
        from an earlier attempt; it is called from one helper thread at a time."""
        validate_digest(digest)
        if size < 0:
            raise BadRequest(f"blob {digest} has a negative size")
        download = _BlobDownload(self, ref, digest, size, incomplete, final, on_progress, cancel)
        return download.run()

    def upload_blob(
        self,
        ref: Reference,
        digest: str,
        source: Path | bytes,
        size: int,
        on_progress: Callable[[int], None],
    ) -> None:
        """Upload a blob unless the registry has it. Small blobs go up in one PUT, large ones
        in `chunk_size` PATCHes. `on_progress(n)` gets increments (never more than `size`)."""
        validate_digest(digest)
        if isinstance(source, bytes) and len(source) != size:
            raise BadRequest(f"blob {digest}: {len(source)} bytes given, {size} expected")
        if self._retrying(lambda: self._blob_exists(ref, digest, push=True)):
            on_progress(size)
            return
        reporter = _HighWater(on_progress)
        self._retrying(lambda: self._upload(ref, digest, source, size, reporter))

    def _upload(
        self, ref: Reference, digest: str, source: Path | bytes, size: int, report: _HighWater
    ) -> None:
        what = f"pushing blob {digest} to {ref.name}"
        response = self._send("POST", ref, self._url(ref, "blobs/uploads/"), what=what, push=True)
        if response.status_code not in (201, 202):
            raise self._error(response, ref, what)
        response.close()
        location = self._location(response, ref, what)
        octet = {"Content-Type": "application/octet-stream"}
        if size <= _MONOLITHIC_UPLOAD_CHUNKS * self.chunk_size:
            pieces: list[tuple[int, int]] = []
            final_body: bytes | Callable[[], Iterator[bytes]] = functools.partial(
                _read_range, source, 0, size, report
            )
        else:
            pieces = [(a, min(size, a + self.chunk_size)) for a in range(0, size, self.chunk_size)]
            final_body = b""
        for start, end in pieces:
            response = self._send(
                "PATCH",
                ref,
                location,
                what=what,
                push=True,
                headers={
                    **octet,
                    "Content-Range": f"{start}-{end - 1}",
                    "Content-Length": str(end - start),
                },
                body=functools.partial(_read_range, source, start, end, report),
            )
            if response.status_code != 202:
                raise self._error(response, ref, what)
            response.close()
            location = self._location(response, ref, what)
        put_url = str(httpx.URL(location).copy_add_param("digest", digest))
        length = 0 if pieces else size
        response = self._send(
            "PUT",
            ref,
            put_url,
            what=what,
            push=True,
            headers={**octet, "Content-Length": str(length)},
            body=final_body,
        )
        if response.status_code not in (201, 204):
            raise self._error(response, ref, what)
        response.close()

    def _location(self, response: httpx.Response, ref: Reference, what: str) -> str:
        location: str | None = response.headers.get("location")
        if not location:
            raise RegistryError(f"{what}: the registry gave no upload location")
        return urljoin(str(response.url), location)

    def close(self) -> None:
        self._client.close()


def _read_range(source: Path | bytes, start: int, end: int, report: _HighWater) -> Iterator[bytes]:
    """Body pieces of `source[start:end]`, reporting the offset reached as they go."""
    if isinstance(source, bytes):
        view = memoryview(source)
        for offset in range(start, end, MiB):
            piece = bytes(view[offset : min(end, offset + MiB)])
            yield piece
            report(offset + len(piece))
        return
    with open(source, "rb") as f:
        f.seek(start)
        offset = start
        while offset < end:
            piece = f.read(min(MiB, end - offset))
            if not piece:
                raise StoreError(f"{source} is shorter than the {end} bytes it should hold")
            yield piece
            offset += len(piece)
            report(offset)


class _HighWater:
    """Turns "offset reached" into progress increments that never repeat bytes on a retry."""

    def __init__(self, on_progress: Callable[[int], None]) -> None:
        self._on_progress = on_progress
        self._reported = 0

    def __call__(self, offset: int) -> None:
        if offset > self._reported:
            delta, self._reported = offset - self._reported, offset
            self._on_progress(delta)


# -- data path: connections ---------------------------------------------------------------


class _Response(Protocol):
    status: int

    def header(self, name: str) -> str | None: ...

    def read(self, limit: int) -> bytes:
        """Up to `limit` bytes as soon as some have arrived; b"" at the end of the body."""

    def error_body(self) -> bytes: ...


class _Connection(Protocol):
    def open(self, url: str, headers: dict[str, str]) -> _Response: ...

    def release(self) -> None:
        """Done with the current response: keep the connection if its body was read fully."""

    def abort(self) -> None:
        """From any thread: make a blocked read on the current request fail now."""

    def close(self) -> None: ...


class _DirectResponse:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self._response = response

    def header(self, name: str) -> str | None:
        return self._response.getheader(name)

    def read(self, limit: int) -> bytes:
        return self._response.read1(limit)

    def error_body(self) -> bytes:
        return self._response.read(_MAX_ERROR_BODY)

    def finish(self) -> bool:
        """Whether the body was read to its end, leaving the connection free for the next
        request. `read1`, unlike `read`, does not close a response at its last byte, and
        http.client sends nothing more until it is closed: close it here."""
        if not self._response.isclosed() and self._response.length == 0:
            self._response.close()
        return self._response.isclosed()


class _DirectConnection:
    """One keep-alive HTTP/1.1 connection through http.client."""

    def __init__(self, ssl_context: Callable[[], ssl.SSLContext], timeout: float) -> None:
        self._ssl_context = ssl_context
        self._timeout = timeout  # per socket operation: a read with no bytes this long fails
        self._conn: http.client.HTTPConnection | None = None
        self._origin: tuple[str, str, int | None] | None = None
        self._response: _DirectResponse | None = None
        self._used = False

    def open(self, url: str, headers: dict[str, str]) -> _Response:
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        for attempt in (0, 1):
            if self._conn is None or self._origin != _origin(url):
                self.close()
                self._connect(url)
            conn = self._conn
            assert conn is not None
            reused = self._used
            try:
                conn.request("GET", target, headers=headers)
                response = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if reused and attempt == 0:
                    continue  # the server dropped an idle keep-alive connection: reconnect
                raise
            except BaseException:
                self.close()
                raise
            self._used = True
            self._response = _DirectResponse(response)
            return self._response
        raise AssertionError("unreachable")

    def _connect(self, url: str) -> None:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(
                host, port, timeout=self._timeout, context=self._ssl_context()
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self._timeout)
        self._conn, self._origin, self._used = conn, _origin(url), False

    def release(self) -> None:
        if self._response is not None and not self._response.finish():
            self.close()  # a body left unread cannot be skipped on a keep-alive connection
        self._response = None

    def abort(self) -> None:
        conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        conn, self._conn, self._response = self._conn, None, None
        if conn is not None:
            conn.close()


class _HttpxResponse:
    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.response = response
        self._chunks = response.iter_bytes()
        self._pending = b""
        self.aborted = False

    def header(self, name: str) -> str | None:
        value: str | None = self.response.headers.get(name)
        return value

    def read(self, limit: int) -> bytes:
        while not self._pending:
            if self.aborted:
                raise ConnectionAbortedError("connection dropped by the download monitor")
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._pending = chunk
        data, self._pending = self._pending[:limit], self._pending[limit:]
        return data

    def error_body(self) -> bytes:
        body = b""
        for piece in self._chunks:
            body += piece
            if len(body) > _MAX_ERROR_BODY:
                break
        return body


class _HttpxConnection:
    """The data path through httpx (injected transports, proxies from the environment)."""

    def __init__(self, client: httpx.Client, timeout: float) -> None:
        self._client = client
        self._timeout = httpx.Timeout(timeout)
        self._response: _HttpxResponse | None = None

    def open(self, url: str, headers: dict[str, str]) -> _Response:
        request = self._client.build_request("GET", url, headers=headers, timeout=self._timeout)
        self._response = _HttpxResponse(
            self._client.send(request, stream=True, follow_redirects=False)
        )
        return self._response

    def release(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            response.response.close()

    def abort(self) -> None:
        response = self._response
        if response is None:
            return
        response.aborted = True
        stream = response.response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.release()


# -- data path: the download ----------------------------------------------------------------


class _Intervals:
    """Disjoint sorted byte ranges [start, end)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.total = 0

    def add(self, start: int, end: int) -> int:
        """Add a range; returns how many of its bytes were not covered before."""
        if end <= start:
            return 0
        lo = bisect.bisect_left(self._ends, start)  # first range ending at or after `start`
        hi = bisect.bisect_right(self._starts, end)  # ranges starting at or before `end`
        covered = 0
        new_start, new_end = start, end
        for i in range(lo, hi):
            covered += max(0, min(self._ends[i], end) - max(self._starts[i], start))
            new_start, new_end = min(new_start, self._starts[i]), max(new_end, self._ends[i])
        self._starts[lo:hi] = [new_start]
        self._ends[lo:hi] = [new_end]
        added = end - start - covered
        self.total += added
        return added

    def end_from(self, pos: int) -> int:
        """End of the covered run starting at `pos` (`pos` itself when not covered)."""
        i = bisect.bisect_right(self._starts, pos) - 1
        return self._ends[i] if i >= 0 and self._ends[i] > pos else pos

    def gaps(self, size: int) -> list[tuple[int, int]]:
        out, pos = [], 0
        for start, end in zip(self._starts, self._ends, strict=True):
            if start > pos:
                out.append((pos, start))
            pos = max(pos, end)
        if pos < size:
            out.append((pos, size))
        return out

    def ranges(self) -> list[list[int]]:
        return [[a, b] for a, b in zip(self._starts, self._ends, strict=True)]

    def copy(self) -> _Intervals:
        other = _Intervals()
        other._starts, other._ends, other.total = list(self._starts), list(self._ends), self.total
        return other


@dataclass(eq=False)
class _Task:
    """A byte range one worker is fetching; `end` shrinks when another worker steals a part."""

    pos: int
    end: int
    response_end: int = 0
    conn: _Connection | None = None
    started: float = 0.0
    last_byte: float = 0.0
    sample_pos: int = 0
    sample_time: float = 0.0
    rate: float = 0.0
    abort_reason: str = ""


def _journal_path(incomplete: Path) -> Path:
    return incomplete.with_name(incomplete.name + ".ranges")


def _write_journal(path: Path, digest: str, size: int, ranges: _Intervals) -> None:
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps({"digest": digest, "size": size, "ranges": ranges.ranges()}).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class _BlobDownload:
    """State of one `download_blob` call; `lock` (a Condition) guards every mutable field."""

    def __init__(
        self,
        client: RegistryClient,
        ref: Reference,
        digest: str,
        size: int,
        incomplete: Path,
        final: Path,
        on_progress: Callable[[int], None],
        cancel: threading.Event | None,
    ) -> None:
        self.client, self.ref, self.digest, self.size = client, ref, digest, size
        self.incomplete, self.final, self.journal = incomplete, final, _journal_path(incomplete)
        self.on_progress, self.cancel = on_progress, cancel
        self.url = client._url(ref, f"blobs/{digest}")
        self.label = f"blob {digest[:19]}… of {ref.name}"
        self.lock = threading.Condition()
        self.stop = threading.Event()  # set on failure or cancel
        self.helpers_done = threading.Event()
        self.error: Exception | None = None
        self.fd = -1
        self.written = _Intervals()
        self.queue: deque[list[int]] = deque()  # [start, end] not yet handed to a worker
        self.unassigned = 0
        self.parallel = False
        self.active: list[_Task] = []
        self.ranges_ok: bool | None = None
        self.resolved_url: str | None = None  # where the registry redirected the blob to
        self.hasher = hashlib.new(digest.split(":", 1)[0])
        self.hash_pos = 0
        self.hashing = False  # someone holds the hasher
        self.unreported = 0
        self.network = 0
        self.journaled = -1
        self.peak_rate = 0.0

    # -- driver -----------------------------------------------------------------------------

    def run(self) -> int:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"pull of {self.ref} cancelled")
        if self.size == 0:
            return self._commit_empty()
        self.written = self._load_state()
        missing_bytes = self.size - self.written.total
        # Holes left by an earlier attempt are cut into guided pieces like a fresh download,
        # never handed out whole: workers would end unevenly and split each other's running
        # requests, and a split throws away what the victim has in flight (megabytes on a
        # fast link), all of it fetched again by the thief.
        holes = len(self.written.gaps(self.size))
        parallel = self.client.connections > 1 and (
            missing_bytes > 2 * self.client.chunk_size or holes > 1
        )
        use_journal = parallel or self.journal.exists()
        self._check_space(missing_bytes)
        try:
            self.fd = os.open(self.incomplete, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _disk_error(exc, self.incomplete) from exc
        try:
            if use_journal:
                # Before any out-of-order write: from now on the sidecar says what is valid.
                self._flush_journal()
            self._download(parallel, use_journal)
            self._report_progress()
            if self.error is not None:
                if use_journal:
                    self._flush_journal()  # keep every byte for the next attempt
                raise self.error
            self._commit()
            return self.network
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def _download(self, parallel: bool, use_journal: bool) -> None:
        self.parallel = parallel
        self.queue.extend([start, end] for start, end in self.written.gaps(self.size))
        self.unassigned = self.size - self.written.total
        self.unreported = self.written.total
        if self.written.total:
            log.info("resuming %s: %d of %d bytes kept", self.label, self.written.total, self.size)
        helpers = [self._spawn(self._monitor, "monitor"), self._spawn(self._hash_loop, "hash")]
        if use_journal:
            helpers.append(self._spawn(self._journal_loop, "journal"))
        workers = [self._spawn(self._worker, "w0")]
        try:
            with self.lock:
                # The first response tells whether ranges work before more connections open.
                while self.ranges_ok is None and not self.stop.is_set() and workers[0].is_alive():
                    self.lock.wait(0.1)
                # In parallel mode idle workers split running ranges, so all of them help;
                # otherwise there is a single hole and one stream.
                extra = self.client.connections - 1 if parallel else 0
            if self.ranges_ok:
                workers += [self._spawn(self._worker, f"w{i + 1}") for i in range(extra)]
            for worker in workers:
                worker.join()
            if self.error is None and self.written.total < self.size:
                self._fail(RegistryError(f"downloading {self.label} ended before the last byte"))
            with self.lock:
                while self.error is None and self.hash_pos < self.size:
                    self.lock.wait(0.1)
        finally:
            # Whatever happened (even an interrupt), every thread ends before the file closes.
            if self.error is None and any(w.is_alive() for w in workers):
                self._fail(Cancelled(f"pull of {self.ref} interrupted"))
            self.helpers_done.set()
            with self.lock:
                self.lock.notify_all()
            for thread in workers + helpers:
                thread.join()

    def _spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(
            target=target, name=f"dmr-{self.digest[7:15]}-{name}", daemon=True
        )
        thread.start()
        return thread

    def _fail(self, error: Exception) -> None:
        with self.lock:
            if self.error is None:
                self.error = error
            self.stop.set()
            for task in self.active:
                if task.conn is not None:
                    task.abort_reason = "stop"
                    task.conn.abort()
            self.lock.notify_all()

    # -- on-disk state ----------------------------------------------------------------------

    def _load_state(self) -> _Intervals:
        kept = _Intervals()
        try:
            file_size = os.stat(self.incomplete).st_size
        except FileNotFoundError:
            self.journal.unlink(missing_ok=True)
            return kept
        if self.journal.exists():
            ranges = self._read_journal()
            if ranges is None:
                log.warning("discarding %s: its .ranges record is unreadable", self.incomplete)
                self._discard()
                return kept
            for start, end in ranges:
                kept.add(start, min(end, file_size))
            return kept
        if file_size > self.size:
            log.warning("discarding %s: larger than the blob", self.incomplete)
            self._discard()
            return kept
        kept.add(0, file_size)
        return kept

    def _read_journal(self) -> list[tuple[int, int]] | None:
        try:
            data = json.loads(self.journal.read_bytes())
            if data["digest"] != self.digest or data["size"] != self.size:
                return None
            ranges = [(int(a), int(b)) for a, b in data["ranges"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if any(not 0 <= a < b <= self.size for a, b in ranges):
            return None
        return ranges

    def _discard(self) -> None:
        # The data goes first: a .ranges file without its .incomplete is ignored.
        self.incomplete.unlink(missing_ok=True)
        self.journal.unlink(missing_ok=True)

    def _check_space(self, needed: int) -> None:
        try:
            stat = os.statvfs(self.incomplete.parent)
        except OSError:
            return
        free = stat.f_bavail * stat.f_frsize
        if needed > free:
            raise DiskFull(
                f"not enough disk space for {self.label}: {_mb(needed)} more needed, "
                f"{_mb(free)} free in {self.incomplete.parent}"
            )

    def _flush_journal(self) -> None:
        with self.lock:
            snapshot = self.written.copy()
        if snapshot.total == self.journaled:
            return
        try:
            # Data first: the record may only name bytes that are on disk.
            getattr(os, "fdatasync", os.fsync)(self.fd)
            _write_journal(self.journal, self.digest, self.size, snapshot)
        except OSError as exc:
            log.warning("cannot record download progress in %s: %s", self.journal, exc)
            return
        self.journaled = snapshot.total

    def _journal_loop(self) -> None:
        while not self.helpers_done.wait(_SYNC_INTERVAL):
            self._flush_journal()

    def _commit(self) -> None:
        actual = f"{self.digest.split(':', 1)[0]}:{self.hasher.hexdigest()}"
        if actual != self.digest:
            corrupt = self.final.with_name(self.final.name + ".corrupt")
            os.close(self.fd)
            self.fd = -1
            os.replace(self.incomplete, corrupt)
            self.journal.unlink(missing_ok=True)
            raise DigestMismatch(
                f"{self.label} does not match its digest: expected {self.digest}, the "
                f"{self.size} bytes received hash to {actual}; they were moved aside to {corrupt}",
                hint="the registry served other bytes than the manifest names; pulling again "
                "downloads the blob afresh (the .corrupt file can be deleted)",
            )
        try:
            os.fsync(self.fd)
            os.replace(self.incomplete, self.final)
        except OSError as exc:
            raise _disk_error(exc, self.final) from exc
        _fsync_dir(self.final.parent)
        self.journal.unlink(missing_ok=True)

    def _commit_empty(self) -> int:
        algorithm = self.digest.split(":", 1)[0]
        actual = f"{algorithm}:{hashlib.new(algorithm).hexdigest()}"
        if actual != self.digest:
            raise DigestMismatch(
                f"{self.label} is empty, but {self.digest} is not the empty digest"
            )
        try:
            self.incomplete.write_bytes(b"")
            os.replace(self.incomplete, self.final)
        except OSError as exc:
            raise _disk_error(exc, self.final) from exc
        self.journal.unlink(missing_ok=True)
        return 0

    # -- helpers: progress, watchdog, hashing -----------------------------------------------

    def _report_progress(self) -> None:
        with self.lock:
            delta, self.unreported = self.unreported, 0
        if delta:
            try:
                self.on_progress(delta)
            except Exception as exc:  # the caller's way to stop us (client gone): honour it
                self._fail(exc)

    def _monitor(self) -> None:
        last_rates = time.monotonic()
        while not self.helpers_done.wait(_TICK):
            self._report_progress()
            if self.cancel is not None and self.cancel.is_set() and not self.stop.is_set():
                self._fail(Cancelled(f"pull of {self.ref} cancelled; pull again to resume"))
            now = time.monotonic()
            if now - last_rates >= _RATE_INTERVAL:
                self._watch_connections(now)
                last_rates = now

    def _watch_connections(self, now: float) -> None:
        """Drop stalled connections, and crawling ones once the queue is empty."""
        with self.lock:
            live = [t for t in self.active if t.conn is not None and not t.abort_reason]
            self.peak_rate *= _PEAK_DECAY
            for task in live:
                elapsed = now - task.sample_time
                if elapsed > 0:
                    instant = (task.pos - task.sample_pos) / elapsed
                    warm = task.sample_time > task.started
                    task.rate = (task.rate + instant) / 2 if warm else instant
                    task.sample_pos, task.sample_time = task.pos, now
                if now - task.started >= 1.0:
                    self.peak_rate = max(self.peak_rate, task.rate)
            for task in live:
                if now - task.last_byte > self.client.stall_timeout:
                    reason = "stall"
                elif (
                    not self.queue
                    and now - task.started >= _SLOW_MIN_AGE
                    and task.rate * _SLOW_FACTOR < self.peak_rate
                    and task.end - task.pos > task.rate * _SLOW_MIN_SECONDS_LEFT
                ):
                    reason = "slow"
                else:
                    continue
                log.info(
                    "%s: re-requesting bytes %d-%d on a fresh connection (%s, %.0f KiB/s)",
                    self.label,
                    task.pos,
                    task.end,
                    reason,
                    task.rate / 1024,
                )
                task.abort_reason = reason
                assert task.conn is not None
                task.conn.abort()

    def _hash_loop(self) -> None:
        """Hash ranges that were written ahead of the frontier, reading them back."""
        while True:
            with self.lock:
                self.lock.wait_for(
                    lambda: (
                        self.stop.is_set()
                        or self.hash_pos >= self.size
                        or (
                            not self.hashing
                            and self.written.end_from(self.hash_pos) > self.hash_pos
                        )
                    )
                )
                if self.stop.is_set() or self.hash_pos >= self.size:
                    return
                self.hashing = True
                pos = start = self.hash_pos
                end = self.written.end_from(start)
            try:
                while pos < end and not self.stop.is_set():
                    data = os.pread(self.fd, min(_HASH_READ, end - pos), pos)
                    if not data:
                        raise StoreError(f"{self.incomplete} is shorter than what was written")
                    self.hasher.update(data)
                    pos += len(data)
            except StoreError as exc:
                self._fail(exc)
            except OSError as exc:
                self._fail(StoreError(f"cannot read {self.incomplete}: {exc}"))
            finally:
                with self.lock:
                    self.hash_pos, self.hashing = pos, False
                    self.lock.notify_all()

    # -- workers ----------------------------------------------------------------------------

    def _worker(self) -> None:
        conn = self.client._new_connection()
        try:
            while (task := self._next_task()) is not None:
                try:
                    self._fetch(task, conn)
                finally:
                    with self.lock:
                        self.active.remove(task)
        except Exception as exc:
            self._fail(exc)
        finally:
            conn.close()
            with self.lock:
                self.lock.notify_all()

    def _next_task(self) -> _Task | None:
        with self.lock:
            if self.stop.is_set():
                return None
            if self.queue:
                task = self._cut()
            elif self.ranges_ok and self.active:
                # Nothing queued: take the second half of the largest range still running.
                victim = max(self.active, key=lambda t: t.end - t.pos)
                if victim.end - victim.pos < 2 * _STEAL_MIN:
                    return None
                middle = (victim.pos + victim.end) // 2
                middle -= middle % _STEAL_ALIGN
                task, victim.end = _Task(middle, victim.end), middle
            else:
                return None
            self.active.append(task)
            return task

    def _cut(self) -> _Task:
        """The next piece of the first gap. Guided sizes: `chunk_size` while much is left,
        shrinking towards the end, so the last ranges finish together (short tail) and
        little is completed ahead of the hash frontier when the last byte arrives."""
        gap = self.queue[0]
        start, end = gap
        piece = end - start
        if self.parallel:
            floor = min(_PIECE_MIN, self.client.chunk_size)
            guided = self.unassigned // (2 * self.client.connections)
            piece = min(self.client.chunk_size, max(floor, guided))
            piece += -piece % _STEAL_ALIGN
            if end - start < piece * 3 // 2:
                piece = end - start  # no sliver left behind
        stop = start + piece
        if stop >= end:
            self.queue.popleft()
        else:
            gap[0] = stop
        self.unassigned -= stop - start
        return _Task(start, stop)

    def _fetch(self, task: _Task, conn: _Connection) -> None:
        failures = 0
        while not self.stop.is_set():
            with self.lock:
                if task.pos >= task.end:
                    return
                start = task.pos
                now = time.monotonic()
                task.started = task.last_byte = task.sample_time = now
                task.sample_pos, task.rate, task.abort_reason, task.conn = start, 0.0, "", conn
            retry_after: float | None = None
            try:
                response = self._open(conn, task)
                try:
                    self._pump(task, response)
                finally:
                    conn.release()
                self._note_rate(task, start)
                continue
            except _Transient as exc:
                error, retry_after = exc.error, exc.retry_after
            except (OSError, http.client.HTTPException, httpx.TransportError) as exc:
                error = RegistryError(
                    f"downloading {self.label} from {self.ref.api_host}: "
                    f"{exc or type(exc).__name__}"
                )
            finally:
                with self.lock:
                    task.conn = None
            if self.stop.is_set():
                return
            conn.close()
            if task.abort_reason == "slow":
                continue  # not the server's fault: just a fresh connection, at once
            failures = 0 if task.pos > start else failures + 1
            if failures > self.client.retries:
                self._fail(error)
                return
            # A connection that made progress, or stalled, is simply replaced; repeated
            # failures without progress back off.
            delay = self.client.backoff(failures - 1, retry_after) if failures else 0.0
            log.info("%s; retrying in %.1fs", error, delay)
            if delay and task.abort_reason != "stall":
                self.stop.wait(delay)

    def _note_rate(self, task: _Task, start: int) -> None:
        """Count a finished response in the reference rate: on a fast link most ranges end
        before the monitor ever samples them, and a lone straggler needs something to lag."""
        moved = task.pos - start
        if moved >= _READ:
            rate = moved / max(time.monotonic() - task.started, 0.1)
            with self.lock:
                self.peak_rate = max(self.peak_rate, rate)

    def _open(self, conn: _Connection, task: _Task) -> _Response:
        with self.lock:
            if self.ranges_ok is False and task.pos > 0:
                # No Range support: a retry can only start over (same bytes, rewritten).
                task.pos, task.end = 0, self.size
            start, end = task.pos, task.end
            url = self.resolved_url or self.url
        registry_origin = _origin(self.url)
        auth_retried = False
        hops = 0
        while True:
            on_registry = _origin(url) == registry_origin
            headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
            if self.ranges_ok is not False:
                headers["Range"] = f"bytes={start}-{end - 1}"
            sent = self.client._auth.header(self.ref) if on_registry else None
            if sent:
                headers["Authorization"] = sent  # never to a CDN the registry redirects to
            response = conn.open(url, headers)
            status = response.status
            if status in _REDIRECTS:
                location = response.header("location")
                response.error_body()  # drain it so the connection can be reused
                conn.release()
                if not location or hops >= _MAX_REDIRECTS:
                    raise RegistryError(f"downloading {self.label}: too many or broken redirects")
                url, hops = urljoin(url, location), hops + 1
                continue
            if status == 401 and on_registry and not auth_retried:
                challenge = response.header("www-authenticate")
                response.error_body()
                conn.release()
                new = self.client._auth.on_unauthorized(self.ref, False, challenge, sent)
                if new is None or new == sent:
                    raise _status_error(401, b"", self.ref, f"downloading {self.label}")
                auth_retried = True
                continue
            if status in (401, 403, 404, 410) and not on_registry and url == self.resolved_url:
                conn.release()  # a signed redirect URL that expired: ask the registry again
                with self.lock:
                    self.resolved_url = None
                url = self.url
                continue
            if status == 206:
                self._accept_partial(response, task, start, end)
            elif status == 200:
                self._accept_full(response, task)
            else:
                body = response.error_body()
                conn.release()
                error = _status_error(
                    status,
                    body,
                    self.ref,
                    f"downloading {self.label}",
                    retry_after=response.header("retry-after"),
                    missing=self.client._missing_blob(self.ref, self.digest),
                )
                raise error
            if not on_registry:
                with self.lock:
                    self.resolved_url = url
            return response

    def _accept_partial(self, response: _Response, task: _Task, start: int, end: int) -> None:
        match = _CONTENT_RANGE.fullmatch((response.header("content-range") or "").strip())
        if match is None or int(match.group(1)) != start:
            raise _Transient(
                RegistryError(
                    f"downloading {self.label}: asked for bytes {start}-{end - 1}, the registry "
                    f"answered {response.header('content-range')!r}"
                )
            )
        total = match.group(3)
        if total != "*" and int(total) != self.size:
            raise DigestMismatch(
                f"{self.label} is {total} bytes in the registry, but the manifest says {self.size}"
            )
        with self.lock:
            task.response_end = min(end, int(match.group(2)) + 1)
            if self.ranges_ok is None:
                self.ranges_ok = True
                self.lock.notify_all()

    def _accept_full(self, response: _Response, task: _Task) -> None:
        length = response.header("content-length")
        if length is not None and length.isdigit() and int(length) != self.size:
            raise DigestMismatch(
                f"{self.label} is {length} bytes in the registry, but the manifest says {self.size}"
            )
        with self.lock:
            # The body starts at byte 0, whatever range was asked for: take it all from here.
            if self.ranges_ok is not False:
                log.info("%s: the registry ignores Range; using one stream", self.label)
            self.ranges_ok = False
            self.queue.clear()
            self.unassigned = 0
            task.pos, task.end, task.response_end = 0, self.size, self.size
            self.lock.notify_all()

    def _pump(self, task: _Task, response: _Response) -> None:
        while True:
            pos = task.pos
            end = min(task.end, task.response_end)
            if pos >= end:
                return
            data = response.read(min(_READ, end - pos))
            if not data:
                raise _Transient(
                    RegistryError(
                        f"downloading {self.label}: connection closed at byte {pos} of {self.size}"
                    )
                )
            self._write(task, pos, data)

    def _write(self, task: _Task, pos: int, data: bytes) -> None:
        n = len(data)
        try:
            done = 0
            while done < n:
                done += os.pwrite(self.fd, data[done:], pos + done)
        except OSError as exc:
            raise _disk_error(exc, self.incomplete) from exc
        with self.lock:
            self.network += n
            self.unreported += self.written.add(pos, pos + n)
            task.pos = max(task.pos, pos + n)
            task.last_byte = time.monotonic()
            inline = not self.hashing and self.hash_pos == pos
            if inline:
                self.hashing = True
            elif not self.hashing and self.written.end_from(self.hash_pos) > self.hash_pos:
                self.lock.notify_all()
        if inline:
            try:
                self.hasher.update(data)
            finally:
                with self.lock:
                    self.hash_pos, self.hashing = pos + n, False
                    if (
                        self.hash_pos >= self.size
                        or self.written.end_from(self.hash_pos) > self.hash_pos
                    ):
                        self.lock.notify_all()
