"""Runner installation: runner images pushed to the real local registry, unpacked safely;
and (slow) llama-server built from source through the CLI, with a build cache kept across runs."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from dmr_cli.errors import DmrError, NotFound, RegistryError, UnsupportedMediaType
from dmr_cli.runtime import build, install
from dmr_cli.runtime.detect import Detection
from dmr_cli.runtime.install import UnsafeLayer, extract_layer, host_platform, install_from_image
from tests.helpers.daemon import isolated_env
from tests.helpers.oci import digest_of, push_blob, put_manifest
from tests.helpers.registry import RunningRegistry, free_port

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
REPO = "docker/docker-model-backend-llamacpp"
SYSTEM, ARCH = host_platform()
PREFIX = f"com.docker.llama-server.native.{SYSTEM}.cpu.{ARCH}"
FAKE_SERVER = b"#!/bin/sh\necho 'version: 1234 (abcdef0)' >&2\necho 'built with cc for test' >&2\n"


@dataclass
class Entry:
    """One tar member: a file (data), a directory, or a symlink / hard link (link)."""

    name: str
    data: bytes = b""
    mode: int = 0o644
    kind: bytes = tarfile.REGTYPE
    link: str = ""


def layer(entries: list[Entry], *, compress: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type, info.mode, info.linkname = entry.kind, entry.mode, entry.link
            info.size = len(entry.data) if entry.kind == tarfile.REGTYPE else 0
            archive.addfile(info, io.BytesIO(entry.data) if info.size else None)
    raw = buffer.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


def runner_files(prefix: str = PREFIX, server: bytes = FAKE_SERVER) -> list[Entry]:
    return [
        Entry(f"{prefix}/", kind=tarfile.DIRTYPE, mode=0o755),
        Entry(f"{prefix}/bin/", kind=tarfile.DIRTYPE, mode=0o755),
        Entry(f"{prefix}/bin/llama-server", server, mode=0o755),
        Entry(f"{prefix}/lib/", kind=tarfile.DIRTYPE, mode=0o755),
        Entry(f"{prefix}/lib/libggml-base.so", b"\x7fELF fake library", mode=0o644),
        Entry(f"{prefix}/lib/libggml.so.1", kind=tarfile.SYMTYPE, link="libggml-base.so"),
        Entry("usr/share/doc/README", b"outside the subtree: not installed"),
    ]


@dataclass
class Image:
    """An image manifest (or index) and every blob it needs."""

    manifest: bytes
    media_type: str
    blobs: list[bytes] = field(default_factory=list)
    children: list[Image] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)


def image(layers: list[bytes], *, media_types: list[str] | None = None) -> Image:
    config = json.dumps(
        {
            "architecture": ARCH,
            "os": SYSTEM,
            "rootfs": {"type": "layers", "diff_ids": [digest_of(b) for b in layers]},
        }
    ).encode()
    types = media_types or [LAYER_GZIP] * len(layers)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
            "layers": [
                {"mediaType": t, "digest": digest_of(b), "size": len(b)}
                for t, b in zip(types, layers, strict=True)
            ],
        }
    ).encode()
    return Image(manifest, OCI_MANIFEST, [config, *layers])


def index(platforms: dict[tuple[str, str], Image]) -> Image:
    manifests = [
        {
            "mediaType": child.media_type,
            "digest": child.digest,
            "size": len(child.manifest),
            "platform": {"os": os_name, "architecture": arch},
        }
        for (os_name, arch), child in platforms.items()
    ]
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
    return Image(body.encode(), OCI_INDEX, children=list(platforms.values()))


def push(registry: RunningRegistry, tag: str, img: Image, repo: str = REPO) -> None:
    """Hand-written distribution API pusher (monolithic uploads), independent of dmr's."""
    with httpx.Client(base_url=registry.url, timeout=60) as client:

        def put(item: Image, reference: str) -> None:
            for child in item.children:
                put(child, child.digest)
            for blob in item.blobs:
                push_blob(client, repo, blob)
            put_manifest(client, repo, reference, item.manifest, item.media_type)

        put(img, tag)


@pytest.fixture
def runners(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "runners"
    monkeypatch.setenv("DMR_RUNNER_DIR", str(root))
    return root


@pytest.fixture
def runner_repo(registry: RunningRegistry, monkeypatch: pytest.MonkeyPatch) -> RunningRegistry:
    monkeypatch.setenv("DMR_RUNNER_IMAGE", f"{registry.host}/{REPO}")
    return registry


def leftovers(runners: Path) -> list[str]:
    """Staging directories and downloads an install should never leave behind."""
    if not runners.exists():
        return []
    return sorted(p.name for p in runners.iterdir() if p.name.startswith(".staging"))


def files_under(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): ("link" if p.is_symlink() else "dir" if p.is_dir() else "file")
        for p in sorted(root.rglob("*"))
    }


# -- the image path -----------------------------------------------------------------------


def test_install_from_image(runner_repo: RunningRegistry, runners: Path) -> None:
    img = image([layer(runner_files())])
    push(runner_repo, "b1234-cpu", img)
    events: list[dict[str, Any]] = []
    record = install_from_image("cpu", "b1234", events.append)

    cpu = runners / "cpu"
    assert files_under(cpu) == {
        ".llamacpp_version": "file",
        "bin": "dir",
        "bin/llama-server": "file",
        "lib": "dir",
        "lib/libggml-base.so": "file",
        "lib/libggml.so.1": "link",
    }
    binary = cpu / "bin" / "llama-server"
    assert binary.read_bytes() == FAKE_SERVER
    assert stat.S_IMODE(binary.stat().st_mode) == 0o755
    assert stat.S_IMODE((cpu / "lib" / "libggml-base.so").stat().st_mode) == 0o644
    assert os.readlink(cpu / "lib" / "libggml.so.1") == "libggml-base.so"
    saved = json.loads((cpu / ".llamacpp_version").read_text())
    assert saved == {k: v for k, v in record.items() if k != "changed"}
    assert record["changed"] is True
    assert saved["tag"] == "b1234-cpu" and saved["digest"] == img.digest
    assert (saved["variant"], saved["version"], saved["commit"]) == ("cpu", "b1234", "abcdef0")
    assert saved["source"] == "image" and saved["image"] == f"{runner_repo.host}/{REPO}"
    assert saved["installed_at"].endswith("Z")
    # Download progress in the pull event shape, ending at the layer's full size.
    layer_desc = json.loads(img.manifest)["layers"][0]
    last = events[-1]
    assert last["type"] == "progress" and last["mode"] == "pull"
    assert last["layer"] == {
        "id": layer_desc["digest"],
        "size": layer_desc["size"],
        "current": layer_desc["size"],
    }
    assert leftovers(runners) == [] and list((runners / ".downloads").iterdir()) == []
    found = install.discover(Detection("cpu", "cpu", [], {}, "test"))
    assert (found.path, found.version, found.lib_dir) == (binary, "b1234", cpu / "lib")


def test_pinned_tag_already_installed_skips_the_registry(
    runner_repo: RunningRegistry, runners: Path
) -> None:
    push(runner_repo, "b1234-cpu", image([layer(runner_files())]))
    first = install_from_image("cpu", "b1234", lambda _: None)
    runner_repo.stop()  # any registry request would now fail
    again = install_from_image("cpu", "b1234", lambda _: None)
    assert again["changed"] is False
    assert again["installed_at"] == first["installed_at"]
    with pytest.raises(RegistryError) as caught:
        install_from_image("cpu", "b5678", lambda _: None)  # a different tag asks the registry
    assert "--from-source" in (caught.value.hint or "")
    assert (runners / "cpu" / "bin" / "llama-server").exists()


def test_latest_is_checked_by_digest(runner_repo: RunningRegistry, runners: Path) -> None:
    push(runner_repo, "latest-cpu", image([layer(runner_files())]))
    assert install_from_image("cpu", "latest", lambda _: None)["changed"] is True
    assert install_from_image("cpu", "latest", lambda _: None)["changed"] is False
    newer = FAKE_SERVER.replace(b"1234", b"1300")
    push(runner_repo, "latest-cpu", image([layer(runner_files(server=newer))]))
    updated = install_from_image("cpu", "latest", lambda _: None)
    assert (updated["changed"], updated["version"]) == (True, "b1300")
    assert (runners / "cpu" / "bin" / "llama-server").read_bytes() == newer


def test_index_picks_this_platform(runner_repo: RunningRegistry, runners: Path) -> None:
    other_arch = "arm64" if ARCH == "amd64" else "amd64"
    other_prefix = f"com.docker.llama-server.native.{SYSTEM}.cpu.{other_arch}"
    attestation = image([layer([Entry("provenance.json", b"{}")])])
    idx = index(
        {
            (SYSTEM, other_arch): image(
                [layer(runner_files(other_prefix, b"#!/bin/sh\nexit 9\n"))]
            ),
            (SYSTEM, ARCH): image([layer(runner_files())]),
            ("unknown", "unknown"): attestation,
        }
    )
    push(runner_repo, "b1234-cpu", idx)
    record = install_from_image("cpu", "b1234", lambda _: None)
    assert record["digest"] == idx.digest  # the tag's digest: what `latest` compares
    assert (runners / "cpu" / "bin" / "llama-server").read_bytes() == FAKE_SERVER


def test_index_without_this_platform(runner_repo: RunningRegistry, runners: Path) -> None:
    push(runner_repo, "b1234-cpu", index({("plan9", "mips"): image([layer(runner_files())])}))
    with pytest.raises(NotFound, match=f"no {SYSTEM}/{ARCH} build.*plan9/mips"):
        install_from_image("cpu", "b1234", lambda _: None)
    assert not (runners / "cpu").exists()


def test_layers_apply_in_order_with_whiteouts(runner_repo: RunningRegistry, runners: Path) -> None:
    base = layer(
        [
            *runner_files(server=b"#!/bin/sh\nexit 1\n"),
            Entry(f"{PREFIX}/lib/libold.so", b"old"),
            Entry(f"{PREFIX}/lib/plugins/a.so", b"a"),
        ]
    )
    update = layer(
        [
            Entry(f"{PREFIX}/bin/llama-server", FAKE_SERVER, mode=0o755),
            Entry(f"{PREFIX}/lib/.wh.libold.so"),
            Entry(f"{PREFIX}/lib/plugins/.wh..wh..opq"),
            Entry(f"{PREFIX}/lib/plugins/b.so", b"b"),
        ],
        compress=False,  # uncompressed layers are valid OCI too
    )
    push(runner_repo, "b1234-cpu", image([base, update], media_types=[LAYER_GZIP, LAYER_TAR]))
    install_from_image("cpu", "b1234", lambda _: None)
    cpu = runners / "cpu"
    assert (cpu / "bin" / "llama-server").read_bytes() == FAKE_SERVER
    assert not (cpu / "lib" / "libold.so").exists()
    assert sorted(p.name for p in (cpu / "lib" / "plugins").iterdir()) == ["b.so"]


def test_image_without_the_runner_subtree(runner_repo: RunningRegistry, runners: Path) -> None:
    wrong = "com.docker.llama-server.native.darwin.metal.arm64"
    push(runner_repo, "b1234-cpu", image([layer(runner_files(wrong))]))
    with pytest.raises(NotFound, match=f"has no {PREFIX}/bin/llama-server"):
        install_from_image("cpu", "b1234", lambda _: None)
    assert not (runners / "cpu").exists() and leftovers(runners) == []


@pytest.mark.parametrize(
    "evil",
    [
        Entry(f"{PREFIX}/bin/../../../../escaped", b"x"),
        Entry("/etc/escaped", b"x"),
        Entry(f"{PREFIX}/bin/escape", kind=tarfile.SYMTYPE, link="../../../../.."),
        Entry(f"{PREFIX}/bin/escape", kind=tarfile.SYMTYPE, link="/etc/passwd"),
        Entry(f"{PREFIX}/lib/hard", kind=tarfile.LNKTYPE, link="etc/passwd"),
        Entry(f"{PREFIX}/lib/fifo", kind=tarfile.FIFOTYPE),
    ],
    ids=["dotdot", "absolute", "symlink-up", "symlink-absolute", "hardlink-out", "fifo"],
)
def test_malicious_layer_is_refused_and_nothing_changes(
    runner_repo: RunningRegistry, runners: Path, tmp_path: Path, evil: Entry
) -> None:
    push(runner_repo, "b1234-cpu", image([layer(runner_files())]))
    install_from_image("cpu", "b1234", lambda _: None)
    before = files_under(runners / "cpu")
    push(runner_repo, "b6666-cpu", image([layer([*runner_files(), evil])]))
    with pytest.raises(UnsafeLayer, match="runner image refused"):
        install_from_image("cpu", "b6666", lambda _: None)
    assert files_under(runners / "cpu") == before  # the installed variant is untouched
    assert json.loads((runners / "cpu" / ".llamacpp_version").read_text())["tag"] == "b1234-cpu"
    assert leftovers(runners) == []
    assert list(tmp_path.rglob("escaped")) == [] and not (tmp_path.parent / "escaped").exists()


def test_malicious_layer_on_a_fresh_machine_installs_nothing(
    runner_repo: RunningRegistry, runners: Path
) -> None:
    evil = Entry(f"{PREFIX}/lib/escape", kind=tarfile.SYMTYPE, link="../../../outside")
    push(runner_repo, "b1234-cpu", image([layer([*runner_files(), evil])]))
    with pytest.raises(UnsafeLayer):
        install_from_image("cpu", "b1234", lambda _: None)
    assert not (runners / "cpu").exists() and leftovers(runners) == []
    assert install.installed_variants() == {}


def test_unreachable_registry_fails_with_the_from_source_hint(
    runners: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DMR_RUNNER_IMAGE", f"127.0.0.1:{free_port()}/{REPO}")
    with pytest.raises(RegistryError) as caught:
        install_from_image("cpu", "b1234", lambda _: None)
    assert "cannot download the runner image" in caught.value.message
    assert "dmr install-runner --from-source" in (caught.value.hint or "")
    assert not (runners / "cpu").exists()


def test_missing_tag_says_not_found(runner_repo: RunningRegistry, runners: Path) -> None:
    with pytest.raises(NotFound, match="b0000-cuda not found") as caught:
        install_from_image("cuda", "b0000", lambda _: None)
    assert "--llama-server-version" in (caught.value.hint or "")


# -- extraction details without a registry ------------------------------------------------


def write_layer(path: Path, entries: list[Entry]) -> Path:
    path.write_bytes(layer(entries))
    return path


def test_symlink_chain_that_escapes_is_refused(tmp_path: Path) -> None:
    """`b -> a/..` looks harmless until `a -> .` exists: real paths are checked, not text."""
    dest = tmp_path / "runner" / "tree"
    dest.mkdir(parents=True)
    chain = [
        Entry(f"{PREFIX}/bin/b", kind=tarfile.SYMTYPE, link="a/../.."),
        Entry(f"{PREFIX}/bin/a", kind=tarfile.SYMTYPE, link="."),
        Entry(f"{PREFIX}/bin/b/escaped", b"x"),
    ]
    with pytest.raises(UnsafeLayer):
        extract_layer(write_layer(tmp_path / "l.tar.gz", chain), PREFIX, dest)
    assert not (tmp_path / "runner" / "escaped").exists()
    assert not (tmp_path / "escaped").exists()


def test_write_through_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "tree"
    dest.mkdir()
    (dest / "lib").symlink_to(outside)  # as if left by an earlier, unchecked step
    with pytest.raises(UnsafeLayer, match="through a link"):
        extract_layer(
            write_layer(tmp_path / "l.tar.gz", [Entry(f"{PREFIX}/lib/sub/x.so", b"x")]),
            PREFIX,
            dest,
        )
    assert list(outside.iterdir()) == []


def test_hard_link_inside_the_subtree_is_copied(tmp_path: Path) -> None:
    dest = tmp_path / "tree"
    dest.mkdir()
    entries = [
        *runner_files(),
        Entry(
            f"{PREFIX}/bin/com.docker.llama-server",
            kind=tarfile.LNKTYPE,
            link=f"{PREFIX}/bin/llama-server",
        ),
    ]
    assert extract_layer(write_layer(tmp_path / "l.tar.gz", entries), PREFIX, dest) == 6
    copy = dest / "bin" / "com.docker.llama-server"
    assert copy.read_bytes() == FAKE_SERVER and os.access(copy, os.X_OK)
    assert not copy.samefile(dest / "bin" / "llama-server")


def test_not_a_tar_layer(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x28\xb5\x2f\xfd zstd? no")
    with pytest.raises(UnsupportedMediaType, match=r"not a \(gzip\) tar archive"):
        extract_layer(junk, PREFIX, tmp_path)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(layer(runner_files())[:200])
    (tmp_path / "t").mkdir()
    with pytest.raises(UnsupportedMediaType, match="corrupt"):
        extract_layer(truncated, PREFIX, tmp_path / "t")


# -- through the CLI ----------------------------------------------------------------------


def dmr(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dmr_cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_install_and_uninstall(registry: RunningRegistry, tmp_path: Path) -> None:
    push(registry, "b1234-cpu", image([layer(runner_files())]))
    home = tmp_path / "home"
    runners = tmp_path / "runners"
    env = isolated_env(
        home, DMR_RUNNER_DIR=str(runners), DMR_RUNNER_IMAGE=f"{registry.host}/{REPO}", DMR_GPU="cpu"
    )
    done = dmr(env, "install-runner", "--llama-server-version", "b1234")
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip()
        == f"Installed llama.cpp runner cpu b1234 (b1234-cpu) in {runners / 'cpu'}"
    )
    assert "Accelerator: cpu" in done.stderr  # --gpu auto says what it detected
    assert "Downloaded" in done.stderr  # plain progress lines without a terminal
    again = dmr(env, "install-runner", "--gpu", "cpu", "--llama-server-version", "b1234")
    assert "is already installed" in again.stdout
    bad = dmr(env, "install-runner", "--gpu", "tpu")
    assert bad.returncode == 2 and "--gpu" in bad.stderr
    offline = dmr(
        {**env, "DMR_RUNNER_IMAGE": f"127.0.0.1:{free_port()}/{REPO}"},
        "install-runner",
        "--gpu",
        "cpu",
        "--llama-server-version",
        "b9999",
    )
    assert offline.returncode == 1
    assert "--from-source" in offline.stderr
    removed = dmr(env, "uninstall-runner")
    assert removed.stdout.strip() == f"Removed llama.cpp runner cpu from {runners / 'cpu'}"
    assert not (runners / "cpu").exists()
    assert dmr(env, "uninstall-runner").stdout.strip() == "No llama.cpp runner is installed"
    missing = dmr(env, "uninstall-runner", "--gpu", "cuda")
    assert missing.returncode == 4 and "cuda is not installed" in missing.stderr


# -- from source (slow: a cold build takes ~10 minutes on 2 cores) -------------------------


@pytest.fixture(scope="session")
def build_cache() -> Iterator[Path]:
    """Kept across test runs on this machine, so only the first run builds from scratch."""
    value = os.environ.get("DMR_TEST_BUILD_CACHE")
    path = Path(value) if value else Path.home() / ".cache" / "dmr-test" / "build-cache"
    path.mkdir(parents=True, exist_ok=True)
    yield path


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_cli_install_from_source(build_cache: Path, tmp_path: Path) -> None:
    runners = tmp_path / "runners"
    env = isolated_env(
        tmp_path / "home", DMR_RUNNER_DIR=str(runners), DMR_BUILD_CACHE=str(build_cache)
    )
    done = dmr(env, "install-runner", "--from-source", "--gpu", "cpu", timeout=3000)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert done.stdout.startswith("Installed llama.cpp runner cpu ")
    assert done.stdout.rstrip().endswith(f"(source-0.3.36) in {runners / 'cpu'}")
    binary = runners / "cpu" / "bin" / "llama-server"
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "version:" in version.stdout + version.stderr
    record = json.loads((runners / "cpu" / ".llamacpp_version").read_text())
    assert (record["source"], record["variant"], record["tag"]) == (
        "source",
        "cpu",
        "source-0.3.36",
    )
    assert record["digest"] is None and record["version"] not in ("", "unknown")
    assert record["version"] in version.stdout + version.stderr
    assert "Building llama-server: 100%" in done.stderr  # plain progress without a terminal
    assert "-DGGML_NATIVE=ON" in record["cmake_options"]
    assert (build_cache / "llama_cpp_python-0.3.36.tar.gz").is_file()
    assert list(build_cache.glob("build-0.3.36-cpu/bin/llama-server"))


# -- the source build's plumbing, on tiny CMake projects ----------------------------------


def cmake_project(root: Path, target_commands: str) -> Path:
    """A CMake project (no compiler needed) whose `llama-server` target runs the commands."""
    root.mkdir(parents=True)
    (root / "fake-server").write_bytes(FAKE_SERVER)
    (root / "fake-server").chmod(0o755)
    (root / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.16)\n"
        "project(fake NONE)\n"
        f"add_custom_target(llama-server {target_commands})\n"
    )
    return root


def test_build_runs_cmake_and_reuses_the_configuration(tmp_path: Path) -> None:
    source = cmake_project(
        tmp_path / "src",
        "COMMAND ${CMAKE_COMMAND} -E make_directory ${CMAKE_BINARY_DIR}/bin "
        "COMMAND ${CMAKE_COMMAND} -E copy ${CMAKE_SOURCE_DIR}/fake-server "
        "${CMAKE_BINARY_DIR}/bin/llama-server",
    )
    events: list[dict[str, Any]] = []
    binary = build.build_llama_server(source, tmp_path / "build", "cpu", 1, events.append)
    assert binary == tmp_path / "build" / "bin" / "llama-server"
    assert binary.read_bytes() == FAKE_SERVER
    assert [e["stage"] for e in events][:2] == ["configure", "build"]
    assert all(e["type"] == "build" for e in events)
    assert "-DGGML_NATIVE=ON" in (tmp_path / "build" / "build.log").read_text()
    events.clear()
    build.build_llama_server(source, tmp_path / "build", "cpu", 1, events.append)
    assert "configure" not in [e["stage"] for e in events]  # same options: not configured again
    events.clear()
    build.build_llama_server(source, tmp_path / "build", "vulkan", 1, events.append)
    assert events[0]["stage"] == "configure"  # options changed
    assert "-DGGML_VULKAN=ON" in (tmp_path / "build" / "build.log").read_text()


def test_configure_failure_reports_the_log(tmp_path: Path) -> None:
    source = cmake_project(tmp_path / "src", "")
    with (source / "CMakeLists.txt").open("a") as f:
        f.write('message(FATAL_ERROR "no such toolkit (from the test)")\n')
    with pytest.raises(DmrError) as caught:
        build.build_llama_server(source, tmp_path / "build", "cuda", 1, lambda _: None)
    assert caught.value.message.startswith("configuring llama.cpp failed (exit 1):")
    assert "no such toolkit (from the test)" in caught.value.message
    hint = caught.value.hint or ""
    assert str(tmp_path / "build" / "build.log") in hint and "CUDA toolkit" in hint


def test_build_failure_reports_the_tail_of_the_log(tmp_path: Path) -> None:
    source = cmake_project(
        tmp_path / "src", "COMMAND ${CMAKE_COMMAND} -E echo compiler-said-no COMMAND false"
    )
    with pytest.raises(DmrError) as caught:
        build.build_llama_server(source, tmp_path / "build", "cpu", 1, lambda _: None)
    assert caught.value.message.startswith("building llama-server failed")
    assert "compiler-said-no" in caught.value.message


def test_missing_tools_name_the_packages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(DmrError) as caught:
        build.check_tools()
    assert caught.value.message.startswith("building llama-server from source needs cmake")
    assert "C++ compiler" in caught.value.message
    assert "apt-get install cmake build-essential" in (caught.value.hint or "")


def test_local_sdist_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DMR_LLAMA_SDIST", str(tmp_path / "nope.tar.gz"))
    with pytest.raises(DmrError, match=r"DMR_LLAMA_SDIST=.* is not a file"):
        build.fetch_sdist(tmp_path, lambda _: None)
    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    sdist.write_bytes(layer([Entry("llama_cpp_python-9.9.9/vendor/llama.cpp/CMakeLists.txt")]))
    monkeypatch.setenv("DMR_LLAMA_SDIST", str(sdist))
    assert build.fetch_sdist(tmp_path / "cache", lambda _: None) == sdist
    tree = build.extract_sdist(sdist, tmp_path / "cache", lambda _: None)
    assert tree == tmp_path / "cache" / "src" / "llama_cpp_python-9.9.9"
    assert (tree / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file()


@pytest.mark.parametrize(
    ("line", "percent"),
    [
        ("[ 45%] Building CXX object ggml/src/ggml.c.o", 45),
        ("[100%] Built target llama-server", 100),
        ("[12/48] Building CXX object common/arg.cpp.o", 25),
        ("-- Configuring done", None),
    ],
)
def test_build_percent(line: str, percent: int | None) -> None:
    assert build.build_percent(line) == percent
