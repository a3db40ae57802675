"""A local stand-in for the Hugging Face Hub API (huggingface.co cannot be reached here).

A real HTTP server on 127.0.0.1 implementing what `dmr_cli.distribution.huggingface` uses:

* `GET /api/models/<repo>/revision/<rev>` → `{"id", "sha", "lastModified"}`
* `GET /api/models/<repo>/tree/<rev>[/<dir>]` → one directory's entries, Hub-shaped
  (`type, path, size, oid, lfs{oid,size,pointerSize}`), paginated with a `Link: rel="next"`
  header when `page_size` is set
* `GET /<repo>/resolve/<rev>/<path>` → the file; LFS files answer 302 to `/cdn/<sha256>`, as
  the Hub redirects to its CDN. Both honour `Range: bytes=N-[M]` with 206 (unless
  `honour_range` is turned off, to play a server that ignores it).

`<rev>` is `main` or the repository's commit sha. Repository names match case-insensitively,
as on the Hub. A repository added with `token=` answers 401 without `Authorization: Bearer`,
403 with a wrong one. Every request is recorded in `hub.requests`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".gguf", ".safetensors", ".dduf")


@dataclass
class HubFile:
    """A file in a fake repository. `lfs_oid`/`size` override what the tree lists, so tests
    can serve bytes that do not match their listing."""

    content: bytes
    lfs: bool | None = None  # default: weights are LFS, other files plain git blobs
    lfs_oid: str | None = None
    size: int | None = None


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]
    sha: str
    last_modified: str
    token: str | None = None

    def is_lfs(self, path: str) -> bool:
        f = self.files[path]
        return f.lfs if f.lfs is not None else path.lower().endswith(LFS_SUFFIXES)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeHub:
    server: ThreadingHTTPServer
    thread: threading.Thread
    repos: dict[str, HubRepo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    page_size: int | None = None
    honour_range: bool = True

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | HubFile],
        *,
        token: str | None = None,
        last_modified: str = "2025-03-24T12:09:41.000Z",
    ) -> HubRepo:
        entries = {p: f if isinstance(f, HubFile) else HubFile(f) for p, f in files.items()}
        sha = hashlib.sha1(repo_id.encode() + last_modified.encode()).hexdigest()
        repo = HubRepo(repo_id, entries, sha, last_modified, token)
        self.repos[repo_id.lower()] = repo
        return repo

    def paths_requested(self, prefix: str) -> list[str]:
        return [r.path for r in self.requests if r.path.startswith(prefix)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def start_hub() -> FakeHub:
    hub: FakeHub

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            hub.requests.append(Request("GET", self.path, dict(self.headers.items())))
            url = urlsplit(self.path)
            path = unquote(url.path)
            if path.startswith("/cdn/"):
                self._serve_cdn(path[len("/cdn/") :])
                return
            m = re.match(r"^/api/models/([^/]+/[^/]+)/(tree|revision)/([^/]+)(?:/(.*))?$", path)
            if m:
                repo = self._repo(m.group(1), m.group(3))
                if repo is None:
                    return
                if m.group(2) == "revision":
                    self._json(
                        {"id": repo.repo_id, "sha": repo.sha, "lastModified": repo.last_modified}
                    )
                else:
                    self._tree(repo, m.group(4) or "", parse_qs(url.query))
                return
            m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
            if m:
                repo = self._repo(m.group(1), m.group(2))
                if repo is not None:
                    self._resolve(repo, m.group(3))
                return
            self._error(404, "Not found")

        def _repo(self, repo_id: str, revision: str) -> HubRepo | None:
            repo = hub.repos.get(repo_id.lower())
            if repo is None:
                self._error(404, "Repository not found")
                return None
            if repo.token is not None:
                auth = self.headers.get("Authorization")
                if auth is None:
                    self._error(401, "Invalid username or password.")
                    return None
                if auth != f"Bearer {repo.token}":
                    self._error(403, "Access to this repository is restricted.")
                    return None
            if revision not in ("main", repo.sha):
                self._error(404, "Revision not found")
                return None
            return repo

        def _tree(self, repo: HubRepo, directory: str, query: dict[str, list[str]]) -> None:
            prefix = f"{directory}/" if directory else ""
            if directory and not any(p.startswith(prefix) for p in repo.files):
                self._error(404, "Entry not found")
                return
            entries: dict[str, dict[str, Any]] = {}
            for path in sorted(repo.files):
                if not path.startswith(prefix):
                    continue
                rest = path[len(prefix) :]
                if "/" in rest:
                    sub = prefix + rest.split("/", 1)[0]
                    entries[sub] = {
                        "type": "directory",
                        "oid": git_blob_oid(sub.encode()),
                        "size": 0,
                        "path": sub,
                    }
                    continue
                entries[path] = self._entry(repo, path)
            items = list(entries.values())
            start = int(query.get("cursor", ["0"])[0])
            headers = {}
            if hub.page_size is not None:
                end = start + hub.page_size
                if end < len(items):
                    next_url = f"{hub.url}{urlsplit(self.path).path}?cursor={end}"
                    headers["Link"] = f'<{next_url}>; rel="next"'
                items = items[start:end]
            self._json(items, headers)

        def _entry(self, repo: HubRepo, path: str) -> dict[str, Any]:
            f = repo.files[path]
            size = f.size if f.size is not None else len(f.content)
            entry: dict[str, Any] = {
                "type": "file",
                "path": path,
                "size": size,
                "oid": git_blob_oid(f.content),
            }
            if repo.is_lfs(path):
                oid = f.lfs_oid or hashlib.sha256(f.content).hexdigest()
                entry["lfs"] = {"oid": oid, "size": size, "pointerSize": 134}
            return entry

        def _resolve(self, repo: HubRepo, path: str) -> None:
            f = repo.files.get(path)
            if f is None:
                self._error(404, "Entry not found")
                return
            if repo.is_lfs(path):
                self.send_response(302)
                self.send_header("Location", f"/cdn/{hashlib.sha256(f.content).hexdigest()}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._send_bytes(f.content)

        def _serve_cdn(self, digest: str) -> None:
            for repo in hub.repos.values():
                for f in repo.files.values():
                    if hashlib.sha256(f.content).hexdigest() == digest:
                        self._send_bytes(f.content)
                        return
            self._error(404, "Not found")

        def _send_bytes(self, content: bytes) -> None:
            m = re.match(r"^bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
            if m and hub.honour_range and int(m.group(1)) < len(content):
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(content) - 1
                body = content[start : end + 1]
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(content)}")
            else:
                body = content
                self.send_response(200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, value: Any, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, val in (headers or {}).items():
                self.send_header(name, val)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hf-hub", daemon=True
    )
    hub = FakeHub(server, thread)
    thread.start()
    return hub
