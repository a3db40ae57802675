"""Build llama-server from llama.cpp's sources (`dmr install-runner --from-source`).

The sources come from the llama-cpp-python sdist, which vendors llama.cpp under
`vendor/llama.cpp` and which pip can fetch from PyPI (or `DMR_LLAMA_SDIST` names a local
copy). The sdist, its extracted tree and one CMake build tree per variant live in a cache
directory (`DMR_BUILD_CACHE`, default `<runner dir>/../build-cache`) that outlives the
install: a second install of the same variant is an incremental build of nothing, seconds
instead of the ten minutes a cold build takes on two cores.

Progress events: `{"type": "build", "stage": "download" | "extract" | "configure" | "build" |
"install", "message": str, "percent": int | None}`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from dmr_cli import config
from dmr_cli.errors import DmrError, StoreError
from dmr_cli.runtime.install import (
    LLAMA_CPP_PYTHON_SDIST_VERSION,
    check_variant,
    commit_variant,
    exe,
    now_rfc3339,
    probe_version,
    staging,
)

Progress = Callable[[dict[str, Any]], None]

# sha256 of llama_cpp_python-0.3.36.tar.gz on PyPI: pip does not check hashes unless asked.
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
BASE_CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
)
VARIANT_CMAKE_OPTIONS: dict[str, tuple[str, ...]] = {
    "cpu": (),
    "cuda": ("-DGGML_CUDA=ON",),
    "vulkan": ("-DGGML_VULKAN=ON",),
    "metal": ("-DGGML_METAL=ON",),
    "opencl": ("-DGGML_OPENCL=ON", "-DGGML_OPENCL_USE_ADRENO_KERNELS=ON"),
    "rocm": ("-DGGML_HIP=ON",),
}
# What a failed GPU build most likely lacked.
VARIANT_NEEDS = {
    "cuda": "the CUDA toolkit (nvcc; Debian: nvidia-cuda-toolkit)",
    "vulkan": "the Vulkan SDK (headers and glslc; Debian: libvulkan-dev glslc)",
    "metal": "Xcode's command line tools (xcode-select --install)",
    "opencl": "OpenCL headers and an ICD loader (Debian: opencl-headers ocl-icd-opencl-dev)",
    "rocm": "ROCm with HIP (hipcc, /opt/rocm)",
}
_MAKE_PERCENT = re.compile(r"^\[\s*(\d+)%\]")
_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")
_LOG_TAIL = 25
_STAMP = ".dmr-configure.json"


def default_cache_dir() -> Path:
    value = config.env("DMR_BUILD_CACHE")
    return Path(value).expanduser() if value else config.runner_dir().parent / "build-cache"


def _event(stage: str, message: str, percent: int | None = None) -> dict[str, Any]:
    return {"type": "build", "stage": stage, "message": message, "percent": percent}


# -- tools --------------------------------------------------------------------------------


def _tools_hint() -> str:
    if sys.platform == "darwin":
        return "install them: xcode-select --install && brew install cmake"
    if sys.platform == "win32":
        return "install CMake and Visual Studio's C++ build tools"
    return (
        "install them: sudo apt-get install cmake build-essential (Debian/Ubuntu), "
        "sudo dnf install cmake gcc-c++ make (Fedora)"
    )


def _has_compiler(env_name: str, names: Sequence[str]) -> bool:
    configured = os.environ.get(env_name, "").split()
    candidates = configured[:1] or list(names)
    return any(shutil.which(name) for name in candidates)


def check_tools() -> None:
    """cmake and a C and C++ compiler, or a DmrError that says how to get them."""
    missing = []
    if shutil.which("cmake") is None:
        missing.append("cmake")
    if not _has_compiler("CC", ("cc", "gcc", "clang", "cl")):
        missing.append("a C compiler")
    if not _has_compiler("CXX", ("c++", "g++", "clang++", "cl")):
        missing.append("a C++ compiler")
    if missing:
        raise DmrError(
            f"building llama-server from source needs {', '.join(missing)}: not found on PATH",
            hint=_tools_hint(),
        )


# -- sources ------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _run_captured(argv: Sequence[str]) -> tuple[int, str]:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, errors="replace")
    except OSError as exc:
        return 127, str(exc)
    return result.returncode, result.stdout + result.stderr


def fetch_sdist(cache: Path, progress: Progress) -> Path:
    """The llama-cpp-python sdist: `DMR_LLAMA_SDIST`, the cached copy, or pip's download."""
    local = config.env("DMR_LLAMA_SDIST")
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise DmrError(f"DMR_LLAMA_SDIST={local} is not a file")
        return path
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_SDIST_VERSION}.tar.gz"
    cached = cache / name
    if cached.is_file():
        return cached
    progress(_event("download", f"Downloading the llama.cpp sources ({name}) with pip"))
    download = cache / f".download-{os.getpid()}"
    shutil.rmtree(download, ignore_errors=True)
    code, output = _run_captured(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"llama-cpp-python=={LLAMA_CPP_PYTHON_SDIST_VERSION}",
            "-d",
            str(download),
        ]
    )
    try:
        fetched = download / name
        if code != 0 or not fetched.is_file():
            tail = "\n".join(output.strip().splitlines()[-_LOG_TAIL:])
            raise DmrError(
                f"cannot download the llama.cpp sources with {sys.executable} -m pip "
                f"(exit {code}):\n{tail}",
                hint=f"download {name} from PyPI yourself and set DMR_LLAMA_SDIST to its path",
            )
        actual = _sha256(fetched)
        if actual != SDIST_SHA256:
            raise DmrError(
                f"{name} from PyPI has sha256 {actual}, expected {SDIST_SHA256}: not using it"
            )
        os.replace(fetched, cached)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return cached


def extract_sdist(sdist: Path, cache: Path, progress: Progress) -> Path:
    """`<cache>/src/<sdist top directory>`, extracted once (into a temp dir, then renamed)."""
    src = cache / "src"
    src.mkdir(parents=True, exist_ok=True)
    top = sdist.name.removesuffix(".tar.gz").removesuffix(".tgz")
    tree = src / top
    if (tree / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return tree
    progress(_event("extract", f"Extracting {sdist.name}"))
    temp = src / f".extract-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        with tarfile.open(sdist, "r:*") as archive:
            if hasattr(tarfile, "data_filter"):
                archive.extractall(temp, filter="data")
            else:  # Python without extraction filters: a hash-checked sdist from PyPI
                archive.extractall(temp)
        entries = list(temp.iterdir())
        if len(entries) != 1 or not (entries[0] / "vendor" / "llama.cpp").is_dir():
            raise DmrError(f"{sdist} is not a llama-cpp-python sdist with vendor/llama.cpp")
        shutil.rmtree(tree, ignore_errors=True)
        os.replace(entries[0], tree)
    except (tarfile.TarError, OSError) as exc:
        raise StoreError(f"cannot extract {sdist}: {exc}") from exc
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return tree


# -- cmake --------------------------------------------------------------------------------


def cmake_options(variant: str) -> list[str]:
    return [*BASE_CMAKE_OPTIONS, *VARIANT_CMAKE_OPTIONS[check_variant(variant)]]


def build_percent(line: str) -> int | None:
    """Progress from a build line: make's `[ 45%]` or ninja's `[12/345]`."""
    match = _MAKE_PERCENT.match(line)
    if match:
        return int(match.group(1))
    match = _NINJA_STEP.match(line)
    if match and int(match.group(2)) > 0:
        return int(match.group(1)) * 100 // int(match.group(2))
    return None


def _stream(
    argv: Sequence[str], log: IO[str], on_line: Callable[[str], None], cwd: Path
) -> tuple[int, list[str]]:
    """Run `argv`, copying its output to `log` and each line to `on_line`; returns the exit
    status and the last lines. The process never outlives an interrupt."""
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    tail: deque[str] = deque(maxlen=_LOG_TAIL)
    try:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            bufsize=1,
        )
    except OSError as exc:
        return 127, [str(exc)]
    try:
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            text = line.rstrip()
            tail.append(text)
            on_line(text)
        return process.wait(), list(tail)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.flush()


def _failure(what: str, variant: str, code: int, tail: list[str], log_path: Path) -> DmrError:
    needs = VARIANT_NEEDS.get(variant)
    hint = f"full log: {log_path}"
    if needs:
        hint += f"; the {variant} variant needs {needs}"
    return DmrError(f"{what} failed (exit {code}):\n" + "\n".join(tail), hint=hint)


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """One build per cache at a time (two would fight over the same build tree)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks in the stdlib
        yield
        return
    with open(cache / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_llama_server(
    source: Path, build: Path, variant: str, jobs: int, progress: Progress
) -> Path:
    """Configure (when the options changed) and build the llama-server target; its path."""
    build.mkdir(parents=True, exist_ok=True)
    log_path = build / "build.log"
    options = cmake_options(variant)
    configure = ["cmake", "-S", str(source), "-B", str(build), *options]
    stamp = build / _STAMP
    with open(log_path, "w", buffering=1) as log:  # line-buffered: `tail -f` works
        configured = stamp.is_file() and (build / "CMakeCache.txt").is_file()
        if not configured or json.loads(stamp.read_text()) != configure:
            progress(_event("configure", f"Configuring llama.cpp ({variant})"))
            stamp.unlink(missing_ok=True)
            code, tail = _stream(configure, log, lambda _: None, build)
            if code != 0:
                raise _failure("configuring llama.cpp", variant, code, tail, log_path)
            stamp.write_text(json.dumps(configure))
        progress(_event("build", f"Building llama-server with {jobs} parallel jobs"))
        last = [-1]

        def on_line(line: str) -> None:
            percent = build_percent(line)
            if percent is not None and percent != last[0]:
                last[0] = percent
                progress(_event("build", line, percent))

        argv = ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)]
        if sys.platform == "win32":
            argv += ["--config", "Release"]
        code, tail = _stream(argv, log, on_line, build)
        if code != 0:
            raise _failure("building llama-server", variant, code, tail, log_path)
    for candidate in (
        build / "bin" / exe("llama-server"),
        build / "bin" / "Release" / exe("llama-server"),
    ):
        if candidate.is_file():
            return candidate
    raise DmrError(f"the build finished but left no llama-server in {build / 'bin'}")


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):  # the CPUs this process may use (containers, taskset)
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def install_from_source(
    variant: str,
    progress: Progress,
    *,
    jobs: int | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Build llama-server for `variant` and install it; returns the `.llamacpp_version`
    record (with `"changed": True`)."""
    check_variant(variant)
    if variant == "metal" and sys.platform != "darwin":
        raise DmrError("the metal variant can only be built on macOS")
    check_tools()
    cache = cache_dir or default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    jobs = jobs or _cpu_count()
    with _cache_lock(cache):
        sdist = fetch_sdist(cache, progress)
        source = extract_sdist(sdist, cache, progress)
        sdist_version = source.name.rsplit("-", 1)[-1]
        build = cache / f"build-{sdist_version}-{variant}"
        binary = build_llama_server(source / "vendor" / "llama.cpp", build, variant, jobs, progress)
        progress(_event("install", f"Installing llama-server ({variant})", 100))
        with staging(variant) as stage:
            tree = stage / "tree"
            (tree / "bin").mkdir(parents=True)
            shutil.copy2(binary, tree / "bin" / binary.name)
            # Static by default; copy any shared ggml backends the options produced.
            libs = [p for p in binary.parent.iterdir() if p.suffix in (".so", ".dylib", ".dll")]
            if libs:
                (tree / "lib").mkdir()
                for lib in libs:
                    shutil.copy2(lib, tree / "lib" / lib.name)
            probed = probe_version(tree / "bin" / binary.name, tree / "lib" if libs else None)
            if probed is None:
                raise DmrError(
                    f"the llama-server built in {build} does not run",
                    hint=f"see {build / 'build.log'}",
                )
            version, commit = probed
            record = {
                "tag": f"source-{sdist_version}",
                "digest": None,
                "variant": variant,
                "version": version,
                "commit": commit,
                "source": "source",
                "sdist": sdist.name,
                "cmake_options": cmake_options(variant),
                "installed_at": now_rfc3339(),
            }
            commit_variant(tree, variant, record)
    return {**record, "changed": True}
