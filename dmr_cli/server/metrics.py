"""`/metrics`: dmr's own Prometheus series plus every runner's, merged (spec §9.1).

A small registry instead of `prometheus_client`: dmr needs labelled counters and histograms,
the text format, and a parser for what llama-server exports, which is a few hundred lines
without a global default registry, `_created` series or another dependency. Recording is a
lock and a dict update: it sits on the inference path, rendering does not.

Runner metrics are fetched from each loaded runner (llama-server runs with `--metrics`; the
embedded engine has none), labelled `backend`, `model` (the reference the runner was loaded
with) and `mode`, and merged by family name. Runners are taken from the scheduler's table,
which is keyed by model ID, so a runner loaded by tag is found (DMR's lookup compares a
reference with an ID and usually finds nothing).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from dmr_cli.server.http import text_error

log = logging.getLogger("dmr")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CONNECT_TIMEOUT = 5.0
SCRAPE_TIMEOUT = 10.0
SCRAPE_LIMIT = 16 * 1024 * 1024  # a runner's /metrics is a few KiB; refuse anything absurd
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
EVICTION_REASONS = ("idle", "slots", "memory", "unload", "configure", "crashed")
RUNNER_LABELS = ("backend", "model", "mode")
# Samples of a histogram or summary family carry these suffixes; counters may add `_total`
# to a family named without it (OpenMetrics style).
_SUFFIXES = {
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "counter": ("_total", "_created"),
}
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_HELP_ESCAPE = re.compile(r"\\([n\\])")
_LABEL_ESCAPES = {"n": "\n", "\\": "\\", '"': '"'}
_TYPES = ("counter", "gauge", "histogram", "summary", "untyped")

Labels = tuple[tuple[str, str], ...]


# -- the data model ---------------------------------------------------------------------


@dataclass
class Sample:
    name: str
    labels: Labels
    value: str  # kept as written: a runner's values pass through without float round trips
    timestamp: str | None = None


@dataclass
class Family:
    name: str
    type: str = "untyped"
    help: str = ""
    samples: list[Sample] = field(default_factory=list)

    def owns(self, sample_name: str) -> bool:
        if sample_name == self.name:
            return True
        suffix = sample_name[len(self.name) :] if sample_name.startswith(self.name) else ""
        return suffix in _SUFFIXES.get(self.type, ())


def format_value(value: float) -> str:
    """Go's `strconv.FormatFloat(v, 'g', -1, 64)` as Prometheus writes it: `1`, `0.25`,
    `+Inf`."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


# -- the registry -----------------------------------------------------------------------


class Counter:
    """A monotonically increasing value per label combination."""

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        initial: Iterable[Sequence[str]] = (),
    ) -> None:
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._lock = threading.Lock()
        # Unlabelled counters and known label values start at 0, so a rate() has a baseline.
        self._values: dict[tuple[str, ...], float] = {tuple(v): 0.0 for v in initial}
        if not self.labelnames:
            self._values[()] = 0.0

    def inc(self, *labelvalues: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labelvalues] = self._values.get(labelvalues, 0.0) + amount

    def value(self, *labelvalues: str) -> float:
        with self._lock:
            return self._values.get(labelvalues, 0.0)

    def family(self) -> Family:
        with self._lock:
            values = sorted(self._values.items())
        samples = [
            Sample(self.name, tuple(zip(self.labelnames, key, strict=True)), format_value(v))
            for key, v in values
        ]
        return Family(self.name, "counter", self.help, samples)


class Histogram:
    """Observations counted into cumulative buckets per label combination."""

    def __init__(
        self, name: str, help: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self.buckets = tuple(sorted(buckets))
        self._lock = threading.Lock()
        # Per label combination: per-bucket counts (the last one is +Inf), then the sum.
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        if not self.labelnames:
            self._series[()] = ([0] * (len(self.buckets) + 1), [0.0])

    def observe(self, value: float, *labelvalues: str) -> None:
        index = bisect.bisect_left(self.buckets, value)
        with self._lock:
            series = self._series.get(labelvalues)
            if series is None:
                series = self._series[labelvalues] = ([0] * (len(self.buckets) + 1), [0.0])
            series[0][index] += 1
            series[1][0] += value

    def count(self, *labelvalues: str) -> int:
        with self._lock:
            series = self._series.get(labelvalues)
            return sum(series[0]) if series else 0

    def family(self) -> Family:
        with self._lock:
            snapshot = sorted((k, (list(c), s[0])) for k, (c, s) in self._series.items())
        samples = []
        for key, (counts, total) in snapshot:
            labels = tuple(zip(self.labelnames, key, strict=True))
            cumulative = 0
            for bound, count in zip([*self.buckets, math.inf], counts, strict=True):
                cumulative += count
                le = (*labels, ("le", format_value(bound)))
                samples.append(Sample(f"{self.name}_bucket", le, str(cumulative)))
            samples.append(Sample(f"{self.name}_sum", labels, format_value(total)))
            samples.append(Sample(f"{self.name}_count", labels, str(cumulative)))
        return Family(self.name, "histogram", self.help, samples)


class Metrics:
    """dmr's own series. Every method is thread-safe and cheap enough for the hot path."""

    def __init__(self) -> None:
        self.requests = Counter(
            "dmr_requests_total",
            "Inference requests answered, by route and HTTP status.",
            ("route", "status"),
        )
        self.ttfb = Histogram(
            "dmr_time_to_first_byte_seconds",
            "Time from a request's arrival to the first byte of its answer (runner load included).",
            ("route",),
            TTFB_BUCKETS,
        )
        self.loads = Counter(
            "dmr_runner_loads_total", "Runners started and ready.", ("backend", "mode")
        )
        self.load_seconds = Histogram(
            "dmr_runner_load_seconds", "Time a runner took to become ready.", (), LOAD_BUCKETS
        )
        self.evictions = Counter(
            "dmr_runner_evictions_total",
            "Runners stopped, by reason.",
            ("reason",),
            initial=[(reason,) for reason in EVICTION_REASONS],
        )
        self.pulled = Counter("dmr_pull_bytes_total", "Bytes downloaded from registries.")

    def request_done(self, route: str, status: int, ttfb_seconds: float | None = None) -> None:
        self.requests.inc(route, str(status))
        if ttfb_seconds is not None:
            self.ttfb.observe(ttfb_seconds, route)

    def runner_loaded(self, backend: str, mode: str, seconds: float) -> None:
        self.loads.inc(backend, mode)
        self.load_seconds.observe(seconds)

    def runner_evicted(self, reason: str) -> None:
        """REASON: one of EVICTION_REASONS."""
        self.evictions.inc(reason)

    def pull_bytes(self, n: int) -> None:
        self.pulled.inc(amount=n)

    def families(self) -> list[Family]:
        return [
            m.family()
            for m in (
                self.requests,
                self.ttfb,
                self.loads,
                self.load_seconds,
                self.evictions,
                self.pulled,
            )
        ]

    async def render(self, scheduler: Any) -> str:
        """The whole exposition: dmr's series, then the runners' families merged."""
        runners = [
            r
            for r in sorted(scheduler.runners.values(), key=lambda r: (r.model_ref, r.key.mode))
            if not r.loading and not r.stopping and not r.embedded
        ]
        scraped = await asyncio.gather(*(scrape(r.socket) for r in runners), return_exceptions=True)
        merged = {family.name: family for family in self.families()}
        for runner, result in zip(runners, scraped, strict=True):
            if isinstance(result, BaseException):
                log.warning("metrics of the runner for %s: %s", runner.model_ref, result)
                continue
            labels = (
                ("backend", runner.key.backend),
                ("model", runner.model_ref),
                ("mode", runner.key.mode),
            )
            merge(merged, relabel(parse(result), labels))
        text = encode(merged.values())
        if not scheduler.runners:
            text += "# No active runners\n"
        return text


# -- the text format --------------------------------------------------------------------


def parse(text: str) -> list[Family]:
    """Prometheus text format 0.0.4 into families; lines that do not parse are skipped."""
    families: dict[str, Family] = {}
    current: Family | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line[1:].strip().split(None, 2)
            if len(parts) < 2 or parts[0] not in ("HELP", "TYPE"):
                continue  # a plain comment
            name = parts[1]
            current = families.setdefault(name, Family(name))
            rest = parts[2] if len(parts) > 2 else ""
            if parts[0] == "HELP":
                current.help = _unescape_help(rest)
            else:
                kind = rest.strip().lower()
                current.type = kind if kind in _TYPES else "untyped"
            continue
        try:
            sample = _parse_sample(line)
        except ValueError:
            log.debug("skipping a metrics line that does not parse: %r", line)
            continue
        if current is None or not current.owns(sample.name):
            current = families.setdefault(sample.name, Family(sample.name))
        current.samples.append(sample)
    return list(families.values())


def _parse_sample(line: str) -> Sample:
    match = _NAME.match(line)
    if match is None:
        raise ValueError("no metric name")
    name, pos = match.group(), match.end()
    labels: list[tuple[str, str]] = []
    if pos < len(line) and line[pos] == "{":
        labels, pos = _parse_labels(line, pos + 1)
    fields = line[pos:].split()
    if not fields or len(fields) > 2 or (pos < len(line) and not line[pos].isspace()):
        raise ValueError("bad value")
    float(fields[0])  # validates (`+Inf`, `NaN` included); the text itself is kept
    timestamp = fields[1] if len(fields) > 1 else None
    if timestamp is not None:
        int(timestamp)
    return Sample(name, tuple(labels), fields[0], timestamp)


def _parse_labels(line: str, pos: int) -> tuple[list[tuple[str, str]], int]:
    labels: list[tuple[str, str]] = []
    while True:
        while pos < len(line) and line[pos] in " \t,":
            pos += 1
        if pos < len(line) and line[pos] == "}":
            return labels, pos + 1
        match = _LABEL_NAME.match(line, pos)
        if match is None:
            raise ValueError("bad label name")
        pos = match.end()
        while pos < len(line) and line[pos] in " \t":
            pos += 1
        if line[pos : pos + 2] != '="':
            raise ValueError("bad label")
        pos += 2
        value: list[str] = []
        while True:
            if pos >= len(line):
                raise ValueError("unterminated label value")
            char = line[pos]
            if char == "\\" and pos + 1 < len(line):
                escaped = line[pos + 1]
                value.append(_LABEL_ESCAPES.get(escaped, "\\" + escaped))
                pos += 2
            elif char == '"':
                pos += 1
                break
            else:
                value.append(char)
                pos += 1
        labels.append((match.group(), "".join(value)))


def _unescape_help(text: str) -> str:
    """HELP text escapes only backslash and newline."""
    return _HELP_ESCAPE.sub(lambda m: "\n" if m[1] == "n" else "\\", text)


def relabel(families: list[Family], extra: Labels) -> list[Family]:
    """Give every sample EXTRA's labels (replacing labels of the same names)."""
    names = {name for name, _ in extra}
    for family in families:
        for sample in family.samples:
            sample.labels = (*(kv for kv in sample.labels if kv[0] not in names), *extra)
    return families


def merge(into: dict[str, Family], families: Iterable[Family]) -> None:
    """Add FAMILIES' samples to INTO by family name; the first HELP and TYPE seen win."""
    for family in families:
        existing = into.get(family.name)
        if existing is None:
            into[family.name] = Family(family.name, family.type, family.help, list(family.samples))
        else:
            existing.samples.extend(family.samples)
            existing.help = existing.help or family.help


def _label_order(item: tuple[str, str]) -> tuple[bool, str]:
    # Sorted by name for a stable output, with `le` / `quantile` last as Prometheus writes.
    return item[0] in ("le", "quantile"), item[0]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def encode(families: Iterable[Family]) -> str:
    lines: list[str] = []
    for family in families:
        if family.help:
            help_text = family.help.replace("\\", "\\\\").replace("\n", "\\n")
            lines.append(f"# HELP {family.name} {help_text}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for sample in family.samples:
            labels = ",".join(
                f'{name}="{_escape_label(value)}"'
                for name, value in sorted(sample.labels, key=_label_order)
            )
            line = f"{sample.name}{{{labels}}}" if labels else sample.name
            line += f" {sample.value}"
            lines.append(f"{line} {sample.timestamp}" if sample.timestamp else line)
    return "\n".join(lines) + "\n" if lines else ""


# -- fetching a runner's metrics ----------------------------------------------------------


class ScrapeError(Exception):
    pass


async def scrape(socket: Path, path: str = "/metrics") -> str:
    """GET PATH over the runner's Unix socket (5 s to connect, 10 s in all)."""
    return await asyncio.wait_for(_get(socket, path), SCRAPE_TIMEOUT)


async def _get(socket: Path, path: str) -> str:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(socket)), CONNECT_TIMEOUT
        )
    except OSError as exc:
        raise ScrapeError(f"cannot connect: {exc.strerror or exc}") from exc
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n"
            "Connection: close\r\n\r\n".encode("latin-1")
        )
        raw = bytearray()
        while chunk := await reader.read(65536):
            raw += chunk
            if len(raw) > SCRAPE_LIMIT:
                raise ScrapeError(f"answer larger than {SCRAPE_LIMIT} bytes")
    finally:
        writer.close()
    head, _, body = bytes(raw).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError) as exc:
        raise ScrapeError("not an HTTP answer") from exc
    if status != 200:
        raise ScrapeError(f"{path} answered {status}")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:])
    }
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    elif headers.get("content-length", "").isdigit():
        body = body[: int(headers["content-length"])]
    return body.decode("utf-8", "replace")


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while (end := data.find(b"\r\n", pos)) >= 0:
        size = int(data[pos:end].split(b";", 1)[0] or b"0", 16)
        if size == 0:
            break
        out += data[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2
    return bytes(out)


# -- the route ----------------------------------------------------------------------------


async def metrics_route(request: Request) -> Response:
    """GET /metrics (mount it only when DISABLE_METRICS is not set)."""
    if request.method != "GET":
        return text_error(405, "Method Not Allowed")
    state = request.app.state.dmr
    metrics: Metrics = state.metrics
    text = await metrics.render(state.scheduler)
    return Response(text, media_type=CONTENT_TYPE)
