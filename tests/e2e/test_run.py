"""`dmr run` driven as a person drives it, against the real daemon and real runners: one-shot
in a pipe, piped stdin, `--detach`, pulling a missing model from a real registry, and the
interactive chat under a pseudo-terminal (pexpect), including Ctrl-C in the middle of a
stream.

Answers of the generated models are random text, so what the tests compare is what the
runner itself reports: the text of the same greedy request made directly, and the prompt
token counts of the usage line, which grow with history, system message and included files.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pexpect  # type: ignore[import-untyped]
import pytest

from tests.helpers.daemon import Daemon, start_daemon
from tests.helpers.gguf_factory import make_slow_llama, make_tiny_llama
from tests.helpers.registry import RunningRegistry

REPO = Path(__file__).resolve().parents[2]
USAGE = re.compile(r"Token usage: (\d+) prompt \+ (\d+) completion = (\d+) total")


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def usage(text: str) -> tuple[int, int, int]:
    found = USAGE.search(text)
    assert found, f"no usage line in {text!r}"
    p, c, t = (int(g) for g in found.groups())
    return p, c, t


def ps(daemon: Daemon) -> list[dict[str, Any]]:
    return list(httpx.get(daemon.url + "/engines/ps", timeout=10).json())


def runner_idle(daemon: Daemon, model: str) -> bool:
    entries = [e for e in ps(daemon) if e["model_name"] == model]
    return bool(entries) and not entries[0].get("in_use") and not entries[0].get("loading")


@pytest.fixture
def native_env(native_llama_server: Path, tmp_path: Path) -> dict[str, str]:
    return {
        "LLAMA_SERVER_PATH": str(native_llama_server),
        "DMR_RUNNER_DIR": str(tmp_path / "no-runners"),
    }


@pytest.fixture
def served(tmp_path: Path, native_env: dict[str, str]) -> Iterator[Daemon]:
    """A daemon with the native runner and the tiny model as ai/tiny, whose answers stop
    after 32 tokens (llama-server's `-n`, a default for requests that set no max_tokens)."""
    daemon = start_daemon(tmp_path / "home", **native_env)
    ok(daemon.cli("package", "--gguf", str(make_tiny_llama(tmp_path / "tiny.gguf")), "ai/tiny"))
    ok(daemon.cli("configure", "ai/tiny", "--", "-n", "32"))
    yield daemon
    daemon.stop()


def spawn_chat(daemon: Daemon, model: str, cwd: Path) -> pexpect.spawn:
    # cwd is where @file paths start; PYTHONPATH keeps this checkout's dmr_cli importable.
    env = {**daemon.env, "TERM": "xterm", "PYTHONPATH": str(REPO)}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "dmr_cli", "run", model],
        env=env,
        cwd=str(cwd),
        encoding="utf-8",
        codec_errors="replace",
        timeout=60,
        dimensions=(50, 200),
    )
    child.expect_exact("> ")
    return child


def ask(child: pexpect.spawn, text: str) -> tuple[int, int, int]:
    """Send one line and wait for the answer's usage line and the next prompt."""
    child.sendline(text)
    child.expect(USAGE)
    counts = (int(child.match.group(1)), int(child.match.group(2)), int(child.match.group(3)))
    child.expect_exact("> ")
    return counts


# -- one-shot -----------------------------------------------------------------------------


def test_one_shot_in_a_pipe_prints_exactly_the_answer(served: Daemon) -> None:
    # Greedy sampling makes the answer reproducible, so the direct request below gives the
    # text `dmr run` must print.
    ok(served.cli("configure", "ai/tiny", "--", "-n", "32", "--temp", "0"))
    direct = httpx.post(
        served.url + "/engines/v1/chat/completions",
        json={"model": "ai/tiny", "messages": [{"role": "user", "content": "hello there"}]},
        timeout=120,
    ).json()
    answer = direct["choices"][0]["message"]["content"]
    expected = direct["usage"]

    result = served.cli("run", "ai/tiny", "hello", "there", input="")
    assert result.returncode == 0, result.stderr
    assert result.stdout == answer + "\n"
    assert result.stderr == (
        f"Token usage: {expected['prompt_tokens']} prompt + "
        f"{expected['completion_tokens']} completion = {expected['total_tokens']} total\n"
    )


def test_piped_stdin_is_appended_to_the_prompt(served: Daemon) -> None:
    alone = served.cli("run", "--debug", "ai/tiny", "summarise", input="")
    assert alone.returncode == 0, alone.stderr
    assert "Running model ai/tiny with prompt summarise\n" in alone.stderr

    piped = served.cli(
        "run", "--debug", "ai/tiny", "summarise", input="the tiny model is a test model\n"
    )
    assert piped.returncode == 0, piped.stderr
    assert (
        "Running model ai/tiny with prompt summarise\n\nthe tiny model is a test model\n"
        in piped.stderr
    )
    assert usage(piped.stderr)[0] > usage(alone.stderr)[0]  # the runner saw the longer prompt

    only_stdin = served.cli("run", "--debug", "ai/tiny", input="hello world\n")
    assert only_stdin.returncode == 0, only_stdin.stderr
    assert "with prompt hello world\n" in only_stdin.stderr

    empty = served.cli("run", "ai/tiny", input=" \n")
    assert empty.returncode == 1
    assert "nothing to ask" in empty.stderr and empty.stdout == ""


def test_detach_loads_the_model_and_leaves_it_loaded(served: Daemon) -> None:
    # The fixture's configure preloaded the model (spec §2.7): start from nothing loaded.
    wait_for(lambda: runner_idle(served, "ai/tiny"))
    httpx.post(served.url + "/engines/unload", json={"all": True}, timeout=10)
    wait_for(lambda: ps(served) == [])
    result = served.cli("run", "--detach", "ai/tiny", input="not read")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    (entry,) = ps(served)
    assert entry["model_name"] == "ai/tiny" and entry["mode"] == "completion"
    assert not entry.get("loading") and not entry.get("in_use")


def test_a_missing_model_is_pulled_first(served: Daemon, registry: RunningRegistry) -> None:
    ref = f"{registry.host}/ai/tiny:v1"
    ok(served.cli("package", "--gguf", str(served.home.parent / "tiny.gguf"), "--push", ref))
    assert httpx.get(f"{served.url}/models/{ref}", timeout=10).status_code == 404

    result = served.cli("run", ref, "hi", input="")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(
        f"Unable to find model '{ref}' locally. Pulling from the server.\n"
    )
    assert "Model pulled successfully\n" in result.stderr
    assert "Unable to find" not in result.stdout and result.stdout.endswith("\n")
    usage(result.stderr)
    assert ref in {t for m in json.loads(ok(served.cli("ls", "--json"))) for t in m["tags"]}

    again = served.cli("run", ref, "hi", input="")
    assert again.returncode == 0 and "Unable to find" not in again.stderr


def test_a_model_that_exists_nowhere_fails_cleanly(
    served: Daemon, registry: RunningRegistry
) -> None:
    ref = f"{registry.host}/ai/nothing:v1"
    result = served.cli("run", ref, "hi", input="")
    assert result.returncode != 0
    assert result.stdout == ""
    assert "Failed to pull model" in result.stderr


def test_one_shot_on_the_embedded_engine(tmp_path: Path) -> None:
    path = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "llama-server").exists()
    )
    daemon = start_daemon(tmp_path / "home", DMR_RUNNER_DIR=str(tmp_path / "none"), PATH=path)
    try:
        ok(daemon.cli("package", "--gguf", str(make_tiny_llama(tmp_path / "t.gguf")), "ai/tiny"))
        # llama-cpp-python streams this model slowly: a small context keeps the answer short.
        ok(daemon.cli("configure", "--context-size", "40", "ai/tiny"))
        result = daemon.cli("run", "ai/tiny", "hello", input="")
        assert result.returncode == 0, result.stderr
        assert result.stdout.endswith("\n") and len(result.stdout) > 1
        assert "\x1b[" not in result.stderr
    finally:
        daemon.stop()


# -- interactive --------------------------------------------------------------------------


def test_interactive_chat(served: Daemon, tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "chat.gguf", context_length=2048)
    ok(served.cli("package", "--gguf", str(model), "ai/chat"))
    # Short answers (llama-server's default n_predict) keep the history within the context.
    ok(served.cli("configure", "ai/chat", "--", "-n", "16"))
    (tmp_path / "notes.txt").write_text(" ".join(["hello world the tiny model"] * 10))
    child = spawn_chat(served, "ai/chat", tmp_path)
    wait_for(lambda: runner_idle(served, "ai/chat"))  # loaded while nothing was typed yet

    child.sendline('"""Summarise this:')
    child.expect_exact(". ")
    child.sendline("first line")
    child.expect_exact(". ")
    child.sendline('last line"""')
    child.expect(USAGE)
    block_prompt, completion, _ = (int(g) for g in child.match.groups())
    assert completion <= 16
    child.expect_exact("> ")

    child.sendline("/set system You are a terse assistant.")
    child.expect_exact("Set system message.")
    child.expect_exact("> ")
    # The history (block and answer) and the system message go with the next message.
    second_prompt, _, _ = ask(child, "hi")
    assert second_prompt > block_prompt + 8

    child.sendline("/set system")
    child.expect_exact("Cleared system message.")
    child.expect_exact("> ")
    without_file, _, _ = ask(child, "notes")
    with_file, _, _ = ask(child, "@notes.txt")
    assert with_file > without_file + 50  # the file's 50 words were sent

    child.sendline("/?")
    child.expect_exact("Available Commands:")
    child.expect_exact("> ")
    child.sendline("/nope")
    child.expect_exact("Unknown command '/nope'. Type /? for help")
    child.expect_exact("> ")

    child.sendline("/set num_ctx 128")
    child.expect_exact("Set num_ctx to 128")
    child.expect_exact("> ")
    (config,) = httpx.get(
        served.url + "/engines/_configure", params={"model": "ai/chat"}, timeout=10
    ).json()
    assert config["Config"]["context-size"] == 128

    child.send("a draft")
    child.expect_exact("a draft")
    child.sendintr()  # drops the line
    child.expect_exact("> ")
    assert "Use Ctrl" not in child.before
    child.sendintr()  # on an empty line
    child.expect_exact("Use Ctrl + d or /bye to exit.")
    child.expect_exact("> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = (served.home / "state" / "history").read_text()
    assert "/set system You are a terse assistant." in history and "@notes.txt" in history


@pytest.fixture
def endless(served: Daemon, tmp_path: Path) -> str:
    """A model slow enough to interrupt, told to never stop (`--ignore-eos`)."""
    slow = make_slow_llama(tmp_path / "slow.gguf")
    ok(served.cli("package", "--gguf", str(slow), "ai/slow"))
    ok(served.cli("configure", "ai/slow", "--", "--ignore-eos"))
    return "ai/slow"


def test_ctrl_c_stops_a_generation_and_the_chat_goes_on(
    served: Daemon, endless: str, tmp_path: Path
) -> None:
    child = spawn_chat(served, endless, tmp_path)
    child.sendline("tell me a long story")
    child.expect_exact("tell me a long story\r\n")  # the terminal's echo
    child.expect(r"\S[\s\S]{60}")  # the answer is streaming
    assert not runner_idle(served, endless)
    child.sendintr()
    child.expect_exact("> ")
    wait_for(lambda: runner_idle(served, endless))  # the runner stopped generating

    # A smaller context bounds the next (never-ending) answer; the chat still works.
    child.sendline("/set num_ctx 256")
    child.expect_exact("Set num_ctx to 256")
    child.expect_exact("> ")
    _, _, total = ask(child, "hi")
    assert total <= 256
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_in_a_pipe_stops_the_stream(served: Daemon, endless: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "dmr_cli", "run", endless, "tell me a long story"],
        env=served.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        # Text arrives while the process is still generating: it streams, not buffers.
        first = os.read(process.stdout.fileno(), 4096)
        assert first
        assert process.poll() is None
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130
    finally:
        process.kill()
        process.wait()
    wait_for(lambda: runner_idle(served, endless))
