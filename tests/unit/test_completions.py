"""Shell completion: the checked-in scripts, the answers `dmr` gives them, and model names
from the daemon or the store within the time budget.

Completion requests run `cli.main` in-process with the protocol's environment; the bash
script runs in a real bash. zsh and fish are not installed here: their answers are checked
as the scripts would receive them.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from dmr_cli import cli, client, completion, config
from dmr_cli.store import Store
from tests.helpers.oci import hand_artifact
from tests.helpers.registry import free_port
from tests.unit import test_cli_args
from tests.unit.test_cli_args import Reply, StubDaemon

# The stand-in daemon's fixtures, shared with test_cli_args.
env = test_cli_args.env
daemon = test_cli_args.daemon

ROOT = Path(__file__).resolve().parents[2]
STORE_TAGS = [
    ["docker.io/ai/smollm2:latest", "docker.io/ai/smollm2:360M-Q4_K_M"],
    ["huggingface.co/bartowski/qwen3-gguf:Q4_K_M"],
    ["docker.io/myorg/llama:v1"],
]
STORE_NAMES = [
    "huggingface.co/bartowski/qwen3-gguf:Q4_K_M",
    "myorg/llama:v1",
    "smollm2",
    "smollm2:360M-Q4_K_M",
]


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_store(root: Path) -> None:
    store = Store(root)
    store.ensure_layout()
    for i, tags in enumerate(STORE_TAGS):
        art = hand_artifact([b"weights %d" % i])
        store.write_blob_bytes(art.config)
        for layer in art.layers:
            store.write_blob_bytes(layer)
        store.write_model(art.manifest, tags)


@pytest.fixture
def no_daemon(env: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """A store with models, and nothing listening at the daemon address."""
    make_store(tmp_path / "models")
    env.setenv("MODELS_PATH", str(tmp_path / "models"))
    env.setenv("MODEL_RUNNER_HOST", f"http://127.0.0.1:{free_port()}")
    env.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    env.delenv("DMR_CONFIG", raising=False)
    config.clear_cache()
    client.endpoint.cache_clear()
    yield env
    config.clear_cache()
    client.endpoint.cache_clear()


@pytest.fixture
def silent_daemon(no_daemon: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A daemon address that accepts connections and never answers."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        no_daemon.setenv("MODEL_RUNNER_HOST", f"http://127.0.0.1:{server.getsockname()[1]}")
        client.endpoint.cache_clear()
        yield server


def complete(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, shell: str, line: str
) -> list[str]:
    """What `dmr` answers the SHELL script for the command LINE (cursor at its end)."""
    monkeypatch.setenv(cli.COMPLETE_VAR, f"complete_{shell}")
    monkeypatch.setenv("_TYPER_COMPLETE_ARGS", line)
    monkeypatch.setenv("_TYPER_COMPLETE_FISH_ACTION", "get-args")
    with pytest.raises(SystemExit) as done:
        cli.main([])
    assert done.value.code == 0
    return [line for line in capsys.readouterr().out.splitlines() if line]  # "" for none


# -- the scripts ------------------------------------------------------------------------------


def test_checked_in_scripts_are_current() -> None:
    gen = load_script("gen_completions")
    for path, text in gen.scripts().items():
        assert path.read_text() == text, f"{path} is stale: run python scripts/gen_docs.py"
    assert sorted(p.name for p in (ROOT / "completions").iterdir()) == sorted(
        completion.FILES.values()
    )


def test_the_scripts_ask_dmr_and_hold_no_command_names() -> None:
    for name in completion.FILES.values():
        text = (ROOT / "completions" / name).read_text()
        assert "_DMR_COMPLETE=complete_" in text
        assert "pull" not in text and "--json" not in text
    assert (ROOT / "completions" / "_dmr").read_text().startswith("#compdef dmr\n")


def test_bash_completes_through_the_script(no_daemon: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The checked-in bash script in a real bash, calling the real `dmr`: subcommands, and
    a tag after `:`, which bash treats as a word break."""
    probe = tmp_path / "probe.sh"
    probe.write_text(
        f"source {ROOT / 'completions' / 'dmr.bash'}\n"
        'for line in "$@"; do\n'
        '  COMP_LINE="$line"; COMP_POINT=${#line}; _dmr_completion dmr\n'
        "  printf '%s,' \"${COMPREPLY[@]}\"; echo\n"
        "done\n"
    )
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    done = subprocess.run(
        ["bash", str(probe), "dmr pu", "dmr rm smollm2:3", "dmr service u"],
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.splitlines() == ["pull,push,purge,", "360M-Q4_K_M,", "uninstall,"]


# -- the answers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("dmr pu", ["pull", "push", "purge"]),
        ("dmr ls --", ["--json", "--openai", "--quiet", "--help"]),
        ("dmr rm -", ["--force", "-f", "--help", "-h"]),
        ("dmr service ", ["install", "uninstall", "status"]),
    ],
)
def test_subcommands_and_flags_come_from_the_app(
    no_daemon: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    line: str,
    expected: list[str],
) -> None:
    # click lists the help option's names in the order the option was built with
    assert sorted(complete(capsys, no_daemon, "bash", line)) == sorted(expected)


@pytest.mark.parametrize(
    "line",
    [
        "dmr rm ",
        "dmr rm smollm2 ",
        "dmr run ",
        "dmr inspect ",
        "dmr show ",
        "dmr tag ",
        "dmr push ",
    ],
)
def test_model_arguments_complete_local_names_from_the_store_without_a_daemon(
    no_daemon: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], line: str
) -> None:
    assert complete(capsys, no_daemon, "bash", line) == STORE_NAMES


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("dmr run smollm2:", ["smollm2:360M-Q4_K_M"]),
        ("dmr run ai/sm", ["ai/smollm2", "ai/smollm2:360M-Q4_K_M"]),
        ("dmr run hf", ["hf.co/bartowski/qwen3-gguf:Q4_K_M"]),
        ("dmr tag smollm2 ", []),  # the target is a new name
        ("dmr pull ", []),  # remote names
        ("dmr run smollm2 ", []),  # the prompt
        ("dmr configure ", ["show", *STORE_NAMES]),
        ("dmr configure show my", ["myorg/llama:v1"]),
        ("dmr configure smollm2 ", []),
        ("dmr configure --speculative-draft-model my", ["myorg/llama:v1"]),
    ],
)
def test_which_words_complete_to_models(
    no_daemon: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    line: str,
    expected: list[str],
) -> None:
    assert complete(capsys, no_daemon, "bash", line) == expected


def test_zsh_and_fish_answers(
    no_daemon: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    zsh = "\n".join(complete(capsys, no_daemon, "zsh", "dmr rm my"))
    assert zsh == "_arguments '*: :((\"myorg/llama\\\\:v1\"))'"  # `:` escaped for _arguments
    fish = complete(capsys, no_daemon, "fish", "dmr pu")
    assert [line.split("\t")[0] for line in fish] == ["pull", "push", "purge"]
    assert fish[0].startswith("pull\tPull a model")


def test_every_declared_model_parameter_exists() -> None:
    group = completion._command(cli.build_app())
    for name, params in completion.MODEL_PARAMS.items():
        declared = {p.name: p for p in group.commands[name].params}
        for param in params:
            assert declared[param]._custom_shell_complete is not None


# -- where model names come from, and how long that may take ----------------------------------


def test_the_daemon_answers_when_it_runs(
    daemon: StubDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_store(tmp_path / "models")  # not what the daemon says: its answer wins
    monkeypatch.setenv("MODELS_PATH", str(tmp_path / "models"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("DMR_API_KEY", "k-123")
    config.clear_cache()
    daemon.routes[("GET", "/models")] = Reply(body=[{"id": "sha256:1", "tags": ["ai/gemma3:4B"]}])
    assert completion.model_names("") == ["gemma3:4B"]
    assert daemon.requests[-1].headers["Authorization"] == "Bearer k-123"


def test_a_daemon_error_falls_back_to_the_store(
    daemon: StubDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_store(tmp_path / "models")
    monkeypatch.setenv("MODELS_PATH", str(tmp_path / "models"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    config.clear_cache()
    daemon.routes[("GET", "/models")] = Reply(401, "API key required\n", "text/plain")
    assert completion.model_names("") == STORE_NAMES


def test_a_daemon_that_never_answers_costs_the_daemon_timeout_only(
    silent_daemon: socket.socket,
) -> None:
    start = time.monotonic()
    names = completion.model_names("")
    elapsed = time.monotonic() - start
    assert names == STORE_NAMES
    silent_daemon.settimeout(5)
    silent_daemon.accept()[0].close()  # the daemon was asked first
    # The bound is enforced by joins with timeouts; the slack is for a loaded machine.
    assert elapsed < completion.BUDGET + 0.15


def test_a_store_that_blocks_is_abandoned_within_the_budget(
    silent_daemon: socket.socket, tmp_path: Path
) -> None:
    index = tmp_path / "models" / "models.json"
    index.unlink()
    os.mkfifo(index)  # reading it blocks until a writer opens it
    try:
        start = time.monotonic()
        assert completion.model_names("") == []
        assert time.monotonic() - start < completion.BUDGET + 0.15
    finally:
        writer = os.open(index, os.O_WRONLY | os.O_NONBLOCK)  # lets the abandoned read end
        os.close(writer)


def test_a_completion_request_with_a_silent_daemon_still_answers(
    silent_daemon: socket.socket, tmp_path: Path
) -> None:
    """The whole round trip a shell makes, in a real process."""
    done = subprocess.run(
        [sys.executable, "-m", "dmr_cli"],
        env={**os.environ, cli.COMPLETE_VAR: "complete_bash", "_TYPER_COMPLETE_ARGS": "dmr rm "},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.splitlines() == STORE_NAMES
