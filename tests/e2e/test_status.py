"""`dmr status` against a real daemon on this (GPU-less) machine."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.daemon import start_daemon


def test_status_json_reports_cpu_and_why_each_gpu_was_rejected(
    tmp_path: Path, native_llama_server: Path
) -> None:
    daemon = start_daemon(tmp_path / "home", LLAMA_SERVER_PATH=str(native_llama_server))
    try:
        result = daemon.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        text = daemon.cli("status").stdout
    finally:
        daemon.stop()
    assert status["running"] is True
    assert status["endpoint"].endswith("/v1/")
    accelerator = status["accelerator"]
    assert (accelerator["name"], accelerator["variant"]) == ("cpu", "cpu")
    assert set(accelerator["reasons"]) == {"metal", "cuda", "rocm", "vulkan", "opencl"}
    assert all(reason for reason in accelerator["reasons"].values())
    llama = status["backends"]["llama.cpp"]
    assert (
        llama.startswith("Running: llama.cpp ") and "-cpu" in llama and "accelerator: cpu" in llama
    )
    assert (
        status["runner"]["kind"] == "native" and status["runner"]["source"] == "LLAMA_SERVER_PATH"
    )
    assert "Accelerator: cpu" in text and "cuda:" in text


def test_status_without_a_daemon_fails_clearly(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "home")
    daemon.stop()
    result = daemon.cli("status")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Failed to get Docker Model Runner status" in result.stderr
