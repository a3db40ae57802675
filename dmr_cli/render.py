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
