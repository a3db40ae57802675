"""llama.cpp runners: discovery, and installation from DMR's backend images (spec §7.6, §8).

An installed variant is `config.runner_dir()/<variant>/` holding `bin/llama-server`, `lib/`
(shared libraries, ggml backends) and `.llamacpp_version` (what was installed, from where).
Installs are staged in a private directory beside it and swapped in by rename, so a reader
(the daemon starting a runner) sees the old variant or the new one, never half of either; a
llama-server already running keeps the files it opened.

The image path pulls `docker/docker-model-backend-llamacpp:<version>-<variant>` (repository
overridable with `DMR_RUNNER_IMAGE`) with our registry client and applies its layers in
order, keeping only `com.docker.llama-server.native.<os>.<variant>.<arch>/{bin,lib}`. Layers
come from the network: every member is checked before it touches the disk, and the image is
refused outright (nothing installed) at the first absolute path, `..`, or link that leads
outside the runner directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import posixpath
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from dmr_cli import config
from dmr_cli.errors import (
    BadRequest,
    DmrError,
    NotFound,
    RegistryError,
    Unauthorized,
    UnsupportedMediaType,
)

if TYPE_CHECKING:
    from dmr_cli.distribution.registry import RegistryClient
    from dmr_cli.reference import Reference
    from dmr_cli.runtime.detect import Detection

DEFAULT_LLAMA_SERVER_VERSION = "b9879"
LLAMA_CPP_PYTHON_SDIST_VERSION = "0.3.36"
RUNNER_IMAGE = "docker/docker-model-backend-llamacpp"
VARIANTS = ("cpu", "cuda", "vulkan", "metal", "opencl", "rocm")
VERSION_FILE = ".llamacpp_version"
# DMR looks for llama-server first, then the name its own builds use.
BINARY_NAMES = ("llama-server", "com.docker.llama-server")
INSTALL_HINT = (
    "install a runner with 'dmr install-runner' (or 'dmr install-runner --from-source' "
    "without network access to Docker Hub), point LLAMA_SERVER_PATH at a llama-server "
    "binary, or install llama-cpp-python[server] for the embedded engine"
)
_FROM_SOURCE_HINT = (
    "build the runner here instead: dmr install-runner --from-source (needs cmake and a "
    "C++ compiler), or set LLAMA_SERVER_PATH to a llama-server binary"
)

Progress = Callable[[dict[str, Any]], None]

_VERSION_RE = re.compile(
    r"version:\s*(?P<version>\S+)"
    r"(?:\s*\((?:build\s+(?P<build>\d+),\s*commit\s+)?(?P<commit>[0-9a-fA-F]{4,40}|unknown)\))?"
)
_MANIFEST_RETRIES = 1  # an unreachable registry must fail fast, with a hint
_DOWNLOAD_RETRIES = 4
_VERSION_TIMEOUT = 10.0
_OPAQUE_WHITEOUT = ".wh..wh..opq"
_WHITEOUT = ".wh."


@dataclass(frozen=True)
class RunnerBinary:
    """The llama.cpp runner the scheduler will start."""

    kind: str  # "native" | "embedded"
    path: Path | None  # llama-server (None for the embedded engine)
    variant: str  # cpu | cuda | vulkan | metal | opencl | rocm | "embedded" | "unknown"
    version: str  # "b9879", "0.3.36", "unknown"
    commit: str | None
    source: str  # "LLAMA_SERVER_PATH" | "installed" | "PATH" | "embedded"
    lib_dir: Path | None  # for LD_LIBRARY_PATH / DYLD_LIBRARY_PATH

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "variant": self.variant,
            "version": self.version,
            "commit": self.commit,
            "path": str(self.path) if self.path else None,
            "source": self.source,
        }


# -- platform -----------------------------------------------------------------------------


def host_platform() -> tuple[str, str]:
    """`(os, arch)` in OCI terms: linux|darwin|windows, amd64|arm64."""
    system = {"win32": "windows", "cygwin": "windows"}.get(sys.platform, sys.platform)
    system = "linux" if system.startswith("linux") else system
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "x64": "amd64", "aarch64": "arm64", "armv8": "arm64"}.get(
        machine, machine
    )
    return system, arch


def exe(name: str) -> str:
    return f"{name}.exe" if sys.platform == "win32" else name


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise BadRequest(
            f"unknown llama.cpp variant {variant!r}: expected one of {', '.join(VARIANTS)}"
        )
    return variant


def variant_dir(variant: str) -> Path:
    return config.runner_dir() / check_variant(variant)


# -- versions -----------------------------------------------------------------------------


def parse_version(text: str) -> tuple[str, str | None]:
    """`llama-server --version` → (version, commit).

    `version: 1234 (abcdef0)` gives ("b1234", "abcdef0"); newer builds print
    `version: 0.5.0-dev (build 1, commit 0c1e570)`: the build number is the release tag
    when the sources were a full clone, and 1 for the shallow one in the sdist."""
    match = _VERSION_RE.search(text)
    if match is None:
        return "unknown", None
    version, build, commit = match.group("version", "build", "commit")
    if version.isdigit():
        version = f"b{version}"
    elif build and int(build) > 1:
        version = f"b{build}"
    return version, None if commit in (None, "unknown") else commit


_probed: dict[tuple[str, int, int], tuple[str, str | None] | None] = {}


def probe_version(binary: Path, lib_dir: Path | None = None) -> tuple[str, str | None] | None:
    """`binary --version`, once per build of the binary (discovery runs at every load)."""
    try:
        st = binary.stat()
    except OSError:
        return None
    key = (str(binary), st.st_size, st.st_mtime_ns)
    if key not in _probed:
        _probed[key] = _run_version(binary, lib_dir)
    return _probed[key]


def _run_version(binary: Path, lib_dir: Path | None) -> tuple[str, str | None] | None:
    """Run `binary --version`; None when it does not run here."""
    env = dict(os.environ)
    if lib_dir is not None:
        for name in ("LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH"):
            env[name] = os.pathsep.join(p for p in (str(lib_dir), env.get(name)) if p)
    try:
        result = subprocess.run(
            [str(binary), "--version"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_VERSION_TIMEOUT,
            env=env,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    version, commit = parse_version(result.stdout + result.stderr)
    return None if version == "unknown" else (version, commit)


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- discovery ----------------------------------------------------------------------------


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _read_record(directory: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((directory / VERSION_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def installed_variants() -> dict[str, dict[str, Any]]:
    """Variant → its `.llamacpp_version` content, for every variant whose binary is there."""
    found: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        directory = config.runner_dir() / variant
        if _is_executable(directory / "bin" / exe("llama-server")):
            found[variant] = _read_record(directory) or {"variant": variant, "version": "unknown"}
    return found


def _lib_dir_beside(binary: Path) -> Path | None:
    """`../lib` when the binary sits in a `bin/` with one beside it, else the binary's own
    directory when it holds shared libraries (the layout of llama.cpp's release archives)."""
    sibling = binary.parent.parent / "lib"
    if binary.parent.name == "bin" and sibling.is_dir():
        return sibling
    suffixes = (".so", ".dylib", ".dll")
    with contextlib.suppress(OSError):
        if any(p.name.endswith(suffixes) or ".so." in p.name for p in binary.parent.iterdir()):
            return binary.parent
    return None


def _binary_runner(binary: Path, source: str) -> RunnerBinary:
    lib_dir = _lib_dir_beside(binary)
    installed = binary.parent.parent
    record = _read_record(installed) if binary.parent.name == "bin" else None
    if record is not None:
        version, commit = str(record.get("version", "unknown")), record.get("commit")
        variant = str(record.get("variant", "unknown"))
    else:
        version, commit = probe_version(binary, lib_dir) or ("unknown", None)
        variant = "unknown"
    return RunnerBinary("native", binary, variant, version, commit, source, lib_dir)


def _from_llama_server_path(value: str) -> RunnerBinary:
    path = Path(value).expanduser()
    candidates = [path / exe(name) for name in BINARY_NAMES] if path.is_dir() else [path]
    for candidate in candidates:
        if _is_executable(candidate):
            return _binary_runner(candidate, "LLAMA_SERVER_PATH")
    # A setting the user made on purpose: falling back silently would hide the mistake.
    raise DmrError(
        f"LLAMA_SERVER_PATH={value} is not a llama-server binary, nor a directory "
        f"holding {' or '.join(exe(n) for n in BINARY_NAMES)}",
        hint="fix or unset LLAMA_SERVER_PATH",
    )


def embedded_runner() -> RunnerBinary | None:
    """llama-cpp-python when importable; found without importing it (that takes seconds)."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return RunnerBinary("embedded", None, "embedded", version, None, "embedded", None)


def discover(detection: Detection) -> RunnerBinary:
    """The runner to use: LLAMA_SERVER_PATH, the installed variant for the detected
    accelerator, the installed cpu variant, llama-server on PATH, the embedded engine."""
    explicit = config.env("LLAMA_SERVER_PATH")
    if explicit:
        return _from_llama_server_path(explicit)
    installed = installed_variants()
    for variant in dict.fromkeys((detection.variant, "cpu")):
        if variant in installed:
            binary = config.runner_dir() / variant / "bin" / exe("llama-server")
            record = installed[variant]
            lib_dir = binary.parent.parent / "lib"
            return RunnerBinary(
                "native",
                binary,
                variant,
                str(record.get("version", "unknown")),
                record.get("commit"),
                "installed",
                lib_dir if lib_dir.is_dir() else None,
            )
    on_path = shutil.which("llama-server")
    if on_path:
        return _binary_runner(Path(on_path), "PATH")
    embedded = embedded_runner()
    if embedded is not None:
        return embedded
    raise DmrError("no llama.cpp runner is installed", hint=INSTALL_HINT)


# -- staging and the atomic swap ----------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    import psutil

    return bool(psutil.pid_exists(pid))


def _clean_stale_staging(root: Path) -> None:
    """Remove what installs killed mid-way left behind (their pid is in the name)."""
    with contextlib.suppress(OSError):
        for entry in root.glob(".staging-*"):
            parts = entry.name.split("-")
            if len(parts) >= 4 and parts[-2].isdigit() and not _pid_alive(int(parts[-2])):
                shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def staging(variant: str) -> Iterator[Path]:
    """A private directory beside the variant (same filesystem, so it can be renamed in)."""
    root = config.runner_dir()
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale_staging(root)
    path = root / f".staging-{variant}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit_variant(tree: Path, variant: str, record: dict[str, Any]) -> dict[str, Any]:
    """Write `record` into `tree` and put `tree` in place of `runner_dir()/<variant>`.

    `tree` must be inside a `staging()` directory: the old variant is moved there and goes
    with it. Between the two renames the variant is briefly absent, never partial."""
    (tree / VERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    final = variant_dir(variant)
    if final.exists() or final.is_symlink():
        os.replace(final, tree.parent / f"replaced-{variant}")
    os.replace(tree, final)
    _fsync_dir(final.parent)
    return record


def uninstall(variant: str | None) -> list[str]:
    """Remove one variant (NotFound when absent) or, with None, every installed one."""
    root = config.runner_dir()
    if variant is not None:
        targets = [check_variant(variant)]
        if not (root / variant).exists():
            raise NotFound(f"the llama.cpp runner variant {variant} is not installed")
    else:
        targets = [v for v in VARIANTS if (root / v).exists() or (root / v).is_symlink()]
    removed: list[str] = []
    for name in targets:
        with staging(name) as trash:
            os.replace(root / name, trash / name)  # gone at once, deleted at leisure
        removed.append(name)
    if variant is None:
        shutil.rmtree(root / ".downloads", ignore_errors=True)
    return removed


# -- safe layer extraction ----------------------------------------------------------------


class UnsafeLayer(DmrError):
    """A runner image layer with a member that could write outside the runner directory."""


def _member_path(name: str) -> PurePosixPath | None:
    """The member's relative path; None for the archive root; UnsafeLayer if it escapes."""
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UnsafeLayer(f"runner image refused: layer member {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayer(f"runner image refused: layer member {name!r} contains '..'")
    return PurePosixPath(*parts) if parts else None


def _inside(root: Path, path: Path) -> bool:
    root_real, real = os.path.realpath(root), os.path.realpath(path)
    return real == root_real or real.startswith(root_real + os.sep)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _copy_member(source: IO[bytes], target: Path, executable: bool) -> None:
    with open(target, "xb") as out:
        shutil.copyfileobj(source, out, 1024 * 1024)
    os.chmod(target, 0o755 if executable else 0o644)


def _open_layer(layer: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(layer, "r:*")  # gzip or plain tar, told apart by the bytes
    except (tarfile.TarError, OSError) as exc:
        raise UnsupportedMediaType(
            f"runner image layer is not a (gzip) tar archive: {exc}"
        ) from exc


def extract_layer(layer: Path, prefix: str, dest: Path) -> int:
    """Apply one layer's `<prefix>/bin` and `<prefix>/lib` onto `dest`; returns the number of
    entries written. Whiteouts (`.wh.<name>`, `.wh..wh..opq`) delete what earlier layers put."""
    written = 0
    with _open_layer(layer) as archive:
        try:
            for member in archive:
                rel = _member_path(member.name)
                if rel is None or rel.parts[0] != prefix:
                    continue
                sub = rel.relative_to(prefix)
                if sub.parts and sub.parts[0] in ("bin", "lib"):
                    _apply(archive, member, sub, prefix, dest)
                    written += 1
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise UnsupportedMediaType(f"runner image layer is corrupt: {exc}") from exc
    return written


def _parent_dir(dest: Path, sub: PurePosixPath, name: str) -> Path:
    """Create the member's parent directories one by one, never through a link that leads
    out of `dest` (checked before each step, so nothing is created outside either)."""
    current = dest
    for part in sub.parent.parts:
        current = current / part
        if current.is_symlink() and not _inside(dest, current):
            raise UnsafeLayer(
                f"runner image refused: {name!r} would be written through a link that leads "
                "outside the runner directory"
            )
        if not current.exists():
            current.mkdir()
    return current


def _apply(
    archive: tarfile.TarFile, member: tarfile.TarInfo, sub: PurePosixPath, prefix: str, dest: Path
) -> None:
    if "\\" in member.name:
        raise UnsafeLayer(f"runner image refused: layer member {member.name!r}")
    parent = _parent_dir(dest, sub, member.name)
    target = parent / sub.name
    if sub.name == _OPAQUE_WHITEOUT:
        for child in parent.iterdir():
            _remove(child)
        return
    if sub.name.startswith(_WHITEOUT):
        _remove(parent / sub.name[len(_WHITEOUT) :])
        return
    if not (member.isdir() and target.is_dir() and not target.is_symlink()):
        _remove(target)
    if member.isdir():
        target.mkdir(exist_ok=True)
        os.chmod(target, 0o755)
    elif member.isfile():
        source = archive.extractfile(member)
        assert source is not None  # regular files always have data
        _copy_member(source, target, bool(member.mode & 0o111))
    elif member.issym():
        _link(member.linkname, member.name, sub, dest, target)
    elif member.islnk():
        origin = _member_path(member.linkname)
        source_path = dest.joinpath(*origin.parts[1:]) if origin else dest
        if (
            origin is None
            or origin.parts[0] != prefix
            or origin.parts[1:2] not in (("bin",), ("lib",))
            or source_path.is_symlink()
            or not source_path.is_file()
        ):
            raise UnsafeLayer(
                f"runner image refused: hard link {member.name!r} points to "
                f"{member.linkname!r}, not a file of {prefix}/bin or /lib extracted before it"
            )
        with open(source_path, "rb") as source_file:
            _copy_member(source_file, target, os.access(source_path, os.X_OK))
    else:
        raise UnsafeLayer(
            f"runner image refused: {member.name!r} is a device, fifo or other special file"
        )


def _link(linkname: str, name: str, sub: PurePosixPath, dest: Path, target: Path) -> None:
    if linkname.startswith("/") or not linkname:
        raise UnsafeLayer(f"runner image refused: symlink {name!r} points to {linkname!r}")
    resolved = posixpath.normpath(posixpath.join(str(sub.parent), linkname))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeLayer(
            f"runner image refused: symlink {name!r} points to {linkname!r}, "
            "outside the runner directory"
        )
    os.symlink(linkname, target)
    # The lexical check cannot see links through links (a -> ., b -> a/..): the real path can.
    if not _inside(dest, target):
        target.unlink()
        raise UnsafeLayer(
            f"runner image refused: symlink {name!r} points to {linkname!r}, "
            "outside the runner directory"
        )


def check_tree(dest: Path) -> None:
    """After the last layer: every link in the tree still resolves inside it."""
    for directory, dirs, files in os.walk(dest):
        for entry in (*dirs, *files):
            path = Path(directory) / entry
            if path.is_symlink() and not _inside(dest, path):
                raise UnsafeLayer(
                    f"runner image refused: {path.relative_to(dest)} leads outside the "
                    "runner directory"
                )


# -- the image path -----------------------------------------------------------------------


def runner_image(version: str, variant: str) -> str:
    repository = config.env("DMR_RUNNER_IMAGE") or RUNNER_IMAGE
    return f"{repository}:{version}-{variant}"


def _pick_platform(index: dict[str, Any], system: str, arch: str, image: str) -> str:
    offered: list[str] = []
    for entry in index.get("manifests") or []:
        wanted = entry.get("platform") or {}
        os_name, architecture = wanted.get("os", "unknown"), wanted.get("architecture", "unknown")
        if os_name == "unknown":
            continue  # attestation manifests (buildx provenance, SBOM)
        offered.append(f"{os_name}/{architecture}")
        if os_name == system and architecture == arch:
            return str(entry["digest"])
    raise NotFound(
        f"runner image {image} has no {system}/{arch} build"
        + (f" (it has {', '.join(offered)})" if offered else ""),
        hint=_FROM_SOURCE_HINT,
    )


def _resolve_manifest(
    client: RegistryClient, ref: Reference, image: str
) -> tuple[str, dict[str, Any]]:
    """(digest of what the tag names, the image manifest for this machine)."""
    digest, raw, _ = client.get_manifest(ref, accept_index=True)
    manifest: dict[str, Any] = json.loads(raw)
    if "manifests" in manifest:
        system, arch = host_platform()
        chosen = _pick_platform(manifest, system, arch, image)
        _, raw, _ = client.get_manifest(replace(ref, digest=chosen), accept_index=False)
        manifest = json.loads(raw)
    return digest, manifest


def _download_layers(
    client: RegistryClient,
    ref: Reference,
    layers: list[dict[str, Any]],
    directory: Path,
    progress: Progress,
) -> list[Path]:
    """Download layers to `directory` (kept there on failure so that a retry resumes)."""
    from dmr_cli.distribution.pull import LayerProgress
    from dmr_cli.reference import validate_digest

    directory.mkdir(parents=True, exist_ok=True)
    total = sum(int(layer.get("size") or 0) for layer in layers)
    paths: list[Path] = []
    for layer in layers:
        media_type = str(layer.get("mediaType", ""))
        if media_type.endswith("zstd"):
            raise UnsupportedMediaType(f"runner image layer type {media_type} is not supported")
        digest, size = validate_digest(str(layer.get("digest"))), int(layer.get("size") or 0)
        hex_digest = digest.split(":", 1)[1]
        final = directory / hex_digest
        if not final.exists():
            reporter = LayerProgress(
                progress, mode="pull", verb="Downloaded", total=total, digest=digest, size=size
            )
            incomplete = directory / f"{hex_digest}.incomplete"
            client.download_blob(ref, digest, size, incomplete, final, reporter)
        paths.append(final)
    return paths


def _registry_failure(exc: DmrError, image: str) -> DmrError:
    if isinstance(exc, NotFound | Unauthorized):  # Docker Hub answers 401 for unknown repos
        return NotFound(
            f"runner image {image} not found: {exc}",
            hint=f"check --llama-server-version and --gpu, or {_FROM_SOURCE_HINT}",
        )
    return RegistryError(
        f"cannot download the runner image {image}: {exc}",
        hint=f"no access to the registry? {_FROM_SOURCE_HINT}",
    )


def install_from_image(
    variant: str,
    version: str,
    progress: Progress,
    *,
    registry_ref: str | None = None,
) -> dict[str, Any]:
    """Install `variant` from the runner image (`registry_ref` overrides the whole reference).

    Returns the `.llamacpp_version` record, with `"changed": False` when the pinned tag (or,
    for `latest`, the same digest) was already installed."""
    from dmr_cli.distribution.registry import RegistryClient
    from dmr_cli.reference import parse_reference

    check_variant(variant)
    image = registry_ref or runner_image(version, variant)
    ref = parse_reference(image, default_registry="docker.io")
    tag = ref.tag or f"{version}-{variant}"
    current = installed_variants().get(variant) or {}
    same_image = current.get("source") == "image" and current.get("image") == ref.name
    if same_image and current.get("tag") == tag and version != "latest":
        return {**current, "changed": False}  # pinned tags never change: skip the registry

    system, arch = host_platform()
    prefix = f"com.docker.llama-server.native.{system}.{variant}.{arch}"
    client = RegistryClient(
        insecure_registries=config.insecure_registries(), retries=_MANIFEST_RETRIES
    )
    try:
        try:
            digest, manifest = _resolve_manifest(client, ref, image)
        except (RegistryError, NotFound, Unauthorized) as exc:
            raise _registry_failure(exc, image) from exc
        if same_image and current.get("digest") == digest:
            return {**current, "changed": False}
        client.retries = _DOWNLOAD_RETRIES  # reachable: now be patient with the transfer
        downloads = config.runner_dir() / ".downloads"
        layers = _download_layers(client, ref, manifest.get("layers") or [], downloads, progress)
        with staging(variant) as stage:
            tree = stage / "tree"
            tree.mkdir()
            try:
                for layer in layers:
                    extract_layer(layer, prefix, tree)
                check_tree(tree)
            finally:
                for layer in layers:  # downloaded in full: kept only for a retry's resume
                    layer.unlink(missing_ok=True)
            binary = tree / "bin" / exe("llama-server")
            if not _is_executable(binary):
                raise NotFound(
                    f"runner image {image} has no {prefix}/bin/{exe('llama-server')}: "
                    f"it is not a llama.cpp {variant} runner for {system}/{arch}",
                    hint=_FROM_SOURCE_HINT,
                )
            lib = tree / "lib"
            probed = probe_version(binary, lib if lib.is_dir() else None)
            found_version, commit = probed or (version, None)
            record = {
                "tag": tag,
                "digest": digest,
                "variant": variant,
                "version": found_version,
                "commit": commit,
                "source": "image",
                "image": ref.name,
                "installed_at": now_rfc3339(),
            }
            commit_variant(tree, variant, record)
        return {**record, "changed": True}
    finally:
        client.close()
