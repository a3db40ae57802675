"""`dmr bench MODEL`: streaming throughput and time to first token at several levels of
concurrency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from dmr_cli import chat, client, render
from dmr_cli.commands._params import Argument, Option, usage_error
from dmr_cli.errors import DmrError

DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
DEFAULT_MAX_TOKENS = 128
HEADERS = (
    "CONCURRENCY",
    "REQUESTS",
    "ERRORS",
    "TOKENS/S",
    "STREAM TOKENS/S",
    "TTFT P50",
    "TTFT P95",
)


@dataclass(frozen=True)
class Sample:
    """One request: perf_counter times, and the tokens it generated."""

    started: float
    ended: float
    first_token: float | None
    tokens: int
    error: str | None = None


@dataclass(frozen=True)
class Level:
    """What one concurrency level measured (rates in tokens/s, times in seconds)."""

    concurrency: int
    requests: int
    errors: int
    tokens: int
    elapsed: float
    tokens_per_second: float
    stream_tokens_per_second: float | None
    ttft_p50: float | None
    ttft_p95: float | None
    first_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        def ms(seconds: float | None) -> float | None:
            return None if seconds is None else round(seconds * 1000, 3)

        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "tokens": self.tokens,
            "elapsed_s": round(self.elapsed, 3),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "stream_tokens_per_second": (
                None
                if self.stream_tokens_per_second is None
                else round(self.stream_tokens_per_second, 3)
            ),
            "ttft_p50_ms": ms(self.ttft_p50),
            "ttft_p95_ms": ms(self.ttft_p95),
        }


def percentile(values: Sequence[float], q: float) -> float:
    """The Q-th percentile (0-100) with linear interpolation between ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(concurrency: int, samples: Sequence[Sample], elapsed: float) -> Level:
    """A level's figures. Aggregate rate: all generated tokens over the level's wall time.
    Per-stream rate: each request's tokens after its first, over the time after its first
    token (decoding speed, TTFT excluded), averaged over requests."""
    ok = [s for s in samples if s.error is None]
    failed = [s for s in samples if s.error is not None]
    tokens = sum(s.tokens for s in ok)
    ttfts = [s.first_token - s.started for s in ok if s.first_token is not None]
    rates = [
        (s.tokens - 1) / (s.ended - s.first_token)
        for s in ok
        if s.first_token is not None and s.tokens > 1 and s.ended > s.first_token
    ]
    return Level(
        concurrency=concurrency,
        requests=len(ok),
        errors=len(failed),
        tokens=tokens,
        elapsed=elapsed,
        tokens_per_second=tokens / elapsed if elapsed > 0 else 0.0,
        stream_tokens_per_second=sum(rates) / len(rates) if rates else None,
        ttft_p50=percentile(ttfts, 50) if ttfts else None,
        ttft_p95=percentile(ttfts, 95) if ttfts else None,
        first_error=failed[0].error if failed else None,
    )


def count_chunk(chunk: Mapping[str, Any]) -> tuple[int, int | None]:
    """(deltas with text in CHUNK, completion tokens its usage reports or None)."""
    usage = chunk.get("usage")
    reported = usage.get("completion_tokens") if isinstance(usage, dict) else None
    texts = sum(
        1
        for choice in chunk.get("choices") or []
        if (choice.get("delta") or {}).get("content")
        or (choice.get("delta") or {}).get("reasoning_content")
    )
    return texts, reported if isinstance(reported, int) else None


async def _request(http: client.AsyncChat, body: Mapping[str, Any]) -> Sample:
    started = time.perf_counter()
    first: float | None = None
    counted, reported = 0, None
    try:
        async for chunk in http.stream(body):
            texts, usage_tokens = count_chunk(chunk)
            if texts and first is None:
                first = time.perf_counter()
            counted += texts
            reported = usage_tokens if usage_tokens is not None else reported
    except DmrError as e:
        return Sample(started, time.perf_counter(), first, 0, e.message)
    tokens = reported if reported is not None else counted
    return Sample(started, time.perf_counter(), first, tokens)


async def _timed(http: client.AsyncChat, body: Mapping[str, Any], timeout: float) -> Sample:
    started = time.perf_counter()
    try:
        return await asyncio.wait_for(_request(http, body), timeout)
    except asyncio.TimeoutError:
        return Sample(started, time.perf_counter(), None, 0, f"timed out after {timeout:g} s")


async def _level(
    http: client.AsyncChat,
    body: Mapping[str, Any],
    concurrency: int,
    duration: float,
    timeout: float,
) -> Level:
    samples: list[Sample] = []
    start = time.perf_counter()
    deadline = start + duration

    async def worker() -> None:
        # Requests start until the deadline and run to their end; a worker whose request
        # failed stops rather than hammer a broken runner.
        while time.perf_counter() < deadline:
            sample = await _timed(http, body, timeout)
            samples.append(sample)
            if sample.error is not None:
                return

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(concurrency, samples, time.perf_counter() - start)


async def _bench(
    body: Mapping[str, Any], levels: Sequence[int], duration: float, timeout: float
) -> list[Level]:
    async with client.AsyncChat(timeout=timeout, connections=max(levels)) as http:
        render.err(f"Warming up {body['model']}...")
        warm = await _timed(http, body, timeout)
        if warm.error is not None:
            raise DmrError(f"Failed to benchmark model: {warm.error}")
        results = []
        for concurrency in levels:
            render.err(f"Concurrency {concurrency}: running for {duration:g} s...")
            results.append(await _level(http, body, concurrency, duration, timeout))
    return results


def parse_levels(text: str) -> list[int]:
    """`1,2,4,8` → [1, 2, 4, 8]; ValueError unless every level is a positive integer."""
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or min(levels) < 1:
        raise ValueError(text)
    return levels


def _seconds(text: str, option: str) -> float:
    from dmr_cli.runtime.flags import parse_go_duration

    try:
        seconds = float(text) if text.replace(".", "", 1).isdigit() else parse_go_duration(text)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise usage_error(f"expected a positive duration such as 30s or 2m, got {text!r}", option)
    return seconds


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}ms"


def bench_table(results: Sequence[Level]) -> str:
    rows = [
        [
            str(r.concurrency),
            str(r.requests),
            str(r.errors),
            _rate(r.tokens_per_second),
            _rate(r.stream_tokens_per_second),
            _ms(r.ttft_p50),
            _ms(r.ttft_p95),
        ]
        for r in results
    ]
    return render.table(HEADERS, rows)


def bench(
    model: Annotated[str, Argument(metavar="MODEL", help="Model to benchmark")],
    concurrency: Annotated[
        str, Option("--concurrency", help="Comma-separated numbers of concurrent requests")
    ] = "1,2,4,8",
    duration: Annotated[str, Option("--duration", help="How long to run each level")] = "30s",
    prompt: Annotated[str, Option("--prompt", help="Prompt to send")] = DEFAULT_PROMPT,
    max_tokens: Annotated[
        int, Option("--max-tokens", min=1, help="Maximum tokens to generate per request")
    ] = DEFAULT_MAX_TOKENS,
    json_output: Annotated[bool, Option("--json", help="Print the results as JSON")] = False,
    timeout: Annotated[str, Option("--timeout", help="Timeout of each request")] = "5m",
    prompt_cache: Annotated[
        bool,
        Option(
            "--prompt-cache/--no-prompt-cache",
            help="Let llama-server reuse the prompt it evaluated before (off: every request "
            "evaluates it, and TTFT includes that; the embedded engine always reuses it)",
        ),
    ] = True,
) -> None:
    """Measure tokens per second and time to first token at each concurrency level.

    Each level keeps that many streaming chat requests in flight for the duration, after one
    warm-up request. TOKENS/S counts every generated token over the level's wall time;
    STREAM TOKENS/S is one stream's decoding speed (tokens after the first, over the time
    after the first), averaged; TTFT is the time to the first generated token.

    Every request sends the same prompt, as DMR's bench does, so the runner evaluates it once
    per slot and later requests find it cached: TTFT is then that of a repeated prompt. With
    --no-prompt-cache each request evaluates the whole prompt, as a new conversation would.
    """
    try:
        levels = parse_levels(concurrency)
    except ValueError:
        raise usage_error(
            f"expected positive integers separated by commas, got {concurrency!r}",
            "'--concurrency'",
        ) from None
    seconds = _seconds(duration, "'--duration'")
    limit = _seconds(timeout, "'--timeout'")
    chat.ensure_local(model)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if not prompt_cache:
        body["cache_prompt"] = False  # llama-server's per-request switch
    results = asyncio.run(_bench(body, levels, seconds, limit))
    for result in results:
        if result.first_error:
            render.err(f"Warning: concurrency {result.concurrency}: {result.first_error}")
    if json_output:
        render.out(
            render.to_json(
                {
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "prompt_cache": prompt_cache,
                    "duration_s": seconds,
                    "results": [r.to_json() for r in results],
                }
            )
        )
    else:
        render.out(bench_table(results))
