"""RegistryClient against a real registry (CNCF distribution), with an in-test HTTP proxy for
faults a real registry does not produce on its own: 503s, stalls, trickles, ignored Range."""

from __future__ import annotations

import base64
import errno
import hashlib
import http.client
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from dmr_cli.distribution import registry as registry_module
from dmr_cli.distribution.registry import OCI_INDEX, OCI_MANIFEST, RegistryClient
from dmr_cli.errors import (
    Cancelled,
    DigestMismatch,
    DiskFull,
    ModelNotFound,
    RegistryError,
    Unauthorized,
    UnsupportedMediaType,
)
from dmr_cli.reference import Reference, parse_reference
from tests.helpers.proxy import CountingProxy
from tests.helpers.registry import RunningRegistry, free_port, start_registry

MiB = 1024 * 1024
CONFIG_TYPE = "application/vnd.docker.ai.model.config.v0.1+json"
GGUF_TYPE = "application/vnd.docker.ai.gguf.v3"
ROOT = Path(__file__).resolve().parents[2]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials or proxies from the machine running the tests."""
    (tmp_path / "docker").mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def make_client() -> Iterator[Callable[..., RegistryClient]]:
    clients: list[RegistryClient] = []

    def make(**kwargs: object) -> RegistryClient:
        client = RegistryClient(**kwargs)  # type: ignore[arg-type]
        client.backoff_base = 0.05  # keep retry tests quick; the policy is what is tested
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


class Pusher:
    """A minimal, independent pusher: plain httpx and the distribution API, no dmr code."""

    def __init__(self, reg: RunningRegistry) -> None:
        auth = (reg.username, reg.password) if reg.username and reg.password else None
        self.http = httpx.Client(base_url=reg.url, auth=auth, timeout=60)
        self.host = reg.host

    def blob(self, repo: str, data: bytes) -> str:
        digest = sha(data)
        started = self.http.post(f"/v2/{repo}/blobs/uploads/")
        assert started.status_code == 202, started.text
        url = httpx.URL(started.headers["location"]).copy_add_param("digest", digest)
        done = self.http.put(url, content=data)
        assert done.status_code == 201, done.text
        return digest

    def manifest(self, repo: str, tag: str, body: bytes, media_type: str = OCI_MANIFEST) -> str:
        done = self.http.put(
            f"/v2/{repo}/manifests/{tag}", content=body, headers={"Content-Type": media_type}
        )
        assert done.status_code == 201, done.text
        return sha(body)

    def model(self, repo: str, tag: str, layers: list[bytes]) -> tuple[str, bytes, bytes]:
        """Push a model artifact; returns (manifest digest, manifest bytes, config bytes)."""
        config = json.dumps({"config": {"format": "gguf"}, "rootfs": {"type": "rootfs"}}).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": CONFIG_TYPE,
                    "digest": self.blob(repo, config),
                    "size": len(config),
                },
                "layers": [
                    {"mediaType": GGUF_TYPE, "digest": self.blob(repo, data), "size": len(data)}
                    for data in layers
                ],
            }
        ).encode()
        return self.manifest(repo, tag, manifest), manifest, config

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def pusher(registry: RunningRegistry) -> Iterator[Pusher]:
    p = Pusher(registry)
    yield p
    p.close()


def ref_at(host: str, repo: str, tag: str = "latest") -> Reference:
    return parse_reference(f"{host}/{repo}:{tag}")


@dataclass
class Download:
    """Paths and progress of one blob download into a store-like directory."""

    dir: Path
    digest: str
    size: int
    progress: list[int] = field(default_factory=list)

    @property
    def final(self) -> Path:
        return self.dir / self.digest[7:]

    @property
    def incomplete(self) -> Path:
        return self.dir / (self.digest[7:] + ".incomplete")

    @property
    def ranges(self) -> Path:
        return self.dir / (self.digest[7:] + ".incomplete.ranges")

    @property
    def corrupt(self) -> Path:
        return self.dir / (self.digest[7:] + ".corrupt")

    def run(
        self, client: RegistryClient, ref: Reference, cancel: threading.Event | None = None
    ) -> int:
        return client.download_blob(
            ref, self.digest, self.size, self.incomplete, self.final, self.progress.append, cancel
        )

    def kept(self) -> int:
        """Bytes a resume may keep, read from the on-disk state as documented."""
        if self.ranges.exists():
            return sum(b - a for a, b in json.loads(self.ranges.read_text())["ranges"])
        return self.incomplete.stat().st_size if self.incomplete.exists() else 0


def download_of(tmp_path: Path, data: bytes) -> Download:
    directory = tmp_path / "store"
    directory.mkdir(exist_ok=True)
    return Download(directory, sha(data), len(data))


# -- a fault-injecting proxy ------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    range: tuple[int, int] | None


class FaultProxy:
    """HTTP/1.1 keep-alive proxy to the registry. `plan(index, seen)` picks what happens to
    the index-th blob GET: None (relay), "503", "stall", "trickle", or "norange"."""

    def __init__(self, upstream: str, plan: Callable[[int, Seen], str | None]) -> None:
        self.upstream = upstream
        self.plan = plan
        self.seen: list[Seen] = []
        self.actions: list[tuple[Seen, str]] = []
        self.release = threading.Event()
        self.trickle_rate = 64 * 1024  # bytes per second
        self._lock = threading.Lock()
        self._blob_gets = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                proxy.relay(self)

            def do_HEAD(self) -> None:
                proxy.relay(self)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def relay(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        header = handler.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", header or "")
        seen = Seen(
            handler.command, handler.path, (int(match[1]), int(match[2])) if match else None
        )
        action = None
        with self._lock:
            self.seen.append(seen)
            if handler.command == "GET" and "/blobs/sha256:" in handler.path:
                action = self.plan(self._blob_gets, seen)
                self._blob_gets += 1
                if action:
                    self.actions.append((seen, action))
        if action == "503":
            body = b'{"errors":[{"code":"UNAVAILABLE","message":"try again"}]}'
            handler.send_response(503)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        headers = {
            k: v for k in ("Range", "Authorization", "Accept") if (v := handler.headers.get(k))
        }
        if action == "norange":
            headers.pop("Range", None)
        upstream = http.client.HTTPConnection(self.upstream, timeout=30)
        upstream.request(handler.command, handler.path, headers=headers)
        response = upstream.getresponse()
        body = response.read()
        upstream.close()
        handler.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("connection", "content-length", "date", "server"):
                handler.send_header(key, value)
        length = response.getheader("Content-Length") if handler.command == "HEAD" else None
        handler.send_header("Content-Length", length or str(len(body)))
        handler.end_headers()
        if handler.command == "HEAD":
            return
        try:
            if action == "stall":
                handler.wfile.write(body[: len(body) // 4])
                handler.wfile.flush()
                self.release.wait(60)
                handler.close_connection = True
            elif action == "trickle":
                piece = 4096
                for offset in range(0, len(body), piece):
                    if self.release.is_set():
                        break
                    handler.wfile.write(body[offset : offset + piece])
                    handler.wfile.flush()
                    time.sleep(piece / self.trickle_rate)
                handler.close_connection = True
            else:
                handler.wfile.write(body)
        except OSError:
            handler.close_connection = True  # the client dropped us: that is the point

    def blob_gets(self) -> list[Seen]:
        return [s for s in self.seen if s.method == "GET" and "/blobs/sha256:" in s.path]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def make_proxy(registry: RunningRegistry) -> Iterator[Callable[..., FaultProxy]]:
    proxies: list[FaultProxy] = []

    def make(plan: Callable[[int, Seen], str | None]) -> FaultProxy:
        proxy = FaultProxy(registry.host, plan)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def make_relay(registry: RunningRegistry) -> Iterator[Callable[..., CountingProxy]]:
    """Byte-counting TCP relays to the registry: what really crossed the wire."""
    relays: list[CountingProxy] = []

    def make(**limits: float) -> CountingProxy:
        host, port = registry.host.split(":")
        relay = CountingProxy(host, int(port), **limits)
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        relay.close()


# -- manifests and small blobs ------------------------------------------------------------------


def test_manifest_by_tag_and_by_digest(registry: RunningRegistry, pusher: Pusher, make_client):
    digest, manifest, config = pusher.model("ai/tiny", "v1", [os.urandom(1000)])
    client = make_client()

    got_digest, raw, media_type = client.get_manifest(ref_at(registry.host, "ai/tiny", "v1"))
    assert (got_digest, raw, media_type) == (digest, manifest, OCI_MANIFEST)

    by_digest = parse_reference(f"{registry.host}/ai/tiny@{digest}")
    assert client.get_manifest(by_digest) == (digest, manifest, OCI_MANIFEST)

    config_digest = json.loads(manifest)["config"]["digest"]
    assert client.get_blob(by_digest, config_digest) == config
    assert client.blob_exists(by_digest, config_digest)
    assert not client.blob_exists(by_digest, sha(b"not there"))


def test_missing_model_is_model_not_found(registry: RunningRegistry, pusher: Pusher, make_client):
    pusher.model("ai/tiny", "v1", [b"x"])
    client = make_client()
    with pytest.raises(ModelNotFound, match=r"ai/tiny:nope"):
        client.get_manifest(ref_at(registry.host, "ai/tiny", "nope"))
    with pytest.raises(ModelNotFound, match=r"ai/absent"):
        client.get_manifest(ref_at(registry.host, "ai/absent"))
    with pytest.raises(ModelNotFound):
        client.get_blob(ref_at(registry.host, "ai/tiny"), sha(b"no such blob"))


def test_image_index_is_refused(registry: RunningRegistry, pusher: Pusher, make_client):
    digest, manifest, _ = pusher.model("ai/tiny", "v1", [b"x"])
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest)}],
        }
    ).encode()
    pusher.manifest("ai/tiny", "multi", index, OCI_INDEX)
    with pytest.raises(UnsupportedMediaType, match="image index"):
        make_client().get_manifest(ref_at(registry.host, "ai/tiny", "multi"))


def test_digest_reference_is_verified(registry: RunningRegistry, pusher: Pusher, make_client):
    _, manifest, _ = pusher.model("ai/tiny", "v1", [b"x"])
    # The registry serves by digest only what hashes to it, so ask a proxy to lie: tag bytes
    # under a digest reference are what a compromised mirror would send.
    wrong = sha(manifest + b" ")
    proxy = FaultProxy(registry.host, lambda i, s: None)
    try:
        original = proxy.relay

        def rewrite(handler: http.server.BaseHTTPRequestHandler) -> None:
            handler.path = handler.path.replace(wrong, "v1")
            original(handler)

        proxy.relay = rewrite  # type: ignore[method-assign]
        with pytest.raises(DigestMismatch, match=wrong):
            make_client().get_manifest(parse_reference(f"{proxy.host}/ai/tiny@{wrong}"))
    finally:
        proxy.close()


def test_unreachable_registry_names_the_host(make_client):
    port = free_port()
    with pytest.raises(RegistryError, match=f"127.0.0.1:{port}") as info:
        make_client(retries=1).get_manifest(ref_at(f"127.0.0.1:{port}", "ai/x"))
    assert info.value.http_status is None


# -- authentication ---------------------------------------------------------------------------


def write_docker_config(tmp_path: Path, auths: dict[str, object]) -> None:
    (tmp_path / "docker" / "config.json").write_text(json.dumps({"auths": auths}))


def test_basic_auth_from_docker_config(auth_registry: RunningRegistry, tmp_path: Path, make_client):
    pusher = Pusher(auth_registry)
    data = os.urandom(3 * MiB)
    digest, _, _ = pusher.model("team/secret", "v1", [data])
    pusher.close()
    ref = ref_at(auth_registry.host, "team/secret", "v1")

    with pytest.raises(Unauthorized, match="denied access") as info:
        make_client().get_manifest(ref)
    assert info.value.hint and "config.json" in info.value.hint

    token = base64.b64encode(b"dmr:wrong").decode()
    write_docker_config(tmp_path, {auth_registry.host: {"auth": token}})
    with pytest.raises(Unauthorized):
        make_client().get_manifest(ref)

    token = base64.b64encode(b"dmr:s3cret-pass").decode()
    write_docker_config(tmp_path, {f"http://{auth_registry.host}/v2/": {"auth": token}})
    client = make_client(chunk_size=MiB, connections=3)
    assert client.get_manifest(ref)[0] == digest
    download = download_of(tmp_path, data)
    assert download.run(client, ref) == len(data)
    assert download.final.read_bytes() == data


def test_upload_then_download_round_trip(registry: RunningRegistry, tmp_path: Path, make_client):
    client = make_client(chunk_size=MiB)
    ref = ref_at(registry.host, "me/model", "v2")
    small = json.dumps({"config": {"format": "gguf"}}).encode()
    big = os.urandom(5 * MiB + 123)  # over 2 chunks: goes up in PATCHes
    big_path = tmp_path / "weights.gguf"
    big_path.write_bytes(big)

    uploaded: list[int] = []
    client.upload_blob(ref, sha(small), small, len(small), uploaded.append)
    client.upload_blob(ref, sha(big), big_path, len(big), uploaded.append)
    assert sum(uploaded) == len(small) + len(big)
    assert client.blob_exists(ref, sha(big))
    again: list[int] = []
    client.upload_blob(ref, sha(big), big_path, len(big), again.append)  # already there
    assert again == [len(big)]

    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG_TYPE, "digest": sha(small), "size": len(small)},
            "layers": [{"mediaType": GGUF_TYPE, "digest": sha(big), "size": len(big)}],
        }
    ).encode()
    assert client.put_manifest(ref, manifest, OCI_MANIFEST) == sha(manifest)

    reader = make_client(chunk_size=MiB, connections=4)
    assert reader.get_manifest(ref) == (sha(manifest), manifest, OCI_MANIFEST)
    download = download_of(tmp_path, big)
    assert download.run(reader, ref) == len(big)
    assert download.final.read_bytes() == big
    assert sum(download.progress) == len(big)


# -- blob downloads -------------------------------------------------------------------------------


def spy_ranges(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """Record (connection id, Range header) of every data-path request."""
    calls: list[tuple[int, str]] = []
    original = registry_module._DirectConnection.open

    def open_(self: registry_module._DirectConnection, url: str, headers: dict[str, str]):  # type: ignore[no-untyped-def]
        calls.append((id(self), headers.get("Range", "")))
        return original(self, url, headers)

    monkeypatch.setattr(registry_module._DirectConnection, "open", open_)
    return calls


def test_parallel_ranged_download(
    registry: RunningRegistry, pusher: Pusher, tmp_path: Path, make_client, monkeypatch
):
    data = os.urandom(72 * MiB + 4321)
    pusher.model("ai/big", "latest", [data])
    calls = spy_ranges(monkeypatch)
    download = download_of(tmp_path, data)

    received = download.run(
        make_client(chunk_size=4 * MiB, connections=8), ref_at(registry.host, "ai/big")
    )

    assert download.final.read_bytes() == data
    assert received == len(data)
    assert sum(download.progress) == len(data)
    assert not download.incomplete.exists() and not download.ranges.exists()
    starts = {int(r.split("=")[1].split("-")[0]) for _, r in calls}
    assert len(starts) >= 18  # 4 MiB pieces, not one stream
    assert len({conn for conn, _ in calls}) == 8


def test_small_blob_is_one_stream(
    registry: RunningRegistry, pusher: Pusher, tmp_path: Path, make_client, monkeypatch
):
    data = os.urandom(3 * MiB)
    pusher.model("ai/small", "latest", [data])
    calls = spy_ranges(monkeypatch)
    download = download_of(tmp_path, data)
    download.run(make_client(chunk_size=4 * MiB), ref_at(registry.host, "ai/small"))
    assert download.final.read_bytes() == data
    assert [r for _, r in calls] == [f"bytes=0-{len(data) - 1}"]


def test_resume_from_a_plain_prefix(
    registry: RunningRegistry, pusher: Pusher, tmp_path: Path, make_client
):
    """A `.incomplete` without a `.ranges` record is a contiguous prefix (DMR's format)."""
    data = os.urandom(40 * MiB)
    pusher.model("ai/resume", "latest", [data])
    download = download_of(tmp_path, data)
    kept = 13 * MiB + 17
    download.incomplete.write_bytes(data[:kept])

    received = download.run(
        make_client(chunk_size=4 * MiB, connections=4), ref_at(registry.host, "ai/resume")
    )

    assert download.final.read_bytes() == data
    assert len(data) - kept <= received <= len(data) - kept + 4 * MiB
    assert download.progress[0] >= kept  # the kept bytes come with the first report
    assert sum(download.progress) == len(data)


def test_resume_from_recorded_ranges(
    registry: RunningRegistry, pusher: Pusher, tmp_path: Path, make_client
):
    data = os.urandom(40 * MiB)
    pusher.model("ai/resume", "latest", [data])
    download = download_of(tmp_path, data)
    kept_ranges = [[0, 8 * MiB], [20 * MiB, 27 * MiB + 5], [36 * MiB, 40 * MiB]]
    with open(download.incomplete, "wb") as f:
        for a, b in kept_ranges:
            f.seek(a)
            f.write(data[a:b])
    download.ranges.write_text(
        json.dumps({"digest": download.digest, "size": len(data), "ranges": kept_ranges})
    )
    kept = download.kept()

    received = download.run(
        make_client(chunk_size=4 * MiB, connections=4), ref_at(registry.host, "ai/resume")
    )

    assert download.final.read_bytes() == data
    assert len(data) - kept <= received <= len(data) - kept + 4 * MiB
    assert sum(download.progress) == len(data)
    assert not download.ranges.exists()


def test_ranges_record_for_another_blob_is_discarded(
    registry: RunningRegistry, pusher: Pusher, tmp_path: Path, make_client
):
    data = os.urandom(12 * MiB)
    pusher.model("ai/resume", "latest", [data])
    download = download_of(tmp_path, data)
    download.incomplete.write_bytes(b"\0" * (6 * MiB))
    download.ranges.write_text(
        json.dumps({"digest": sha(b"other"), "size": len(data), "ranges": [[0, 6 * MiB]]})
    )
    received = download.run(make_client(chunk_size=2 * MiB), ref_at(registry.host, "ai/resume"))
    assert received == len(data)
    assert download.final.read_bytes() == data


def test_resume_after_sigkill(
    registry: RunningRegistry, pusher: Pusher, tmp_path: Path, make_proxy, make_client
):
    """Kill -9 a downloading process mid-way; the next run fetches only what was not kept."""
    data = os.urandom(24 * MiB)
    pusher.model("ai/killed", "latest", [data])
    proxy = make_proxy(lambda i, s: "trickle")
    proxy.trickle_rate = 2 * MiB
    download = download_of(tmp_path, data)
    args = [proxy.host + "/ai/killed", download.digest, str(len(data))]
    args += [str(download.incomplete), str(download.final)]
    script = """
import sys
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit
from dmr_cli.distribution.registry import RegistryClient
from dmr_cli.reference import parse_reference
ref, digest, size, incomplete, final = sys.argv[1:]
client = RegistryClient(chunk_size=2 * 1024 * 1024, connections=4)
client.download_blob(
    parse_reference(ref), digest, int(size), Path(incomplete), Path(final), lambda n: None
)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", script, *args], env=env)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and child.poll() is None:
            if download.ranges.exists() and download.kept() >= 6 * MiB:
                break
            time.sleep(0.05)
        assert child.poll() is None, "the download finished before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    proxy.release.set()
    kept = download.kept()
    assert 6 * MiB <= kept < len(data)

    received = download.run(
        make_client(chunk_size=2 * MiB, connections=4), ref_at(registry.host, "ai/killed")
    )

    assert download.final.read_bytes() == data
    assert len(data) - kept <= received <= len(data) - kept + 2 * MiB


def test_resume_from_scattered_ranges_fetches_only_the_holes(
    registry: RunningRegistry, pusher: Pusher, tmp_path: Path, make_client, make_relay
):
    """What a kill leaves in the middle of a parallel download (ranges finished or half done
    by each connection, holes between them and a long tail) resumes without fetching any
    byte twice. The relay is as fast as loopback allows, so socket buffers hold megabytes:
    a request cut short would show here as bytes crossing the wire for nothing."""
    data = os.urandom(80 * MiB + 12345)
    pusher.model("ai/scattered", "latest", [data])
    download = download_of(tmp_path, data)
    kept_ranges = [
        [0, 5 * MiB],
        [5 * MiB + 1, 8 * MiB + 333],
        [10 * MiB, 12 * MiB + 7],
        [15 * MiB, 19 * MiB],
        [20 * MiB, 20 * MiB + 4096],
        [25 * MiB + 17, 29 * MiB],
        [30 * MiB, 31 * MiB],
        [35 * MiB, 37 * MiB + 3],
    ]
    with open(download.incomplete, "wb") as f:
        for a, b in kept_ranges:
            f.seek(a)
            f.write(data[a:b])
    download.ranges.write_text(
        json.dumps({"digest": download.digest, "size": len(data), "ranges": kept_ranges})
    )
    missing = len(data) - download.kept()
    relay = make_relay()

    received = download.run(make_client(), ref_at(relay.host, "ai/scattered"))

    assert download.final.read_bytes() == data
    assert received == missing
    assert sum(download.progress) == len(data)
    headers = relay.downstream_bytes - missing
    assert 0 < headers <= 64 * 1024


def test_uniformly_slow_link_fetches_each_byte_once(
    registry: RunningRegistry, pusher: Pusher, tmp_path: Path, make_client, make_relay
):
    """On a link capped in total every connection is slow alike: none may be taken for a
    straggler and re-requested, nor its range split, at the cost of bytes fetched twice."""
    data = os.urandom(80 * MiB)
    pusher.model("ai/capped", "latest", [data])
    download = download_of(tmp_path, data)
    relay = make_relay(rate=25 * MiB)

    received = download.run(make_client(), ref_at(relay.host, "ai/capped"))

    assert download.final.read_bytes() == data
    assert received == len(data)
    assert len(data) < relay.downstream_bytes <= len(data) + MiB


def test_corrupt_blob_is_moved_aside(
    registry: RunningRegistry, pusher: Pusher, tmp_path: Path, make_client
):
    data = os.urandom(12 * MiB)
    pusher.model("ai/bad", "latest", [data])
    digest = sha(data)
    stored = (
        registry.root / "data/docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / "data"
    )
    stored.write_bytes(os.urandom(len(data)))
    download = download_of(tmp_path, data)
    client = make_client(chunk_size=2 * MiB, connections=4)
    ref = ref_at(registry.host, "ai/bad")

    with pytest.raises(DigestMismatch, match=f"expected {digest}") as info:
        download.run(client, ref)

    assert str(download.corrupt) in str(info.value)
    assert not download.final.exists()
    assert download.corrupt.stat().st_size == len(data)
    assert not download.incomplete.exists() and not download.ranges.exists()
    with pytest.raises(DigestMismatch):
        download.run(client, ref)  # starts clean, and fails the same way


def test_503_once_is_retried(
    registry: RunningRegistry, pusher: Pusher, tmp_path: Path, make_proxy, make_client
):
    data = os.urandom(10 * MiB)
    pusher.model("ai/flaky", "latest", [data])
    proxy = make_proxy(lambda i, s: "503" if i == 0 else None)
    download = download_of(tmp_path, data)

    received = download.run(make_client(chunk_size=2 * MiB), ref_at(proxy.host, "ai/flaky"))

    assert download.final.read_bytes() == data
    assert received == len(data)
    gets = proxy.blob_gets()
    assert [a for _, a in proxy.actions] == ["503"]
    assert gets[0].range == gets[1].range  # the same range, asked again


def test_503_is_retried_through_an_injected_transport(
    registry: RunningRegistry, pusher: Pusher, tmp_path: Path, make_client
):
    """With a transport the data path runs on httpx; 503 on a manifest and a blob is retried,
    a 400 is not."""
    data = os.urandom(10 * MiB)
    pusher.model("ai/flaky", "latest", [data])

    class OnceUnavailable(httpx.BaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.HTTPTransport()
            self.failed: list[str] = []

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            kind = "blob" if "/blobs/" in request.url.path else "manifest"
            if request.method == "GET" and kind not in self.failed:
                self.failed.append(kind)
                return httpx.Response(503, json={"errors": [{"code": "UNAVAILABLE"}]})
            return self.inner.handle_request(request)

        def close(self) -> None:
            self.inner.close()

    transport = OnceUnavailable()
    client = make_client(transport=transport, chunk_size=2 * MiB)
    ref = ref_at(registry.host, "ai/flaky")
    assert client.get_manifest(ref)[0].startswith("sha256:")
    download = download_of(tmp_path, data)
    assert download.run(client, ref) == len(data)
    assert download.final.read_bytes() == data
    assert transport.failed == ["manifest", "blob"]

    def bad_request(request: httpx.Request) -> httpx.Response:
        bad_request.calls += 1  # type: ignore[attr-defined]
        return httpx.Response(400, json={"errors": [{"code": "MANIFEST_INVALID"}]})

    bad_request.calls = 0  # type: ignore[attr-defined]
    with pytest.raises(RegistryError, match="400") as info:
        make_client(transport=httpx.MockTransport(bad_request)).get_manifest(ref)
    assert info.value.http_status == 400 and bad_request.calls == 1  # type: ignore[attr-defined]


def test_stalled_range_is_re_requested(
    registry: RunningRegistry, pusher: Pusher, tmp_path: Path, make_proxy, make_client
):
    data = os.urandom(16 * MiB)
    pusher.model("ai/stall", "latest", [data])
    proxy = make_proxy(lambda i, s: "stall" if i == 1 else None)
    download = download_of(tmp_path, data)
    client = make_client(chunk_size=2 * MiB, connections=4, stall_timeout=1.0)

    download.run(client, ref_at(proxy.host, "ai/stall"))

    assert download.final.read_bytes() == data
    [(stalled, _)] = proxy.actions
    assert stalled.range is not None
    start, end = stalled.range
    resumed_at = start + (end - start + 1) // 4  # the proxy sent a quarter, then nothing
    assert any(s.range and s.range[0] == resumed_at for s in proxy.blob_gets())


def test_crawling_range_is_re_requested(
    registry: RunningRegistry, pusher: Pusher, tmp_path: Path, make_proxy, make_client
):
    """A connection that trickles while the rest are done is dropped long before any stall
    timeout, and its remainder fetched on a fresh connection."""
    data = os.urandom(16 * MiB)
    pusher.model("ai/crawl", "latest", [data])
    proxy = make_proxy(lambda i, s: "trickle" if i == 2 else None)
    proxy.trickle_rate = 32 * 1024
    download = download_of(tmp_path, data)
    client = make_client(chunk_size=2 * MiB, connections=4, stall_timeout=600)

    download.run(client, ref_at(proxy.host, "ai/crawl"))

    assert download.final.read_bytes() == data
    [(crawling, _)] = proxy.actions
    assert crawling.range is not None
    start, end = crawling.range
    assert any(
        s.range and start < s.range[0] <= end and s.range[1] == end for s in proxy.blob_gets()
    )


def test_registry_without_range_support(
    registry: RunningRegistry, pusher: Pusher, tmp_path: Path, make_proxy, make_client
):
    data = os.urandom(12 * MiB)
    pusher.model("ai/norange", "latest", [data])
    proxy = make_proxy(lambda i, s: "norange")
    download = download_of(tmp_path, data)
    download.incomplete.write_bytes(data[: 5 * MiB])

    received = download.run(make_client(chunk_size=2 * MiB), ref_at(proxy.host, "ai/norange"))

    assert download.final.read_bytes() == data
    assert received == len(data)  # the kept prefix could not be used: the server sends it all
    assert len(proxy.blob_gets()) == 1  # and no more connections were opened


def test_cancel_leaves_a_resumable_partial(
    registry: RunningRegistry, pusher: Pusher, tmp_path: Path, make_proxy, make_client
):
    data = os.urandom(16 * MiB)
    pusher.model("ai/cancel", "latest", [data])
    proxy = make_proxy(lambda i, s: "trickle")
    proxy.trickle_rate = MiB
    download = download_of(tmp_path, data)
    cancel = threading.Event()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            download.run(
                make_client(chunk_size=2 * MiB, connections=4),
                ref_at(proxy.host, "ai/cancel"),
                cancel,
            )
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    while not download.progress and worker.is_alive():
        time.sleep(0.02)
    cancel.set()
    worker.join(30)
    assert not worker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], Cancelled)
    proxy.release.set()
    kept = download.kept()
    assert 0 < kept < len(data)
    assert not download.final.exists()

    received = download.run(
        make_client(chunk_size=2 * MiB, connections=4), ref_at(registry.host, "ai/cancel")
    )
    assert download.final.read_bytes() == data
    assert received <= len(data) - kept + 2 * MiB


def test_not_enough_disk_space(
    registry: RunningRegistry, pusher: Pusher, tmp_path: Path, make_client, monkeypatch
):
    data = os.urandom(3 * MiB)
    pusher.model("ai/full", "latest", [data])
    download = download_of(tmp_path, data)
    download.incomplete.write_bytes(data[:MiB])
    real = os.statvfs(download.dir)

    class Almost:
        f_frsize = real.f_frsize
        f_bavail = (MiB // real.f_frsize) + 1  # a bit more than 1 MiB free; 2 MiB needed

    monkeypatch.setattr(registry_module.os, "statvfs", lambda path: Almost)
    with pytest.raises(DiskFull, match=r"2\.0 MiB more needed"):
        download.run(make_client(), ref_at(registry.host, "ai/full"))
    assert download.incomplete.read_bytes() == data[:MiB]  # kept for when there is room


def test_disk_full_mid_download_keeps_the_bytes(
    registry: RunningRegistry, pusher: Pusher, tmp_path: Path, make_client, monkeypatch
):
    """ENOSPC while writing: DiskFull, and what was written stays for the next attempt.
    (A full filesystem cannot be made here without root, so os.pwrite fails on cue.)"""
    data = os.urandom(12 * MiB)
    pusher.model("ai/full", "latest", [data])
    download = download_of(tmp_path, data)
    real_pwrite = os.pwrite
    budget = [5 * MiB]

    def pwrite(fd: int, buffer: bytes, offset: int) -> int:
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        budget[0] -= len(buffer)
        return real_pwrite(fd, buffer, offset)

    monkeypatch.setattr(registry_module.os, "pwrite", pwrite)
    client = make_client(chunk_size=2 * MiB, connections=4)
    with pytest.raises(DiskFull, match="no space left"):
        download.run(client, ref_at(registry.host, "ai/full"))
    monkeypatch.undo()
    kept = download.kept()
    assert kept >= 4 * MiB
    assert not download.final.exists()

    received = download.run(client, ref_at(registry.host, "ai/full"))
    assert download.final.read_bytes() == data
    assert received <= len(data) - kept + 2 * MiB


# -- a registry with token (bearer) authentication ----------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues the JWTs distribution's `token` auth verifies (RS256, x5c chain), for one user."""

    def __init__(self, tmp: Path, user: str, password: str) -> None:
        self.key, self.cert = tmp / "token.key", tmp / "token.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=dmr-test-token", "-keyout", str(self.key), "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
            check=True, capture_output=True,
        ).stdout  # fmt: skip
        self.x5c = base64.b64encode(der).decode()
        self.requests: list[dict[str, str]] = []
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = dict(parse_qsl(urlsplit(self.path).query))
                server.requests.append(query)
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.end_headers()
                    return
                _, repo, actions = query["scope"].split(":")
                body = json.dumps(
                    {"token": server.sign(repo, actions.split(",")), "expires_in": 300}
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def sign(self, repo: str, actions: list[str]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {
            "iss": "dmr-test-issuer", "sub": "dmr", "aud": "dmr-test-registry",
            "exp": now + 300, "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(),
            "access": [{"type": "repository", "name": repo, "actions": actions}],
        }  # fmt: skip
        signing_input = (
            f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        )
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(), check=True, capture_output=True,
        ).stdout  # fmt: skip
        return f"{signing_input}.{b64url(signature)}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def token_registry(tmp_path: Path) -> Iterator[tuple[str, TokenServer]]:
    tokens = TokenServer(tmp_path, "dmr", "t0ken-pass")
    registry = start_registry(
        tmp_path,
        name="token-registry",
        auth=f"""auth:
  token:
    realm: {tokens.url}
    service: dmr-test-registry
    issuer: dmr-test-issuer
    rootcertbundle: {tokens.cert}
""",
    )
    yield registry.host, tokens
    registry.stop()
    tokens.close()


def test_bearer_token_flow(token_registry, tmp_path: Path, make_client):
    host, tokens = token_registry
    ref = ref_at(host, "team/model", "v1")
    with pytest.raises(Unauthorized):
        make_client().upload_blob(ref, sha(b"cfg"), b"cfg", 3, lambda n: None)
    assert tokens.requests[-1]["scope"] == "repository:team/model:pull,push"

    write_docker_config(tmp_path, {host: {"username": "dmr", "password": "t0ken-pass"}})
    pushing = make_client(chunk_size=MiB)
    config, layer = b'{"config":{}}', os.urandom(4 * MiB)
    pushing.upload_blob(ref, sha(config), config, len(config), lambda n: None)
    pushing.upload_blob(ref, sha(layer), layer, len(layer), lambda n: None)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG_TYPE, "digest": sha(config), "size": len(config)},
            "layers": [{"mediaType": GGUF_TYPE, "digest": sha(layer), "size": len(layer)}],
        }
    ).encode()
    pushing.put_manifest(ref, manifest, OCI_MANIFEST)
    assert len(tokens.requests) == 2  # one pull,push token served every push request

    pulling = make_client(chunk_size=MiB, connections=3)
    assert pulling.get_manifest(ref)[1] == manifest
    download = download_of(tmp_path, layer)
    download.run(pulling, ref)
    assert download.final.read_bytes() == layer
    # One pull token for the manifest and all ranged requests of the download.
    assert [r["scope"] for r in tokens.requests[2:]] == ["repository:team/model:pull"]
    assert all(r["service"] == "dmr-test-registry" for r in tokens.requests)


def test_explicit_bearer_token_wins(token_registry, tmp_path: Path, make_client):
    host, tokens = token_registry
    write_docker_config(tmp_path, {host: {"username": "dmr", "password": "t0ken-pass"}})
    ref = ref_at(host, "team/model", "v1")
    with pytest.raises(Unauthorized):
        make_client(bearer_token="not-a-valid-token").get_manifest(ref)
    assert tokens.requests == []  # the explicit token is used as given; config not consulted
    token = tokens.sign("team/model", ["pull"])
    with pytest.raises(ModelNotFound):  # authorised, and the tag does not exist
        make_client(bearer_token=token).get_manifest(ref)
