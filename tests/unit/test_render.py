"""Output formats of the CLI: DMR's tables, JSON, sizes, durations, progress lines."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dmr_cli import render

NOW = 1_800_000_000.0
DAY = 86400


def model(
    tags: list[str], *, id_prefix: str = "354bf30d0aa3", created: float = NOW, **config: Any
) -> dict[str, Any]:
    cfg = {
        "parameters": "361.82M",
        "quantization": "Q4_K_M",
        "architecture": "llama",
        "size": "256.35MiB",
        **config,
    }
    return {
        "id": "sha256:" + id_prefix + "0" * (64 - len(id_prefix)),
        "tags": tags,
        "created": int(created),
        "config": cfg,
    }


def first_column(table: str) -> list[str]:
    return [line.split("  ")[0] for line in table.splitlines()[1:]]


# -- primitives ---------------------------------------------------------------------------


def test_table_pads_every_cell_to_its_column_plus_two_spaces() -> None:
    text = render.table(("TYPE", "SIZE"), [["Models", "1.23GB"], ["Inference engine", "4MB"]])
    assert text == (
        "TYPE              SIZE    \nModels            1.23GB  \nInference engine  4MB     \n"
    )


def test_table_with_no_rows_is_just_the_header() -> None:
    assert render.table(("A", "BB"), []) == "A  BB  \n"


def test_json_output_is_indented_by_four_unescaped_and_ends_with_a_newline() -> None:
    text = render.to_json({"tags": ["a<b>&c"], "name": "modèle", "empty": []})
    assert text == (
        '{\n    "tags": [\n        "a<b>&c"\n    ],\n    "name": "modèle",\n    "empty": []\n}\n'
    )
    assert json.loads(text) == {"tags": ["a<b>&c"], "name": "modèle", "empty": []}


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, "0.00B"),
        (999, "999.00B"),
        (1000, "1.00kB"),
        (12_345_678, "12.35MB"),
        (269_060_416, "269.06MB"),
        (1_234_567_890, "1.23GB"),
        (999_999, "1000.00kB"),  # go-units divides only while size >= 1000
        (10**27, "1000.00YB"),
    ],
)
def test_human_size_uses_decimal_units_like_go_units(size: int, expected: str) -> None:
    assert render.human_size(size) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (-5, "Less than a second"),
        (0.9, "Less than a second"),
        (1, "1 second"),
        (59, "59 seconds"),
        (60, "About a minute"),
        (119, "About a minute"),
        (120, "2 minutes"),
        (3599, "59 minutes"),
        (3600, "About an hour"),
        (5399, "About an hour"),
        (5400, "2 hours"),  # hours are rounded
        (47 * 3600, "47 hours"),
        (2 * DAY, "2 days"),
        (13 * DAY, "13 days"),
        (14 * DAY, "2 weeks"),
        (59 * DAY, "8 weeks"),
        (60 * DAY, "2 months"),
        (100 * DAY, "3 months"),
        (729 * DAY, "24 months"),
        (730 * DAY, "2 years"),
    ],
)
def test_human_duration_matches_go_units(seconds: float, expected: str) -> None:
    assert render.human_duration(seconds) == expected


# -- dmr ls -------------------------------------------------------------------------------


def test_models_table_matches_dmr_layout() -> None:
    smollm2 = model(["docker.io/ai/smollm2:latest"], created=NOW - 100 * DAY, context_size=8192)
    assert render.models_table([smollm2], now=NOW) == (
        "MODEL NAME  PARAMETERS  QUANTIZATION  ARCHITECTURE  MODEL ID      CREATED       "
        "CONTEXT  SIZE       \n"
        "smollm2     361.82M     Q4_K_M        llama         354bf30d0aa3  3 months ago  "
        "8192     256.35MiB  \n"
    )


def test_models_table_has_a_row_per_tag_and_a_none_row_for_untagged_models() -> None:
    tagged = model(["docker.io/ai/qwen3:latest", "docker.io/myorg/q:v1"], id_prefix="aaaa")
    untagged = model([], id_prefix="bbbb")
    rows = render.models_table([tagged, untagged], now=NOW).splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["<none>", "myorg/q:v1", "qwen3"]
    assert [r.split()[4] for r in rows] == ["bbbb00000000", "aaaa00000000", "aaaa00000000"]


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        (["zebra", "apple", "mango"], ["apple", "mango", "zebra"]),
        (["Zebra", "apple", "Mango"], ["apple", "Mango", "Zebra"]),
        (
            ["hf.co/model-z", "hf.co/model-a", "ai/model-m"],
            ["hf.co/model-a", "hf.co/model-z", "model-m"],
        ),
        (
            ["qwen3:0.6B-F16", "qwen3:latest", "qwen3:14B-Q6_K", "qwen3:4B-F16"],
            ["qwen3", "qwen3:0.6B-F16", "qwen3:14B-Q6_K", "qwen3:4B-F16"],
        ),
        (
            ["qwen3-coder:latest", "qwen3:0.6B-F16", "qwen3:latest", "qwen3-coder:30B"],
            ["qwen3", "qwen3:0.6B-F16", "qwen3-coder", "qwen3-coder:30B"],
        ),
        (
            ["localhost:5000/b/x:v1", "localhost:5000/a/x"],
            ["localhost:5000/a/x", "localhost:5000/b/x:v1"],
        ),
    ],
)
def test_models_table_sorts_by_base_name_then_variant(tags: list[str], expected: list[str]) -> None:
    # One model per tag, in the given order (DMR's list_test.go cases, display names).
    models = [model([t], id_prefix=f"{i:04x}") for i, t in enumerate(tags)]
    assert first_column(render.models_table(models, now=NOW)) == expected


def test_rows_of_different_models_interleave_in_sorted_order() -> None:
    models = [model(["zebra:latest", "apple:v1"]), model(["mango:latest", "banana:v2"])]
    names = first_column(render.models_table(models, now=NOW))
    assert names == ["apple:v1", "banana:v2", "mango", "zebra"]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"context_size": 4096, "gguf": {"llama.context_length": "8192"}}, "4096"),
        ({"gguf": {"llama.context_length": "8192"}}, "8192"),
        ({"architecture": "qwen3", "gguf": {"qwen3.context_length": "40960"}}, "40960"),
        ({"gguf": {"llama.context_length": "many"}}, ""),
        ({}, ""),
    ],
)
def test_context_column(config: dict[str, Any], expected: str) -> None:
    assert render.context_length(config) == expected


def test_model_ids_prints_one_short_id_per_model() -> None:
    models = [model(["a", "b"], id_prefix="0123456789abcdef"), model([], id_prefix="fedcba")]
    assert render.model_ids(models) == "0123456789ab\nfedcba000000\n"


def test_model_ids_of_nothing_prints_nothing() -> None:
    assert render.model_ids([]) == ""


# -- dmr show, df, rm ---------------------------------------------------------------------


@pytest.fixture
def timezone(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Set the process time zone (a POSIX TZ string, no tzdata needed) for one test."""

    def use(tz: str) -> None:
        monkeypatch.setenv("TZ", tz)
        time.tzset()

    yield use
    monkeypatch.undo()
    time.tzset()


def test_model_info_uses_dmr_labels(timezone: Any) -> None:
    timezone("UTC0")
    info = model(
        ["docker.io/ai/smollm2:latest", "docker.io/ai/smollm2:360M"],
        created=1742816981,
        format="gguf",
        context_size=8192,
        gguf={"general.name": "SmolLM2", "general.architecture": "llama"},
    )
    assert render.model_info(info) == (
        "Model:       sha256:354bf30d0aa30000000000000000000000000000000000000000000000000000\n"
        "Tags:        docker.io/ai/smollm2:latest, docker.io/ai/smollm2:360M\n"
        "Created:     2025-03-24T11:49:41Z\n"
        "\n"
        "Format:       gguf\n"
        "Architecture: llama\n"
        "Parameters:   361.82M\n"
        "Size:         256.35MiB\n"
        "Quantization: Q4_K_M\n"
        "Context Size: 8192\n"
        "\n"
        "GGUF Metadata:\n"
        "  general.architecture: llama\n"
        "  general.name: SmolLM2\n"
    )


def test_model_info_created_is_rfc3339_in_local_time(timezone: Any) -> None:
    timezone("CET-1")
    text = render.model_info({"id": "sha256:ab", "created": 1742816981})
    assert text == "Model:       sha256:ab\nCreated:     2025-03-24T12:49:41+01:00\n"


def test_model_info_of_a_remote_model_skips_missing_fields() -> None:
    text = render.model_info({"id": "sha256:ab", "created": 0, "config": {"format": "gguf"}})
    assert text == "Model:       sha256:ab\n\nFormat:       gguf\n"


def test_disk_usage_table() -> None:
    text = render.disk_usage({"models_disk_usage": 1_234_567_890, "default_backend_disk_usage": 0})
    assert text == "TYPE    SIZE    \nModels  1.23GB  \n"
    text = render.disk_usage(
        {"models_disk_usage": 2000, "default_backend_disk_usage": 45_670_000, "reclaimable": 0}
    )
    assert text.splitlines() == [
        "TYPE              SIZE     ",
        "Models            2.00kB   ",
        "Inference engine  45.67MB  ",
        "Reclaimable       0.00B    ",
    ]


def test_delete_result_lines() -> None:
    entries = [{"Untagged": "docker.io/ai/smollm2:latest"}, {"Deleted": "sha256:354b"}]
    assert render.delete_result(entries) == (
        "Untagged: docker.io/ai/smollm2:latest\nDeleted: sha256:354b\n"
    )


# -- progress -----------------------------------------------------------------------------


def progress(layer: str, current: int, size: int, total: int, mode: str = "pull") -> dict[str, Any]:
    return {
        "type": "progress",
        "message": f"Downloaded: {current / 1e6:.2f} MB",
        "total": total,
        "layer": {"id": layer, "size": size, "current": current},
        "mode": mode,
    }


def test_plain_progress_sums_layers_and_throttles(capsys: pytest.CaptureFixture[str]) -> None:
    display = render.PlainProgress(interval=3600)  # nothing but the first and last line
    for event in [
        progress("sha256:aa", 1_000_000, 2_000_000, 3_000_000),
        progress("sha256:bb", 500_000, 1_000_000, 3_000_000),
        progress("sha256:aa", 2_000_000, 2_000_000, 3_000_000),
        progress("sha256:bb", 1_000_000, 1_000_000, 3_000_000),
    ]:
        display.update(event)
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "Downloaded 1.00MB of 3.00MB\nDownloaded 3.00MB of 3.00MB\n"


def test_plain_progress_prints_each_change_when_not_throttled(
    capsys: pytest.CaptureFixture[str],
) -> None:
    display = render.PlainProgress(interval=0)
    for current in (0, 1000, 1000, 2000):
        display.update(progress("sha256:aa", current, 2000, 2000, mode="push"))
    assert capsys.readouterr().err == (
        "Uploaded 0.00B of 2.00kB\nUploaded 1.00kB of 2.00kB\nUploaded 2.00kB of 2.00kB\n"
    )


def test_progress_shows_status_lines_and_warnings_on_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    display = render.PlainProgress()
    display.update(
        {
            "type": "progress",
            "message": "Fetching file list...",
            "total": 0,
            "layer": {"size": 0, "current": 0},
            "mode": "pull",
        }
    )
    display.update({"type": "warning", "message": "model is large", "mode": "pull"})
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "Fetching file list...\nWarning: model is large\n"


def test_terminal_progress_shows_layer_bars(capsys: pytest.CaptureFixture[str]) -> None:
    display = render.progress_display(tty=True)
    display.update(progress("sha256:0123456789abcdef", 0, 2_000_000, 3_000_000))
    display.update(progress("sha256:fedcba9876543210", 1_000_000, 1_000_000, 3_000_000))
    display.update(progress("sha256:0123456789abcdef", 500_000, 2_000_000, 3_000_000))
    display.close()
    out, err = capsys.readouterr()
    assert out == ""
    assert "0123456789ab: Downloading" in err
    assert "fedcba987654: Pull complete" in err
    assert "0.5/2.0 MB" in err
