"""LiteLLM's `docker_model_runner/` provider against `dmr serve`, with both runner kinds: a
native llama-server and the embedded engine (llama-cpp-python).

Two `api_base` forms are in use: LiteLLM's documentation gives `<dmr>/engines/llama.cpp`, and
Docker's (`docker model gateway`) gives `<dmr>/engines/llama.cpp/v1`. LiteLLM (1.106) sends
the provider's requests through its OpenAI-compatible path, which POSTs to
`{api_base}/chat/completions`: `/engines/llama.cpp/chat/completions` for the first form."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

# LiteLLM fetches its model price list from GitHub at import unless told to use the copy it
# ships: this machine has no internet, and the tests must not depend on it.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
import litellm

from tests.helpers.daemon import Daemon, start_tiny

MODEL = "docker_model_runner/ai/tiny"
API_BASES = {"litellm-docs": "/engines/llama.cpp", "docker-docs": "/engines/llama.cpp/v1"}
NO_STOP = {"2": -100, "260": -100}  # the tiny model's end tokens, banned: answers run to the limit
MAX_TOKENS = 8
MESSAGES = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module", params=["native", "embedded"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Daemon]]:
    tmp = tmp_path_factory.mktemp(request.param)
    native = request.getfixturevalue("native_llama_server") if request.param == "native" else None
    daemon = start_tiny(request.param, tmp, native)
    yield request.param, daemon
    daemon.stop()


@pytest.fixture(params=list(API_BASES))
def api_base(request: pytest.FixtureRequest, served: tuple[str, Daemon]) -> str:
    return served[1].url + API_BASES[request.param]


def call(api_base: str, **extra: Any) -> Any:
    return litellm.completion(
        model=MODEL,
        api_base=api_base,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logit_bias=NO_STOP,
        num_retries=0,
        timeout=120,
        **extra,
    )


def test_completion(served: tuple[str, Daemon], api_base: str) -> None:
    _, daemon = served
    response = call(api_base)
    (choice,) = response.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens > 0
    # The request went where LiteLLM sends it, and the daemon recorded it under that path.
    logged = httpx.get(daemon.url + "/engines/requests", timeout=10).json()
    path = urlsplit(api_base).path + "/chat/completions"
    assert path in {r["url"] for e in logged for r in e["records"]}


def test_streaming_assembles_the_same_answer(api_base: str) -> None:
    whole = call(api_base).choices[0].message.content
    chunks = list(call(api_base, stream=True))
    assert len(chunks) > 1
    assembled = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # Greedy decoding: the relayed stream, put together, is the non-streamed answer.
    assert assembled == whole
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]


def test_async_streaming(api_base: str) -> None:
    settings: dict[str, Any] = {
        "model": MODEL,
        "api_base": api_base,
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "logit_bias": NO_STOP,
        "num_retries": 0,
    }

    async def run() -> tuple[str, str]:
        whole = await litellm.acompletion(**settings)
        stream = await litellm.acompletion(**settings, stream=True)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        return whole.choices[0].message.content, "".join(parts)

    whole, streamed = asyncio.run(run())
    assert streamed == whole and whole


def test_an_unknown_model_is_a_not_found_error(api_base: str) -> None:
    with pytest.raises(litellm.NotFoundError) as error:
        litellm.completion(
            model="docker_model_runner/ai/absent",
            api_base=api_base,
            messages=MESSAGES,
            num_retries=0,
        )
    # DMR answers in plain text; openai>=3 (under LiteLLM) quotes only JSON error messages,
    # so the cause is read from the response.
    assert error.value.response.text == "model not found: ai/absent\n"
