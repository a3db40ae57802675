"""llama-server command lines, what an installed llama-server accepts, and its failures.

`build_args` follows DMR's order (spec §7.3, mr:pkg/inference/backends/llamacpp/llamacpp_config.go)
and adds parallel slots so concurrent requests are batched. Flags the installed binary does not
accept (read once from its `--help`, cached per binary) are dropped or translated: builds move
fast, and recent ones reject `--no-mmap` outright.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform as _platform
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dmr_cli import config as settings
from dmr_cli.errors import BadRequest, DmrError
from dmr_cli.runtime.config import UNLIMITED_CONTEXT, RunnerConfig

# Four slots: on CPU, decoding is bound by reading the weights, and continuous batching reads
# them once per step for every active slot, so up to four requests stream at close to the
# speed of one even on two cores; it is also llama-server's own choice when -np is "auto".
# With a unified KV cache the slots share one buffer of --ctx-size tokens, so memory does not
# grow with the slot count and any one request can still use the full context.
DEFAULT_PARALLEL = 4

# Flags dmr passes itself; LLAMA_ARGS may not set them (DMR refuses to start the same way).
_FORBIDDEN_BASE_FLAGS = (
    "--model",
    "-m",
    "--host",
    "--embeddings",
    "--embedding",
    "--mmproj",
    "-mm",
)

# A user flag replaces the default it names (DMR's replaceConflictingDefaults), so that
# `--threads 2` is not followed by a second, contradicting `--threads`.
_DEFAULT_ALIASES: dict[str, tuple[str, ...]] = {
    "-ngl": ("-ngl", "--gpu-layers", "--n-gpu-layers"),
    "--metrics": ("--metrics", "--no-metrics"),
    "--no-mmap": ("--no-mmap", "--mmap"),
    "--threads": ("--threads", "-t"),
    "--parallel": ("--parallel", "-np"),
    "--kv-unified": ("--kv-unified", "-kvu", "--no-kv-unified", "-no-kvu"),
    "--cont-batching": ("--cont-batching", "-cb", "--no-cont-batching", "-nocb"),
}

# Older names for flags dmr generates, tried when the binary lacks the current one.
_FALLBACKS: dict[str, str] = {
    "--spec-draft-n-max": "--draft-max",
    "--spec-draft-p-min": "--draft-p-min",
}

_HELP_FLAG = re.compile(r"-{1,2}[A-Za-z][\w.+-]*")


@dataclass(frozen=True)
class FlagSupport:
    """The flags a llama-server binary lists in its `--help`.

    An empty set means the help could not be read: then every flag is assumed accepted, so
    an unreadable help never strips a working command line.
    """

    flags: frozenset[str]

    def accepts(self, flag: str) -> bool:
        return not self.flags or flag.split("=", 1)[0] in self.flags


def parse_help(text: str) -> frozenset[str]:
    """Flags named in llama-server's `--help`: every alias of every option, `--no-x` forms too.

    An option line starts at (or near) the left margin with its comma-separated aliases, then
    at most one value placeholder (`N`, `<0|1>`, `{none,linear}`, `[on|off]`), then the text.
    """
    flags: set[str] = set()
    for line in text.splitlines():
        stripped = line.lstrip()
        # Description lines are indented to the text column; option lines are not.
        if not stripped.startswith("-") or len(line) - len(stripped) > 4:
            continue
        for token in stripped.split():
            name = token.rstrip(",")
            if not _HELP_FLAG.fullmatch(name):
                break
            flags.add(name)
            if not token.endswith(","):
                break
    return frozenset(flags)


def flag_support(
    binary: Path, cache_file: Path | None = None, *, env: Mapping[str, str] | None = None
) -> FlagSupport:
    """The flags `binary` accepts, from `<binary> --help`, run once per (path, size, mtime).

    The answer is cached as JSON in `cache_file` (default: the state dir), so a daemon restart
    does not run every binary again. A help that cannot be read is not cached. `env` is the
    environment to run it with (LD_LIBRARY_PATH for an installed variant's libraries).
    """
    cache_file = cache_file or settings.state_dir() / "llama-server-flags.json"
    path = binary.resolve()
    stat = path.stat()
    key = str(path)
    cache = _read_cache(cache_file)
    entry = cache.get(key)
    if (
        isinstance(entry, dict)
        and entry.get("size") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(entry.get("flags"), list)
    ):
        return FlagSupport(frozenset(entry["flags"]))
    flags = parse_help(_run(path, "--help", env) or "")
    if flags:
        cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "flags": sorted(flags)}
        _write_cache(cache_file, cache)
    return FlagSupport(flags)


def _read_cache(cache_file: Path) -> dict[str, object]:
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache_file: Path, cache: dict[str, object]) -> None:
    # A cache that cannot be written only costs another --help run next time.
    with contextlib.suppress(OSError):
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, cache_file)


def _run(binary: Path, flag: str, env: Mapping[str, str] | None) -> str | None:
    try:
        done = subprocess.run(
            [str(binary), flag],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    # llama-server prints its help on stdout and its version on stderr.
    return (done.stdout + done.stderr).decode("utf-8", "replace")


def physical_cores() -> int:
    """Physical CPU cores (hyper-threads share one core's arithmetic units)."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def split_llama_args(raw: str) -> list[str]:
    """LLAMA_ARGS split like a shell would; refuses the flags dmr sets per model."""
    try:
        args = shlex.split(raw)
    except ValueError as exc:
        raise DmrError(f"invalid LLAMA_ARGS: {exc}") from exc
    _check_base_args(args)
    return args


def _check_base_args(args: Sequence[str]) -> None:
    for arg in args:
        key = arg.split("=", 1)[0]
        if key in _FORBIDDEN_BASE_FLAGS:
            raise DmrError(
                f"LLAMA_ARGS must not contain {key}: dmr sets it for each model",
                hint=f"remove {key} from LLAMA_ARGS",
            )


def default_base_args(
    *, platform: str, machine: str, accelerator: str, cores: int, parallel: int
) -> list[str]:
    """DMR's base arguments plus dmr's threads and parallel slots."""
    args = ["-ngl", "999", "--metrics"]
    if platform == "darwin":
        args.append("--no-mmap")  # DMR's macOS default
    if machine.lower() in ("arm64", "aarch64"):
        # DMR: on arm64, going beyond half the cores brings little to nothing.
        args += ["--threads", str(max(2, cores // 2))]
    elif accelerator == "cpu":
        # Generation on CPU is fastest with one thread per physical core.
        args += ["--threads", str(cores)]
    if parallel > 1:
        args += ["--parallel", str(parallel), "--kv-unified", "--cont-batching"]
    elif parallel == 1:
        args += ["--parallel", "1"]
    return args


def build_args(
    *,
    model_path: Path,
    mode: str,
    config: RunnerConfig,
    model_context_size: int | None,
    socket: str,
    chat_template: Path | None,
    mmproj: Path | None,
    draft_model: Path | None,
    supported: FlagSupport | None = None,
    base_args: Sequence[str] | None = None,
    platform: str = sys.platform,
    machine: str = _platform.machine(),
    accelerator: str = "cpu",
    cpu_count: int | None = None,
    parallel: int | None = None,
) -> list[str]:
    """llama-server's arguments (without the binary) for one model in one mode.

    `socket` must end in `.sock`: llama-server then listens on that Unix socket. `base_args`
    (LLAMA_ARGS) replaces the defaults; `cpu_count` defaults to the physical cores;
    `parallel` (default DEFAULT_PARALLEL, 0 = leave it to the binary) sets the slots.
    """
    user_flags = list(config.runtime_flags)
    if base_args is not None:
        _check_base_args(base_args)
        base = list(base_args)
    else:
        slots = DEFAULT_PARALLEL if parallel is None else parallel
        if supported is not None and not supported.accepts("--kv-unified"):
            # Without a unified KV cache every slot gets ctx-size / slots tokens: one slot
            # with the whole context serves a long conversation better.
            slots = 0
        defaults = default_base_args(
            platform=platform,
            machine=machine,
            accelerator=accelerator,
            cores=cpu_count or physical_cores(),
            parallel=slots,
        )
        base = _adapt(defaults, supported)
    args = _without_overridden_defaults(base, user_flags)
    args += ["--model", str(model_path), "--host", socket]

    if mode == "completion":
        if chat_template is not None:
            args += ["--chat-template-file", str(chat_template)]
    elif mode == "embedding":
        args.append("--embeddings")
    elif mode == "reranking":
        args += ["--embeddings", "--reranking"]
    else:
        raise BadRequest(f'unsupported backend mode "{mode}" for llama.cpp')

    if config.reasoning_budget is not None:
        args += ["--reasoning-budget", str(config.reasoning_budget)]
    context = context_size(config, model_context_size)
    if context is not None:
        args += ["--ctx-size", str(context)]
    args += user_flags
    if mmproj is not None:
        args += ["--mmproj", str(mmproj)]
    else:
        args += _adapt(["--jinja"], supported)

    spec = config.speculative
    if spec is not None and draft_model is not None:
        extra = ["--model-draft", str(draft_model)]
        if spec.num_tokens > 0:
            extra += ["--spec-draft-n-max", str(spec.num_tokens)]
        if spec.min_acceptance_rate > 0:
            extra += ["--spec-draft-p-min", f"{spec.min_acceptance_rate:.2f}"]
        args += _adapt(extra, supported)
    return args


def context_size(config: RunnerConfig, model_context_size: int | None) -> int | None:
    """The configured context size, else the model's packaged one; -1 means unlimited.

    Zero and other negative values mean "not set" (DMR's GetContextSize).
    """
    for value in (config.context_size, model_context_size):
        if value is not None and (value > 0 or value == UNLIMITED_CONTEXT):
            return value
    return None


def _groups(args: Sequence[str]) -> list[list[str]]:
    """Split an argument list into [flag, values...] groups."""
    groups: list[list[str]] = []
    for arg in args:
        if not groups or (arg.startswith("-") and not re.fullmatch(r"-\d.*", arg)):
            groups.append([arg])
        else:
            groups[-1].append(arg)
    return groups


def _adapt(args: Sequence[str], supported: FlagSupport | None) -> list[str]:
    """Keep what the binary accepts, rename what it knows under an older name, drop the rest."""
    if supported is None:
        return list(args)
    out: list[str] = []
    for flag, *values in _groups(args):
        if supported.accepts(flag):
            out += [flag, *values]
        elif flag in _FALLBACKS and supported.accepts(_FALLBACKS[flag]):
            out += [_FALLBACKS[flag], *values]
    return out


def _without_overridden_defaults(base: Sequence[str], user_flags: Sequence[str]) -> list[str]:
    """Drop the defaults that a user flag names (with their values)."""
    canonical = {alias: name for name, aliases in _DEFAULT_ALIASES.items() for alias in aliases}
    named = {canonical[f.split("=", 1)[0]] for f in user_flags if f.split("=", 1)[0] in canonical}
    out: list[str] = []
    for flag, *values in _groups(base):
        if canonical.get(flag.split("=", 1)[0]) not in named:
            out += [flag, *values]
    return out


# -- failures -------------------------------------------------------------------------------

_VERBOSE_LIMIT = 4096
_FRIENDLY: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"failed to allocate buffer, size = .*MiB|failed to allocate Metal buffer"),
     "not enough GPU memory to load the model (Metal)"),
    (re.compile(r"cudaMalloc failed: out of memory"),
     "not enough GPU memory to load the model (CUDA)"),
    (re.compile(r"failed to allocate buffer of size \d+|std::bad_alloc|insufficient memory"),
     "not enough memory to load the model (CPU): try a smaller context size "
     "(dmr configure --context-size N MODEL) or unload other models"),
    (re.compile(r"exiting due to model loading error"), "failed to load model"),
)  # fmt: skip
_MISSING_LIBRARY = re.compile(r"error while loading shared libraries: ([^:\s]+)")


def friendly_error(stderr_tail: str) -> str:
    """The runner's error for the user: a known failure named plainly, then its output.

    Known failures (spec §7.3, plus CPU allocation failures and missing GPU libraries) read
    `<what happened>\\n\\nVerbose output:\\n<last 4 KiB>`; anything else is the tail itself.
    """
    tail = stderr_tail.strip()[-_VERBOSE_LIMIT:]
    missing = _MISSING_LIBRARY.search(tail)
    if missing:
        message = (
            f"llama-server cannot load the shared library {missing.group(1)}: the runner "
            "variant does not match this machine's drivers; reinstall it (dmr install-runner) "
            "or use the CPU runner (DMR_GPU=cpu)"
        )
        return f"{message}\n\nVerbose output:\n{tail}"
    for pattern, message in _FRIENDLY:
        if pattern.search(tail):
            return f"{message}\n\nVerbose output:\n{tail}"
    return tail


# -- embedded engine ------------------------------------------------------------------------


def embedded_args(
    *,
    model_path: Path,
    socket: str | Path,
    mode: str,
    config: RunnerConfig,
    model_context_size: int | None,
    chat_template: Path | None,
    alias: str | None = None,
    n_threads: int | None = None,
    python: str = sys.executable,
) -> list[str]:
    """argv that starts the embedded engine (llama-cpp-python) for one model.

    It cannot rerank or generate images, and llama-server's runtime flags do not apply to it.
    """
    if mode not in ("completion", "embedding"):
        raise BadRequest(
            f'the embedded engine does not support mode "{mode}"',
            hint="install a native runner: dmr install-runner",
        )
    argv = [python, "-m", "dmr_cli.runtime.embedded_server", "--model", str(model_path)]
    argv += ["--socket", str(socket)]
    context = context_size(config, model_context_size)
    if context is not None:
        # llama-cpp-python reads 0 as "the model's training context", DMR's -1.
        argv += ["--n-ctx", str(max(context, 0))]
    if mode == "embedding":
        argv.append("--embedding")
    elif chat_template is not None:
        argv += ["--chat-template-file", str(chat_template)]
    argv += ["--n-threads", str(n_threads or physical_cores())]
    if alias:
        argv += ["--alias", alias]
    return argv
