"""`dmr bench`: its arithmetic on hand-made samples, then the command against the real
daemon and the native runner."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dmr_cli.commands.bench import (
    DEFAULT_PROMPT,
    Sample,
    count_chunk,
    parse_levels,
    percentile,
    summarize,
)
from tests.helpers.daemon import Daemon, start_daemon
from tests.helpers.gguf_factory import make_tiny_llama

# -- arithmetic ---------------------------------------------------------------------------


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)


def test_summarize_a_level() -> None:
    samples = [
        # started, ended, first token, tokens
        Sample(0.0, 1.0, 0.2, 9),  # 8 tokens after the first in 0.8 s: 10 tokens/s
        Sample(0.5, 2.5, 0.6, 21),  # 20 in 1.9 s
        Sample(1.0, 1.1, None, 0, "runner died"),
    ]
    level = summarize(2, samples, elapsed=2.5)
    assert (level.concurrency, level.requests, level.errors, level.tokens) == (2, 2, 1, 30)
    assert level.tokens_per_second == pytest.approx(12.0)
    assert level.stream_tokens_per_second == pytest.approx((10 + 20 / 1.9) / 2)
    assert level.ttft_p50 == pytest.approx(0.15)
    assert level.ttft_p95 == pytest.approx(0.1 + 0.1 * 0.95)
    assert level.first_error == "runner died"
    figures = level.to_json()
    assert figures["ttft_p50_ms"] == pytest.approx(150.0)
    assert figures["tokens_per_second"] == 12.0


def test_summarize_a_level_where_everything_failed() -> None:
    level = summarize(1, [Sample(0.0, 0.1, None, 0, "boom")], elapsed=0.1)
    assert level.requests == 0 and level.errors == 1 and level.tokens_per_second == 0
    assert level.ttft_p50 is None and level.stream_tokens_per_second is None


def test_tokens_come_from_usage_or_counted_deltas() -> None:
    assert count_chunk({"choices": [{"delta": {"content": "a"}}]}) == (1, None)
    assert count_chunk({"choices": [{"delta": {"reasoning_content": "hm"}}]}) == (1, None)
    assert count_chunk({"choices": [{"delta": {"role": "assistant"}}]}) == (0, None)
    assert count_chunk({"choices": [], "usage": {"completion_tokens": 7}}) == (0, 7)


def test_concurrency_levels() -> None:
    assert parse_levels("1,2,4,8") == [1, 2, 4, 8]
    assert parse_levels(" 3 ") == [3]
    for bad in ("", "0", "1,-2", "a", "1;2"):
        with pytest.raises(ValueError):
            parse_levels(bad)


# -- the command --------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path, native_llama_server: Path) -> Iterator[Daemon]:
    daemon = start_daemon(
        tmp_path / "home",
        LLAMA_SERVER_PATH=str(native_llama_server),
        DMR_RUNNER_DIR=str(tmp_path / "no-runners"),
    )
    result = daemon.cli("package", "--gguf", str(make_tiny_llama(tmp_path / "t.gguf")), "ai/tiny")
    assert result.returncode == 0, result.stderr
    yield daemon
    daemon.stop()


def test_bench_reports_each_level_as_json(served: Daemon) -> None:
    result = served.cli(
        "bench", "ai/tiny", "--concurrency", "1,2", "--duration", "2s", "--max-tokens", "16",
        "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == "ai/tiny" and report["max_tokens"] == 16
    assert [level["concurrency"] for level in report["results"]] == [1, 2]
    for level in report["results"]:
        assert level["errors"] == 0
        assert level["requests"] >= level["concurrency"]
        # llama-server reports usage: every request generated at most --max-tokens.
        assert 0 < level["tokens"] <= 16 * level["requests"]
        assert level["elapsed_s"] >= 2.0
        assert level["tokens_per_second"] == pytest.approx(
            level["tokens"] / level["elapsed_s"], rel=1e-2
        )
        assert 0 < level["ttft_p50_ms"] <= level["ttft_p95_ms"] < level["elapsed_s"] * 1000
        assert level["stream_tokens_per_second"] > 0
    assert "Warming up ai/tiny..." in result.stderr


def test_bench_table_and_bad_options(served: Daemon) -> None:
    result = served.cli(
        "bench", "ai/tiny", "--concurrency", "2", "--duration", "1s", "--max-tokens", "8"
    )
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == [
        "CONCURRENCY", "REQUESTS", "ERRORS", "TOKENS/S", "STREAM", "TOKENS/S", "TTFT", "P50",
        "TTFT", "P95",
    ]  # fmt: skip
    cells = row.split()
    assert cells[0] == "2" and int(cells[1]) >= 2 and cells[2] == "0"
    assert float(cells[3]) > 0 and cells[5].endswith("ms")

    for option, value in (("--concurrency", "0"), ("--duration", "soon"), ("--timeout", "-1s")):
        bad = served.cli("bench", "ai/tiny", option, value)
        assert bad.returncode == 2, bad.stderr
        assert option in bad.stderr


def prompt_tokens_evaluated(daemon: Daemon) -> float:
    """The runner's own count of prompt tokens it evaluated (cached ones are not)."""
    metrics = httpx.get(f"{daemon.url}/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("llamacpp:prompt_tokens_total{")
    )


def test_no_prompt_cache_makes_every_request_evaluate_its_prompt(served: Daemon) -> None:
    answer = httpx.post(
        f"{served.url}/engines/v1/chat/completions",
        json={"model": "ai/tiny", "messages": [{"role": "user", "content": DEFAULT_PROMPT}],
              "max_tokens": 1},
        timeout=60,
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    prompt = answer.json()["usage"]["prompt_tokens"]
    evaluated = {}
    for flag in ("--prompt-cache", "--no-prompt-cache"):
        before = prompt_tokens_evaluated(served)
        result = served.cli(
            "bench", "ai/tiny", "--concurrency", "1", "--duration", "1s", "--max-tokens", "4",
            "--json", flag,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["prompt_cache"] is (flag == "--prompt-cache")
        requests = report["results"][0]["requests"] + 1  # and the warm-up
        assert requests >= 3
        evaluated[flag] = (prompt_tokens_evaluated(served) - before, prompt * requests)
    spent, whole = evaluated["--no-prompt-cache"]
    assert spent == whole  # every request evaluated the whole prompt
    spent, whole = evaluated["--prompt-cache"]
    assert spent < whole / 2  # the runner found it cached
