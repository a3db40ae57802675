"""llama-server command lines (golden files), --help parsing and its cache, failures, and the
embedded engine's argv.

Golden files live in tests/golden/llamacpp/<case>.txt, one argument per line; regenerate them
with `UPDATE_GOLDEN=1 pytest tests/unit/test_llamacpp_args.py` and review the diff.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from dmr_cli.errors import BadRequest, DmrError
from dmr_cli.runtime.config import RunnerConfig, SpeculativeConfig
from dmr_cli.runtime.install import parse_version, probe_version
from dmr_cli.runtime.llamacpp import (
    DEFAULT_PARALLEL,
    FlagSupport,
    build_args,
    context_size,
    embedded_args,
    flag_support,
    friendly_error,
    parse_help,
    split_llama_args,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "llamacpp"
# `llama-server --help` of the build dmr's source install produces (llama.cpp 0.5.0-dev).
CURRENT = FlagSupport(parse_help((GOLDEN / "help" / "llama-server-0.5.0-dev.txt").read_text()))
LEGACY = FlagSupport(parse_help((GOLDEN / "help" / "llama-server-legacy.txt").read_text()))

MODEL = Path("/models/bundles/sha256/0a1b2c/model/model.gguf")
TEMPLATE = Path("/models/bundles/sha256/0a1b2c/model/template.jinja")
MMPROJ = Path("/models/bundles/sha256/0a1b2c/model/model.mmproj")
DRAFT = Path("/models/bundles/sha256/d4e5f6/model/model.gguf")
SPECULATIVE = RunnerConfig(speculative=SpeculativeConfig("ai/qwen3:0.6B", 16, 0.8))

BASE: dict[str, Any] = {
    "model_path": MODEL,
    "mode": "completion",
    "config": RunnerConfig(),
    "model_context_size": None,
    "socket": "/run/dmr/runner-1.sock",
    "chat_template": None,
    "mmproj": None,
    "draft_model": None,
    "platform": "linux",
    "machine": "x86_64",
    "accelerator": "cpu",
    "cpu_count": 2,
}

CASES: dict[str, dict[str, Any]] = {
    "completion-default": {},
    "completion-chat-template": {"chat_template": TEMPLATE},
    "completion-current-binary": {"chat_template": TEMPLATE, "supported": CURRENT},
    "embedding": {"mode": "embedding", "chat_template": TEMPLATE},
    "reranking": {"mode": "reranking", "chat_template": TEMPLATE},
    "context-from-config": {"config": RunnerConfig(context_size=8192), "model_context_size": 4096},
    "context-from-model": {"model_context_size": 4096},
    "context-unlimited": {"config": RunnerConfig(context_size=-1), "model_context_size": 4096},
    "context-model-unlimited": {"model_context_size": -1},
    "context-zero-ignored": {"config": RunnerConfig(context_size=0), "model_context_size": 0},
    "reasoning-budget": {"config": RunnerConfig(reasoning_budget=0, context_size=4096)},
    "runtime-flags": {
        # --threads and -np replace the defaults they name; the rest is appended verbatim.
        "config": RunnerConfig(
            context_size=4096, runtime_flags=["--threads", "1", "--temp", "0.7", "-np=2"]
        ),
    },
    "mmproj": {"mmproj": MMPROJ, "chat_template": TEMPLATE},
    "speculative": {"config": SPECULATIVE, "draft_model": DRAFT},
    "speculative-current-binary": {
        "config": SPECULATIVE,
        "draft_model": DRAFT,
        "supported": CURRENT,
    },
    "speculative-legacy-binary": {
        "config": SPECULATIVE,
        "draft_model": DRAFT,
        "supported": LEGACY,
    },
    "speculative-draft-missing": {"config": SPECULATIVE},
    "llama-args": {"base_args": ["-ngl", "0", "--threads", "3", "--no-warmup"]},
    "llama-args-replaced-by-flags": {
        "base_args": ["-ngl", "0", "--threads", "3"],
        "config": RunnerConfig(runtime_flags=["-t", "2"]),
    },
    "macos-metal": {
        "platform": "darwin",
        "machine": "arm64",
        "accelerator": "metal",
        "cpu_count": 8,
    },
    "macos-metal-current-binary": {
        "platform": "darwin",
        "machine": "arm64",
        "accelerator": "metal",
        "cpu_count": 8,
        "supported": CURRENT,
    },
    "macos-metal-legacy-binary": {
        "platform": "darwin",
        "machine": "arm64",
        "accelerator": "metal",
        "cpu_count": 8,
        "supported": LEGACY,
    },
    "macos-user-mmap": {
        "platform": "darwin",
        "machine": "arm64",
        "accelerator": "metal",
        "cpu_count": 2,
        "config": RunnerConfig(runtime_flags=["--mmap"]),
    },
    "linux-cuda": {"accelerator": "cuda", "cpu_count": 16},
    "linux-arm64-cpu": {"machine": "aarch64", "cpu_count": 4},
    "windows-opencl-arm64": {"platform": "win32", "machine": "ARM64", "accelerator": "opencl"},
    "parallel-one": {"parallel": 1},
    "parallel-off": {"parallel": 0},
    "parallel-eight": {"parallel": 8, "cpu_count": 16},
}


def check_golden(name: str, args: list[str]) -> None:
    path = GOLDEN / f"{name}.txt"
    text = "".join(f"{arg}\n" for arg in args)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
        return
    assert path.exists(), f"{path} is missing: run with UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{name}: run with UPDATE_GOLDEN=1 to accept the change"


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    check_golden(name, build_args(**{**BASE, **CASES[name]}))


def test_no_stale_golden_files() -> None:
    assert {p.stem for p in GOLDEN.glob("*.txt")} == set(CASES)


def flags_in(args: list[str]) -> list[str]:
    return [a for a in args if a.startswith("-") and not a[1:2].isdigit()]


@pytest.mark.parametrize(
    "name", sorted(n for n, case in CASES.items() if case.get("supported") is not None)
)
def test_every_flag_is_one_the_binary_accepts(name: str) -> None:
    case = CASES[name]
    args = build_args(**{**BASE, **case})
    assert all(case["supported"].accepts(flag) for flag in flags_in(args))


def test_the_dmr_example_command_line() -> None:
    # Spec §7.3's example, on a GPU machine where dmr adds only its parallel slots.
    args = build_args(
        **{**BASE, "accelerator": "cuda", "parallel": 0, "config": RunnerConfig(context_size=8192)}
    )
    assert args == [
        "-ngl", "999", "--metrics", "--model", str(MODEL), "--host", "/run/dmr/runner-1.sock",
        "--ctx-size", "8192", "--jinja",
    ]  # fmt: skip


def test_parallel_slots_use_a_unified_kv_cache() -> None:
    args = build_args(**BASE)
    slots = args.index("--parallel")
    assert args[slots + 1] == str(DEFAULT_PARALLEL)
    assert "--kv-unified" in args and "--cont-batching" in args


def test_no_parallel_slots_without_a_unified_kv_cache() -> None:
    # Splitting the context four ways would shrink every request's window.
    args = build_args(**{**BASE, "supported": LEGACY})
    assert "--parallel" not in args and "--kv-unified" not in args


def test_threads_default_to_physical_cores() -> None:
    import psutil

    args = build_args(**{**BASE, "cpu_count": None})
    expected = psutil.cpu_count(logical=False) or os.cpu_count()
    assert args[args.index("--threads") + 1] == str(expected)


def test_image_generation_is_not_a_llama_cpp_mode() -> None:
    with pytest.raises(BadRequest, match='unsupported backend mode "image-generation"'):
        build_args(**{**BASE, "mode": "image-generation"})


@pytest.mark.parametrize(
    ("configured", "packaged", "expected"),
    [(8192, 4096, 8192), (None, 4096, 4096), (-1, 4096, -1), (0, 2048, 2048), (-5, None, None),
     (None, None, None), (None, 0, None), (None, -1, -1)],
)  # fmt: skip
def test_context_size_rule(
    configured: int | None, packaged: int | None, expected: int | None
) -> None:
    assert context_size(RunnerConfig(context_size=configured), packaged) == expected


# -- LLAMA_ARGS -------------------------------------------------------------------------------


def test_split_llama_args() -> None:
    assert split_llama_args("-ngl 0 --chat-template-kwargs '{\"a\": 1}'") == [
        "-ngl",
        "0",
        "--chat-template-kwargs",
        '{"a": 1}',
    ]
    with pytest.raises(DmrError, match="invalid LLAMA_ARGS"):
        split_llama_args("-ngl '0")


@pytest.mark.parametrize(
    "raw",
    ["--model x.gguf", "-m x", "--host 0.0.0.0", "--host=0.0.0.0", "--embeddings", "--mmproj f"],
)
def test_llama_args_may_not_set_what_dmr_sets(raw: str) -> None:
    with pytest.raises(DmrError, match="LLAMA_ARGS must not contain") as info:
        split_llama_args(raw)
    assert info.value.hint is not None
    with pytest.raises(DmrError, match="LLAMA_ARGS must not contain"):
        build_args(**{**BASE, "base_args": raw.split()})


# -- --help and its cache ---------------------------------------------------------------------


def test_parse_help_reads_aliases_and_negations() -> None:
    text = (
        "-kvu,  --kv-unified, -no-kvu, --no-kv-unified\n"
        "                                        use single unified KV buffer\n"
        "-c,    --ctx-size N                     size of the prompt context\n"
        "--spec-type none,draft-simple,ngram-simple\n"
        "--ui,  --webui, --no-ui, --no-webui     whether to enable the Web UI\n"
        "                                        - auto: a description line with --not-a-flag\n"
        "----- sampling params -----\n"
        "-hf,   -hfr, --hf-repo <user>/<model>[:quant]\n"
    )
    assert parse_help(text) == {
        "-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified", "-c", "--ctx-size", "--spec-type",
        "--ui", "--webui", "--no-ui", "--no-webui", "-hf", "-hfr", "--hf-repo",
    }  # fmt: skip


def test_what_the_current_llama_server_accepts() -> None:
    for flag in ["--parallel", "-np", "--kv-unified", "--cont-batching", "-nocb", "--metrics",
                 "--jinja", "--reasoning-budget", "--threads", "-ngl", "--spec-draft-n-max",
                 "--model-draft", "--load-mode"]:  # fmt: skip
        assert CURRENT.accepts(flag), flag
    # Recent builds replaced --mmap/--no-mmap (and --mlock) with --load-mode.
    for flag in ["--no-mmap", "--mmap", "--mlock"]:
        assert not CURRENT.accepts(flag), flag
    assert CURRENT.accepts("--threads=4")


def test_unknown_support_accepts_everything() -> None:
    assert FlagSupport(frozenset()).accepts("--anything")


def fake_binary(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "bin" / "llama-server"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_flag_support_runs_help_once_per_binary(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    help_file = GOLDEN / "help" / "llama-server-0.5.0-dev.txt"
    binary = fake_binary(tmp_path, f'echo run >> "{runs}"\ncat "{help_file}"')
    cache = tmp_path / "state" / "llama-server-flags.json"

    first = flag_support(binary, cache)
    assert first == CURRENT
    assert flag_support(binary, cache) == CURRENT
    assert runs.read_text().count("run") == 1
    entry = json.loads(cache.read_text())[str(binary.resolve())]
    assert entry["size"] == binary.stat().st_size and "--kv-unified" in entry["flags"]

    # A replaced binary (new mtime) is asked again.
    os.utime(binary, ns=(binary.stat().st_atime_ns, binary.stat().st_mtime_ns + 10**9))
    assert flag_support(binary, cache) == CURRENT
    assert runs.read_text().count("run") == 2


def test_flag_support_follows_symlinks(tmp_path: Path) -> None:
    binary = fake_binary(tmp_path, 'echo "--metrics    enable metrics"')
    link = tmp_path / "llama-server"
    link.symlink_to(binary)
    cache = tmp_path / "cache.json"
    assert flag_support(link, cache).flags == {"--metrics"}
    assert list(json.loads(cache.read_text())) == [str(binary.resolve())]


def test_an_unreadable_help_is_not_cached(tmp_path: Path) -> None:
    binary = fake_binary(tmp_path, "echo 'error while loading shared libraries' >&2\nexit 127")
    cache = tmp_path / "cache.json"
    support = flag_support(binary, cache)
    assert support.flags == frozenset() and support.accepts("--no-mmap")
    assert not cache.exists()


def test_a_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    binary = fake_binary(tmp_path, 'echo "-np,   --parallel N   slots"')
    cache = tmp_path / "cache.json"
    cache.write_text("{not json")
    assert flag_support(binary, cache).flags == {"-np", "--parallel"}
    assert json.loads(cache.read_text())[str(binary.resolve())]["flags"] == ["--parallel", "-np"]


def test_flag_support_runs_with_the_given_environment(tmp_path: Path) -> None:
    binary = fake_binary(tmp_path, 'echo "--from-$DMR_TEST_LIBS   text"')
    env = {"PATH": os.environ.get("PATH", ""), "DMR_TEST_LIBS": "env"}
    assert flag_support(binary, tmp_path / "c.json", env=env).flags == {"--from-env"}


def test_flag_support_defaults_to_the_state_dir(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("DMR_STATE_DIR", str(tmp_path / "state"))
    binary = fake_binary(tmp_path, 'echo "--metrics   x"')
    flag_support(binary)
    assert (tmp_path / "state" / "llama-server-flags.json").exists()


# -- --version --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "version"),
    [
        ("version: 9879 (1a2b3c4)\nbuilt with cc for x86_64\n", ("b9879", "1a2b3c4")),
        ("ggml_cuda_init: found 1 CUDA devices\nversion: 6000 (deadbee)\n", ("b6000", "deadbee")),
        ("version: 0.5.0 (build 9879, commit 1a2b3c4)\n", ("b9879", "1a2b3c4")),
        ("version: 0.5.0-dev (build 1, commit 0c1e570)\n", ("0.5.0-dev", "0c1e570")),
        ("version: 0.5.0-dev (build 0, commit unknown)\n", ("0.5.0-dev", None)),
        ("", ("unknown", None)),
        ("segmentation fault", ("unknown", None)),
    ],
)
def test_parse_version(output: str, version: tuple[str, str | None]) -> None:
    assert parse_version(output) == version


def test_binary_version_reads_stderr(tmp_path: Path) -> None:
    binary = fake_binary(tmp_path, 'echo "version: 9879 (1a2b3c4)" >&2')
    assert probe_version(binary) == ("b9879", "1a2b3c4")
    assert probe_version(tmp_path / "missing") is None


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        (
            "ggml_metal_buffer_type_alloc_buffer: error: failed to allocate buffer, size = "
            "  4096.00 MiB\nllama_model_load: error loading model",
            "not enough GPU memory to load the model (Metal)",
        ),
        (
            "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 8192.00 MiB on device 0: "
            "cudaMalloc failed: out of memory",
            "not enough GPU memory to load the model (CUDA)",
        ),
        (
            "ggml_backend_cpu_buffer_type_alloc_buffer: "
            "failed to allocate buffer of size 68719476736",
            "not enough memory to load the model (CPU)",
        ),
        ("terminate called after throwing an instance of 'std::bad_alloc'", "not enough memory"),
        (
            "srv    load_model: failed to load model, 'x.gguf'\n"
            "srv   operator(): exiting due to model loading error",
            "failed to load model",
        ),
        (
            "llama-server: error while loading shared libraries: libcuda.so.1: cannot open "
            "shared object file: No such file or directory",
            "llama-server cannot load the shared library libcuda.so.1",
        ),
    ],
)
def test_friendly_errors(tail: str, message: str) -> None:
    text = friendly_error(tail)
    assert text.startswith(message)
    assert text.endswith(f"\n\nVerbose output:\n{tail}")


def test_missing_libraries_hint_at_the_fix() -> None:
    text = friendly_error("error while loading shared libraries: libvulkan.so.1: cannot open")
    assert "dmr install-runner" in text and "DMR_GPU=cpu" in text


def test_unknown_failures_pass_through_trimmed() -> None:
    assert friendly_error("  something odd happened\n") == "something odd happened"
    long = "x" * 10_000 + "exiting due to model loading error"
    text = friendly_error(long)
    assert text.startswith("failed to load model\n\nVerbose output:\n")
    assert len(text.split("Verbose output:\n", 1)[1]) == 4096


# -- embedded engine --------------------------------------------------------------------------


def test_embedded_args_for_completion() -> None:
    argv = embedded_args(
        model_path=MODEL,
        socket=Path("/run/dmr/runner-2.sock"),
        mode="completion",
        config=RunnerConfig(context_size=2048, runtime_flags=["--temp", "0.1"]),
        model_context_size=4096,
        chat_template=TEMPLATE,
        alias="ai/smollm2",
        n_threads=2,
    )
    assert argv == [
        sys.executable, "-m", "dmr_cli.runtime.embedded_server", "--model", str(MODEL),
        "--socket", "/run/dmr/runner-2.sock", "--n-ctx", "2048", "--chat-template-file",
        str(TEMPLATE), "--n-threads", "2", "--alias", "ai/smollm2",
    ]  # fmt: skip


def test_embedded_args_for_embeddings_and_unlimited_context() -> None:
    argv = embedded_args(
        model_path=MODEL,
        socket="/s.sock",
        mode="embedding",
        config=RunnerConfig(context_size=-1),
        model_context_size=None,
        chat_template=TEMPLATE,
        n_threads=4,
        python="/usr/bin/python3",
    )
    assert argv == [
        "/usr/bin/python3", "-m", "dmr_cli.runtime.embedded_server", "--model", str(MODEL),
        "--socket", "/s.sock", "--n-ctx", "0", "--embedding", "--n-threads", "4",
    ]  # fmt: skip


@pytest.mark.parametrize("mode", ["reranking", "image-generation"])
def test_the_embedded_engine_cannot_rerank_or_draw(mode: str) -> None:
    with pytest.raises(BadRequest, match="embedded engine does not support") as info:
        embedded_args(
            model_path=MODEL,
            socket="/s.sock",
            mode=mode,
            config=RunnerConfig(),
            model_context_size=None,
            chat_template=None,
        )
    assert info.value.hint == "install a native runner: dmr install-runner"
