"""Reranking through `dmr serve` with a generated BERT cross-encoder: every rerank route
reaches one reranking-mode llama-server (`--embeddings --reranking`); the embedded engine,
which cannot rerank, refuses clearly."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.daemon import Daemon, start_daemon
from tests.helpers.gguf_factory import make_tiny_reranker

RERANK_PATHS = [
    "/rerank",
    "/v1/rerank",
    "/engines/rerank",
    "/engines/v1/rerank",
    "/engines/llama.cpp/rerank",
    "/engines/llama.cpp/v1/rerank",
]
QUERY = "what is the capital of france"
DOCUMENTS = ["paris is the capital of france", "the cat is a tiny dog", "hello world"]


def package(daemon: Daemon, path: Path, tag: str) -> None:
    result = daemon.cli("package", "--gguf", str(path), tag)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def native(
    native_llama_server: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    tmp = tmp_path_factory.mktemp("rerank")
    daemon = start_daemon(
        tmp / "home",
        LLAMA_SERVER_PATH=str(native_llama_server),
        DMR_RUNNER_DIR=str(tmp / "no-runners"),
    )
    try:
        package(daemon, make_tiny_reranker(tmp / "reranker.gguf"), "ai/reranker")
        with httpx.Client(base_url=daemon.url, timeout=120) as http:
            yield http
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def reference_scores(native: httpx.Client) -> dict[int, float]:
    response = native.post(
        "/rerank", json={"model": "ai/reranker", "query": QUERY, "documents": DOCUMENTS}
    )
    assert response.status_code == 200, response.text
    return {r["index"]: r["relevance_score"] for r in response.json()["results"]}


@pytest.mark.parametrize("path", RERANK_PATHS)
def test_rerank_routes_reach_the_reranking_runner(
    native: httpx.Client, reference_scores: dict[int, float], path: str
) -> None:
    response = native.post(
        path, json={"model": "ai/reranker", "query": QUERY, "documents": DOCUMENTS}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "ai/reranker"
    results = body["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)  # best first, as Jina/Cohere clients expect
    # Same runner, same weights: every route gives the same scores.
    assert {r["index"]: r["relevance_score"] for r in results} == pytest.approx(reference_scores)
    (runner,) = native.get("/engines/ps").json()
    assert runner["model_name"] == "ai/reranker" and runner["mode"] == "reranking"


def test_top_n_and_the_tei_format_pass_through(
    native: httpx.Client, reference_scores: dict[int, float]
) -> None:
    best = max(reference_scores, key=reference_scores.__getitem__)
    top = native.post(
        "/v1/rerank",
        json={"model": "ai/reranker", "query": QUERY, "documents": DOCUMENTS, "top_n": 1},
    )
    assert top.status_code == 200, top.text
    assert [r["index"] for r in top.json()["results"]] == [best]
    # Text Embeddings Inference's shape ("texts" in, a bare list out) is the runner's to
    # answer: the body goes through untouched.
    tei = native.post("/rerank", json={"model": "ai/reranker", "query": QUERY, "texts": DOCUMENTS})
    assert tei.status_code == 200, tei.text
    assert {r["index"]: r["score"] for r in tei.json()} == pytest.approx(reference_scores)


def test_runner_errors_pass_through(native: httpx.Client) -> None:
    response = native.post("/rerank", json={"model": "ai/reranker", "documents": DOCUMENTS})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == '"query" must be provided'


def test_score_is_passed_to_the_reranking_runner(native: httpx.Client) -> None:
    """`/score` is vLLM's route; DMR forwards it unchanged (spec §2.6 step 9) and llama-server
    has no such route, so the answer is the runner's own 404, not the daemon's."""
    for path in ("/score", "/engines/score", "/engines/llama.cpp/score"):
        response = native.post(
            path, json={"model": "ai/reranker", "text_1": QUERY, "text_2": DOCUMENTS}
        )
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "not_found_error"
    (runner,) = native.get("/engines/ps").json()
    assert runner["mode"] == "reranking"


def test_embedded_engine_refuses_to_rerank(tmp_path: Path) -> None:
    daemon = start_daemon(
        tmp_path / "home",
        DMR_RUNNER_DIR=str(tmp_path / "no-runners"),
        PATH=os.pathsep.join(
            p
            for p in os.environ["PATH"].split(os.pathsep)
            if not (Path(p) / "llama-server").exists()
        ),
    )
    try:
        package(daemon, make_tiny_reranker(tmp_path / "reranker.gguf"), "ai/reranker")
        with httpx.Client(base_url=daemon.url, timeout=120) as http:
            for path in ("/rerank", "/score", "/engines/llama.cpp/v1/rerank"):
                response = http.post(
                    path, json={"model": "ai/reranker", "query": QUERY, "documents": DOCUMENTS}
                )
                assert 400 <= response.status_code < 600, path
                assert 'the embedded engine does not support mode "reranking"' in response.text
                assert http.get("/engines/ps").json() == []  # nothing left half-loaded
    finally:
        daemon.stop()
