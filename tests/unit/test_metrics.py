"""The metrics registry, the Prometheus text format, and merging runners' metrics, against
real Unix-socket HTTP servers standing in for runners."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dmr_cli.server import metrics as m
from dmr_cli.server.metrics import Counter, Family, Histogram, Metrics, Sample, encode, parse

# What llama-server's /metrics answers (tools/server), trimmed.
LLAMA_SERVER_METRICS = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 12
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 4
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 0
"""


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_counter_and_histogram_exposition() -> None:
    counter = Counter("dmr_requests_total", "Requests.", ("route", "status"))
    counter.inc("/v1/chat/completions", "200")
    counter.inc("/v1/chat/completions", "200")
    counter.inc("/v1/embeddings", "404")
    histogram = Histogram("dmr_ttfb_seconds", "TTFB.", ("route",), (0.1, 1))
    histogram.observe(0.05, "/v1/completions")
    histogram.observe(0.1, "/v1/completions")  # le is inclusive
    histogram.observe(7, "/v1/completions")
    assert encode([counter.family(), histogram.family()]) == (
        "# HELP dmr_requests_total Requests.\n"
        "# TYPE dmr_requests_total counter\n"
        'dmr_requests_total{route="/v1/chat/completions",status="200"} 2\n'
        'dmr_requests_total{route="/v1/embeddings",status="404"} 1\n'
        "# HELP dmr_ttfb_seconds TTFB.\n"
        "# TYPE dmr_ttfb_seconds histogram\n"
        'dmr_ttfb_seconds_bucket{route="/v1/completions",le="0.1"} 2\n'
        'dmr_ttfb_seconds_bucket{route="/v1/completions",le="1"} 2\n'
        'dmr_ttfb_seconds_bucket{route="/v1/completions",le="+Inf"} 3\n'
        'dmr_ttfb_seconds_sum{route="/v1/completions"} 7.15\n'
        'dmr_ttfb_seconds_count{route="/v1/completions"} 3\n'
    )


def test_fresh_metrics_expose_every_series_with_a_baseline() -> None:
    text = encode(Metrics().families())
    for reason in m.EVICTION_REASONS:
        assert f'dmr_runner_evictions_total{{reason="{reason}"}} 0\n' in text
    assert "dmr_pull_bytes_total 0\n" in text
    assert 'dmr_runner_load_seconds_bucket{le="+Inf"} 0\n' in text
    assert "dmr_runner_load_seconds_count 0\n" in text
    for name in ("dmr_requests_total", "dmr_runner_loads_total"):
        assert f"# TYPE {name} counter\n" in text
    assert "# TYPE dmr_time_to_first_byte_seconds histogram\n" in text


def test_recording_methods() -> None:
    metrics = Metrics()
    metrics.request_done("/v1/chat/completions", 200, 0.02)
    metrics.request_done("/v1/chat/completions", 500)  # no answer byte: no TTFB sample
    metrics.runner_loaded("llama.cpp", "completion", 1.5)
    metrics.runner_evicted("idle")
    metrics.pull_bytes(1000)
    metrics.pull_bytes(24)
    assert metrics.requests.value("/v1/chat/completions", "200") == 1
    assert metrics.requests.value("/v1/chat/completions", "500") == 1
    assert metrics.ttfb.count("/v1/chat/completions") == 1
    assert metrics.loads.value("llama.cpp", "completion") == 1
    assert metrics.load_seconds.count() == 1
    assert metrics.evictions.value("idle") == 1
    assert metrics.pulled.value() == 1024


def test_counters_are_exact_under_threads() -> None:
    metrics = Metrics()

    def work() -> None:
        for _ in range(5000):
            metrics.pull_bytes(1)
            metrics.request_done("/v1/completions", 200, 0.001)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert metrics.pulled.value() == 40000
    assert metrics.ttfb.count("/v1/completions") == 40000


def test_parse_llama_server_output_round_trips() -> None:
    families = parse(LLAMA_SERVER_METRICS)
    assert [(f.name, f.type) for f in families] == [
        ("llamacpp:prompt_tokens_total", "counter"),
        ("llamacpp:tokens_predicted_total", "counter"),
        ("llamacpp:requests_processing", "gauge"),
    ]
    assert families[0].help == "Number of prompt tokens processed."
    assert families[0].samples == [Sample("llamacpp:prompt_tokens_total", (), "12")]
    assert encode(families) == LLAMA_SERVER_METRICS


def test_parse_labels_escapes_timestamps_and_histograms() -> None:
    text = (
        "# HELP weird A \\\\ backslash\\nand a newline.\n"
        "# TYPE weird gauge\n"
        'weird{path="C:\\\\x",quote="say \\"hi\\"",nl="a\\nb",} 1.5e3 1700000000000\n'
        "# a plain comment\n"
        "# TYPE lat histogram\n"
        'lat_bucket{le="0.5"} 1\n'
        'lat_bucket{le="+Inf"} 2\n'
        "lat_sum 0.7\n"
        "lat_count 2\n"
        "orphan NaN\n"
        "not a metric line\n"
        'bad{x="unterminated} 1\n'
        "inf_value +Inf\n"
    )
    families = {f.name: f for f in parse(text)}
    assert set(families) == {"weird", "lat", "orphan", "inf_value"}
    weird = families["weird"]
    assert weird.help == "A \\ backslash\nand a newline."
    (sample,) = weird.samples
    assert dict(sample.labels) == {"path": "C:\\x", "quote": 'say "hi"', "nl": "a\nb"}
    assert (sample.value, sample.timestamp) == ("1.5e3", "1700000000000")
    assert [s.name for s in families["lat"].samples] == [
        "lat_bucket",
        "lat_bucket",
        "lat_sum",
        "lat_count",
    ]
    assert families["orphan"].type == "untyped"
    # Encoding and parsing again gives the same text (escapes survive).
    encoded = encode(families.values())
    assert encode(parse(encoded)) == encoded
    (again,) = {f.name: f for f in parse(encoded)}["weird"].samples
    assert dict(again.labels) == dict(sample.labels)


def test_openmetrics_style_counter_names_keep_their_samples() -> None:
    (family,) = parse("# TYPE jobs counter\njobs_total 3\njobs_created 1.7e9\n")
    assert family.name == "jobs"
    assert [s.name for s in family.samples] == ["jobs_total", "jobs_created"]


def test_relabel_and_merge_two_runners() -> None:
    merged: dict[str, Family] = {}
    for model, mode in (("ai/tiny", "completion"), ("ai/embed", "embedding")):
        labels = (("backend", "llama.cpp"), ("model", model), ("mode", mode))
        m.merge(merged, m.relabel(parse(LLAMA_SERVER_METRICS), labels))
    # A runner's own `model` label is replaced, not duplicated; `le` stays last.
    hist = parse('# TYPE h histogram\nh_bucket{model="x",le="1"} 1\nh_count 1\nh_sum 1\n')
    m.merge(merged, m.relabel(hist, (("backend", "b"), ("model", "y"), ("mode", "z"))))
    text = encode(merged.values())
    assert text.count("# TYPE llamacpp:prompt_tokens_total counter") == 1
    assert text.count("# HELP llamacpp:prompt_tokens_total") == 1
    assert (
        'llamacpp:prompt_tokens_total{backend="llama.cpp",mode="completion",model="ai/tiny"} 12\n'
        'llamacpp:prompt_tokens_total{backend="llama.cpp",mode="embedding",model="ai/embed"} 12\n'
    ) in text
    assert 'h_bucket{backend="b",mode="z",model="y",le="1"} 1\n' in text


# -- rendering with runners ---------------------------------------------------------------


def runner(
    socket: Path, ref: str, *, mode: str = "completion", embedded: bool = False
) -> SimpleNamespace:
    return SimpleNamespace(
        socket=socket,
        model_ref=ref,
        key=SimpleNamespace(backend="llama.cpp", mode=mode, model_id="sha256:" + "0" * 64),
        loading=False,
        stopping=False,
        embedded=embedded,
    )


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def unix_server(path: Path, handler: Handler) -> AsyncIterator[None]:
    server = await asyncio.start_unix_server(handler, str(path))
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


def answering(body: str, *, chunked: bool = False, status: int = 200) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        assert request.startswith(b"GET /metrics HTTP/1.1\r\n")
        data = body.encode()
        if chunked:
            half = len(data) // 2
            payload = b"".join(
                f"{len(part):x}\r\n".encode() + part + b"\r\n"
                for part in (data[:half], data[half:])
            )
            head = "Transfer-Encoding: chunked"
            data = payload + b"0\r\n\r\n"
        else:
            head = f"Content-Length: {len(data)}"
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\n{head}\r\n\r\n".encode())
        writer.write(data)
        await writer.drain()
        writer.close()

    return handle


def test_render_merges_runners_and_skips_embedded_and_failing_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sockets = [tmp_path / f"r{i}.sock" for i in range(3)]
    scheduler = SimpleNamespace(
        runners={
            "a": runner(sockets[0], "ai/tiny"),
            "b": runner(sockets[1], "ai/embed", mode="embedding"),
            "c": runner(sockets[2], "ai/broken"),
            "d": runner(tmp_path / "embedded.sock", "ai/embedded", embedded=True),
        }
    )
    metrics = Metrics()
    metrics.request_done("/v1/chat/completions", 200, 0.01)

    async def go() -> str:
        async with (
            unix_server(sockets[0], answering(LLAMA_SERVER_METRICS)),
            unix_server(sockets[1], answering(LLAMA_SERVER_METRICS, chunked=True)),
            unix_server(sockets[2], answering("nope", status=500)),
        ):
            result: str = await metrics.render(scheduler)
            return result

    with caplog.at_level(logging.WARNING, logger="dmr"):
        text = run(go())
    families = {f.name: f for f in parse(text)}
    assert families["dmr_requests_total"].samples[0].value == "1"
    tokens = families["llamacpp:prompt_tokens_total"]
    assert sorted(dict(s.labels)["model"] for s in tokens.samples) == ["ai/embed", "ai/tiny"]
    assert text.count("# TYPE llamacpp:prompt_tokens_total") == 1
    assert "ai/embedded" not in text and "ai/broken" not in text
    # The failing runner is reported once; the embedded one is skipped without a word.
    assert [r.getMessage() for r in caplog.records] == [
        "metrics of the runner for ai/broken: /metrics answered 500"
    ]
    assert "# No active runners" not in text


def test_render_without_runners_says_so() -> None:
    text = run(Metrics().render(SimpleNamespace(runners={})))
    assert text.endswith("# No active runners\n")
    assert "# TYPE dmr_requests_total counter\n" in text


def test_scrape_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m, "SCRAPE_TIMEOUT", 0.2)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async def go() -> None:
        async with unix_server(tmp_path / "slow.sock", silent):
            await m.scrape(tmp_path / "slow.sock")

    with pytest.raises(asyncio.TimeoutError):
        run(go())


def test_scrape_of_a_missing_socket_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(m.ScrapeError, match="cannot connect"):
        run(m.scrape(tmp_path / "gone.sock"))
