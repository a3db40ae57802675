"""Which paths reach the inference hot path, and as which runner route (spec §2.1, §2.6)."""

from __future__ import annotations

import pytest

from dmr_cli.server.inference import match


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/engines/v1/chat/completions", ("llama.cpp", "/v1/chat/completions")),
        ("/engines/llama.cpp/v1/completions", ("llama.cpp", "/v1/completions")),
        ("/engines/vllm/v1/embeddings", ("vllm", "/v1/embeddings")),  # 404 later, as DMR
        ("/v1/chat/completions", ("llama.cpp", "/v1/chat/completions")),
        ("/v1/messages/count_tokens", ("llama.cpp", "/v1/messages/count_tokens")),
        ("/rerank", ("llama.cpp", "/rerank")),
        ("/score", ("llama.cpp", "/score")),
        ("/engines/llama.cpp/rerank", ("llama.cpp", "/rerank")),
        # LiteLLM's docker_model_runner provider leaves out /v1 after its api_base.
        ("/engines/llama.cpp/chat/completions", ("llama.cpp", "/v1/chat/completions")),
        ("/engines/chat/completions", ("llama.cpp", "/v1/chat/completions")),
        ("/engines/llama.cpp/embeddings", ("llama.cpp", "/v1/embeddings")),
    ],
)
def test_inference_routes(path: str, expected: tuple[str, str]) -> None:
    assert match(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models",
        "/engines/v1/models",
        "/engines/status",
        "/v1/llama.cpp/chat/completions",  # the /v1 alias has no backend segment
        "/chat/completions",
        "/engines/llama.cpp/v1/nothing",
    ],
)
def test_other_paths_are_not_inference(path: str) -> None:
    assert match(path) is None
