"""Everything the CLI writes: DMR-style tables, JSON, sizes, durations and progress.

The only module that imports rich, and only inside the TTY progress display: tables are plain
string formatting (DMR's tablewriter style needs nothing more), so `dmr ls` never pays for rich.
Results go to stdout; progress, notices and warnings go to stderr.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

_DECIMAL_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")
# Plain-mode progress lines: at most one per interval, plus the final one.
PLAIN_PROGRESS_INTERVAL = 1.0

# -- primitives ---------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """DMR's table: no borders, upper-case header, left aligned, every cell + two spaces."""
    lines = [list(headers), *(list(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "".join(
        "".join(cell.ljust(width) + "  " for cell, width in zip(line, widths, strict=True)) + "\n"
        for line in lines
    )


def to_json(value: Any) -> str:
    """DMR's JSON output: 4-space indent, no HTML or non-ASCII escaping, trailing newline."""
    return json.dumps(value, indent=4, ensure_ascii=False) + "\n"


def human_size(size: float) -> str:
    """go-units `CustomSize("%.2f%s", size, 1000, ...)`: `12.35MB`, `1.23GB`."""
    i = 0
    while size >= 1000 and i < len(_DECIMAL_UNITS) - 1:
        size /= 1000
        i += 1
    return f"{size:.2f}{_DECIMAL_UNITS[i]}"


def human_duration(seconds: float) -> str:
    """go-units `HumanDuration` (used for CREATED: `3 months`, `About an hour`, ...)."""
    secs = int(seconds)
    if secs < 1:
        return "Less than a second"
    if secs == 1:
        return "1 second"
    if secs < 60:
        return f"{secs} seconds"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


def out(text: str) -> None:
    """Write a result to stdout, ending it with a newline (nothing at all for "")."""
    sys.stdout.write(text if not text or text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def err(text: str) -> None:
    """Write a notice to stderr."""
    sys.stderr.write(text if text.endswith("\n") else text + "\n")
    sys.stderr.flush()


def error(message: str, hint: str | None = None) -> None:
    err(f"Error: {message}")
    if hint:
        err(f"Hint: {hint}")


# -- models -------------------------------------------------------------------------------

LS_HEADERS = (
    "MODEL NAME",
    "PARAMETERS",
    "QUANTIZATION",
    "ARCHITECTURE",
    "MODEL ID",
    "CREATED",
    "CONTEXT",
    "SIZE",
)


def _split_variant(name: str) -> tuple[str, str]:
    """`qwen3:0.6B` → (`qwen3`, `0.6B`); a `:` before the last `/` is a registry port."""
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        return name[:colon], name[colon + 1 :]
    return name, ""


def ls_sort_key(name: str) -> tuple[str, bool, str]:
    """Case-insensitive base name, then variant with the variant-less row first."""
    base, variant = _split_variant(name)
    return base.lower(), variant != "", variant.lower()


def context_length(config: Mapping[str, Any]) -> str:
    """`context_size` from the config, else the GGUF `<arch>.context_length`, else blank."""
    if config.get("context_size") is not None:
        return str(config["context_size"])
    gguf = config.get("gguf") or {}
    for key in (f"{config.get('architecture', '')}.context_length", "llama.context_length"):
        value = str(gguf.get(key, "")).strip()
        if value.isdigit():
            return str(int(value))
    return ""


def models_table(models: Iterable[Mapping[str, Any]], now: float | None = None) -> str:
    """`dmr ls`: one row per tag (`<none>` for untagged models), sorted like DMR."""
    from dmr_cli.reference import display_name, short_id

    now = time.time() if now is None else now
    rows: list[list[str]] = []
    for model in models:
        cfg = model.get("config") or {}
        names = [display_name(t) for t in model.get("tags") or []] or ["<none>"]
        created = human_duration(now - int(model.get("created") or 0)) + " ago"
        params, quant, arch, size = (
            str(cfg.get(key) or "")
            for key in ("parameters", "quantization", "architecture", "size")
        )
        model_id, context = short_id(str(model.get("id", ""))), context_length(cfg)
        rows += [[name, params, quant, arch, model_id, created, context, size] for name in names]
    rows.sort(key=lambda row: ls_sort_key(row[0]))
    return table(LS_HEADERS, rows)


def model_ids(models: Iterable[Mapping[str, Any]]) -> str:
    """`dmr ls -q`: one 12-hex ID per model."""
    from dmr_cli.reference import short_id

    return "".join(short_id(m.get("id", "")) + "\n" for m in models)


def _rfc3339(timestamp: int) -> str:
    from datetime import datetime

    text = datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def model_info(model: Mapping[str, Any]) -> str:
    """`dmr show`: DMR's human-readable model description."""
    lines = [f"Model:       {model.get('id', '')}"]
    if model.get("tags"):
        lines.append(f"Tags:        {', '.join(model['tags'])}")
    if model.get("created"):
        lines.append(f"Created:     {_rfc3339(int(model['created']))}")
    cfg = model.get("config")
    if cfg:
        lines.append("")
        for label, key in (
            ("Format", "format"),
            ("Architecture", "architecture"),
            ("Parameters", "parameters"),
            ("Size", "size"),
            ("Quantization", "quantization"),
            ("Context Size", "context_size"),
        ):
            if cfg.get(key) not in (None, ""):
                lines.append(f"{label + ':':<14}{cfg[key]}")
        for title, key in (
            ("GGUF", "gguf"),
            ("Safetensors", "safetensors"),
            ("Diffusers", "diffusers"),
        ):
            if cfg.get(key):
                lines += ["", f"{title} Metadata:"]
                lines += [f"  {k}: {v}" for k, v in sorted(cfg[key].items())]
    return "\n".join(lines) + "\n"


def disk_usage(df: Mapping[str, Any]) -> str:
    """`dmr df`: TYPE/SIZE table; the engine row only when non-zero."""
    rows = [["Models", human_size(df.get("models_disk_usage", 0))]]
    if df.get("default_backend_disk_usage"):
        rows.append(["Inference engine", human_size(df["default_backend_disk_usage"])])
    if "reclaimable" in df:
        rows.append(["Reclaimable", human_size(df["reclaimable"])])
    return table(("TYPE", "SIZE"), rows)


def delete_result(entries: Iterable[Mapping[str, str]]) -> str:
    """`dmr rm`: `Untagged: <tag>` / `Deleted: sha256:...` lines."""
    lines = []
    for entry in entries:
        if "Untagged" in entry:
            lines.append(f"Untagged: {entry['Untagged']}")
        if "Deleted" in entry:
            lines.append(f"Deleted: {entry['Deleted']}")
    return "".join(line + "\n" for line in lines)


# -- runtime administration ---------------------------------------------------------------

# `dmr status` sorts backends Running < Error < Not Installed < Installing, then by name.
BACKEND_STATES = ("Running", "Error", "Not Installed", "Installing")
DEFAULT_KEEP_ALIVE = 300.0  # seconds, for a `ps` entry without keep_alive


def compact_json(value: Any) -> str:
    """Go's `json.Marshal` (what `status --json` prints): no spaces, trailing newline."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False) + "\n"


def indented_json(value: Any) -> str:
    """`configure show`: 2-space indent."""
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def parse_backend_status(text: str) -> tuple[str, str]:
    """`Running: llama.cpp b9879` → (`Running`, `llama.cpp b9879`); text in no known state
    reads as an Error, as DMR's `ParseStatus` does."""
    for state in BACKEND_STATES:
        if text == state:
            return state, ""
        if text.startswith(state + ": "):
            return state, text[len(state) + 2 :]
    return "Error", text


def backends_table(backends: Mapping[str, str]) -> str:
    """`dmr status`: BACKEND STATUS DETAILS, running backends first."""
    rows = [[name, *parse_backend_status(text)] for name, text in backends.items()]
    rows.sort(key=lambda row: (BACKEND_STATES.index(row[1]), row[0]))
    return table(("BACKEND", "STATUS", "DETAILS"), rows)


def _device(device: Mapping[str, Any]) -> str:
    parts = [str(device.get("name") or "unknown device")]
    if device.get("memory_bytes"):
        parts.append(f"{int(device['memory_bytes']) / 1024**3:.2f}GiB")
    if device.get("driver"):
        parts.append(f"driver {device['driver']}")
    return ", ".join(parts)


def accelerator_info(accelerator: Mapping[str, Any]) -> str:
    """`Accelerator: cpu (variant cpu)`, its devices, then why each other candidate lost."""
    lines = [f"Accelerator: {accelerator.get('name')} (variant {accelerator.get('variant')})"]
    lines += [f"  device: {_device(d)}" for d in accelerator.get("devices") or []]
    reasons = accelerator.get("reasons") or {}
    lines += [f"  {name}: {reason}" for name, reason in reasons.items()]
    return "".join(line + "\n" for line in lines)


def status_text(backends: Mapping[str, str], runtime: Mapping[str, Any] | None) -> str:
    """`dmr status` when the daemon runs."""
    text = "Docker Model Runner is running\n\n" + backends_table(backends)
    if runtime and runtime.get("accelerator"):
        text += "\n" + accelerator_info(runtime["accelerator"])
    return text


def _timestamp(text: str) -> float | None:
    """RFC 3339 (Go's, up to 9 fractional digits) as Unix time; None for Go's zero time
    (`0001-01-01T00:00:00Z`, a runner in use) or anything unreadable."""
    import re
    from datetime import datetime

    found = re.fullmatch(
        r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?([Zz]|[+-]\d\d:\d\d)", text.strip()
    )
    if not found or found[1].startswith("0001-"):
        return None
    fraction = f".{found[2][:6]}" if found[2] else ""
    zone = "+00:00" if found[3] in "Zz" else found[3]
    return datetime.fromisoformat(found[1] + fraction + zone).timestamp()


def until(entry: Mapping[str, Any], now: float) -> str:
    """`dmr ps` UNTIL: when the runner's keep_alive will unload it."""
    if entry.get("loading"):
        return "Loading..."
    from dmr_cli.errors import BadRequest
    from dmr_cli.runtime.flags import parse_keep_alive

    try:
        keep_alive = parse_keep_alive(entry.get("keep_alive"))
    except BadRequest:
        keep_alive = None
    if keep_alive is None:
        keep_alive = DEFAULT_KEEP_ALIVE
    if keep_alive < 0:
        return "Forever"
    last_used = _timestamp(str(entry.get("last_used") or ""))
    if entry.get("in_use") or last_used is None:
        return human_duration(keep_alive) + " from now"
    remaining = keep_alive - (now - last_used)
    if remaining <= 0:
        return "Expiring"
    return human_duration(remaining) + " from now"


def ps_table(entries: Iterable[Mapping[str, Any]], now: float | None = None) -> str:
    """`dmr ps`: MODEL NAME BACKEND MODE UNTIL."""
    from dmr_cli.reference import display_name

    now = time.time() if now is None else now
    rows = []
    for entry in entries:
        name = str(entry.get("model_name") or "")
        name = name[7:19] if name.startswith("sha256:") else display_name(name.lower())
        rows.append(
            [
                name,
                str(entry.get("backend_name", "")),
                str(entry.get("mode", "")),
                until(entry, now),
            ]
        )
    return table(("MODEL NAME", "BACKEND", "MODE", "UNTIL"), rows)


def write(text: str) -> None:
    """Write TEXT to stdout as it is (a stream relayed piece by piece)."""
    sys.stdout.write(text)
    sys.stdout.flush()


def write_err(text: str) -> None:
    """Write TEXT to stderr as it is (reasoning streamed beside a piped answer)."""
    sys.stderr.write(text)
    sys.stderr.flush()


def dim(text: str) -> str:
    """TEXT in the terminal's faint style (ANSI SGR 2): reasoning, the token-usage line."""
    return f"\x1b[2m{text}\x1b[0m"


# -- progress -----------------------------------------------------------------------------


class ProgressDisplay(Protocol):
    """Consumes pull/push/load events (`{"type","message","total","layer":{...},"mode"}`)."""

    def update(self, event: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def progress_display(*, tty: bool | None = None) -> ProgressDisplay:
    """Rich per-layer bars on a terminal, throttled plain lines otherwise (both on stderr)."""
    if sys.stderr.isatty() if tty is None else tty:
        return _RichProgress()
    return PlainProgress()


def _status_message(event: Mapping[str, Any]) -> str | None:
    """Informational lines without a layer (HF: `Fetching file list...`), not byte counters."""
    layer = event.get("layer") or {}
    message = str(event.get("message") or "")
    if layer.get("id") or not message:
        return None
    if message.startswith(("Downloaded:", "Uploaded:", "Transferred:")):
        return None
    return message


class PlainProgress:
    """`Downloaded 12.35MB of 269.06MB` lines, at most one per interval (DMR's simple mode)."""

    def __init__(self, interval: float = PLAIN_PROGRESS_INTERVAL) -> None:
        self._interval = interval
        self._layers: dict[str, int] = {}
        self._last_at = float("-inf")
        self._last_line = ""

    def update(self, event: Mapping[str, Any]) -> None:
        if event.get("type") == "warning":
            err(f"Warning: {event.get('message', '')}")
            return
        if event.get("type") != "progress":
            return
        status = _status_message(event)
        if status:
            err(status)
            return
        layer = event.get("layer") or {}
        if not layer.get("id"):
            return
        self._layers[layer["id"]] = int(layer.get("current") or 0)
        current, total = sum(self._layers.values()), int(event.get("total") or 0)
        verb = "Uploaded" if event.get("mode") == "push" else "Downloaded"
        line = f"{verb} {human_size(current)} of {human_size(total)}"
        now = time.monotonic()
        finished = total > 0 and current >= total
        if line != self._last_line and (finished or now - self._last_at >= self._interval):
            err(line)
            self._last_at, self._last_line = now, line

    def close(self) -> None:
        pass


class _RichProgress:
    """Docker-style per-layer bars: short layer id, status, bar, size, speed, ETA."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.fields[layer]}:"),
            TextColumn("{task.description:<13}"),
            BarColumn(),
            DownloadColumn(binary_units=False),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._tasks: dict[str, Any] = {}
        self._progress.start()

    def update(self, event: Mapping[str, Any]) -> None:
        console = self._progress.console
        if event.get("type") == "warning":
            console.print(f"Warning: {event.get('message', '')}", markup=False, highlight=False)
            return
        if event.get("type") != "progress":
            return
        status = _status_message(event)
        if status:
            console.print(status, markup=False, highlight=False)
            return
        layer = event.get("layer") or {}
        layer_id = layer.get("id")
        if not layer_id:
            return
        size, current = int(layer.get("size") or 0), int(layer.get("current") or 0)
        push = event.get("mode") == "push"
        if current == 0:
            state = "Waiting"
        elif current < size:
            state = "Uploading" if push else "Downloading"
        else:
            state = "Push complete" if push else "Pull complete"
        if layer_id not in self._tasks:
            short = layer_id.removeprefix("sha256:")[:12]
            self._tasks[layer_id] = self._progress.add_task(state, total=size, layer=short)
        self._progress.update(
            self._tasks[layer_id], completed=current, total=size, description=state
        )

    def close(self) -> None:
        self._progress.stop()


def build_progress_display(*, tty: bool | None = None) -> ProgressDisplay:
    """Source builds (`{"type": "build", "stage", "message", "percent"}` events): one bar on a
    terminal, otherwise stage lines and `Building llama-server: 45%` once per interval."""
    if sys.stderr.isatty() if tty is None else tty:
        return _RichBuildProgress()
    return PlainBuildProgress()


class PlainBuildProgress:
    def __init__(self, interval: float = PLAIN_PROGRESS_INTERVAL) -> None:
        self._interval = interval
        self._last_at = float("-inf")
        self._last_percent: int | None = None

    def update(self, event: Mapping[str, Any]) -> None:
        percent = event.get("percent")
        if event.get("stage") != "build" or percent is None:
            err(str(event.get("message", "")))
            return
        now = time.monotonic()
        if percent != self._last_percent and (
            percent >= 100 or now - self._last_at >= self._interval
        ):
            err(f"Building llama-server: {percent}%")
            self._last_at, self._last_percent = now, percent

    def close(self) -> None:
        pass


class _RichBuildProgress:
    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        self._task = self._progress.add_task("Building llama-server", total=100, visible=False)
        self._progress.start()

    def update(self, event: Mapping[str, Any]) -> None:
        percent = event.get("percent")
        if event.get("stage") != "build" or percent is None:
            self._progress.console.print(
                str(event.get("message", "")), markup=False, highlight=False
            )
            return
        self._progress.update(self._task, completed=percent, visible=True)

    def close(self) -> None:
        self._progress.stop()
