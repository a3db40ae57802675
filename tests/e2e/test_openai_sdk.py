"""The real `openai` Python SDK against `dmr serve`, through each of the three OpenAI prefixes,
with both runner kinds: a native llama-server and the embedded engine (llama-cpp-python)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.helpers.daemon import Daemon, runner_env, start_daemon
from tests.helpers.gguf_factory import make_tiny_embedder, make_tiny_llama

PREFIXES = ["/engines/v1", "/engines/llama.cpp/v1", "/v1"]
# The tiny llama's end-of-generation tokens, </s> and <|im_end|>, banned so that every
# generation runs to max_tokens and its length is known.
NO_STOP = {"2": -100, "260": -100}
MAX_TOKENS = 8
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module", params=["native", "embedded"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Daemon]]:
    """One daemon per runner kind with a chat model (ai/tiny) and an embedding model (ai/emb)."""
    tmp = tmp_path_factory.mktemp(request.param)
    native = request.getfixturevalue("native_llama_server") if request.param == "native" else None
    env = runner_env(request.param, tmp, native)
    daemon = start_daemon(tmp / "home", **env)
    try:
        for path, tag in (
            (make_tiny_llama(tmp / "tiny.gguf"), "ai/tiny"),
            (make_tiny_embedder(tmp / "emb.gguf"), "ai/emb"),
        ):
            result = daemon.cli("package", "--gguf", str(path), tag)
            assert result.returncode == 0, result.stderr
        yield request.param, daemon
    finally:
        daemon.stop()


@pytest.fixture(params=PREFIXES)
def client(served: tuple[str, Daemon], request: pytest.FixtureRequest) -> Iterator[openai.OpenAI]:
    _, daemon = served
    # max_retries=0: a failure must show, not be retried away.
    with openai.OpenAI(
        base_url=daemon.url + request.param, api_key="unused", max_retries=0, timeout=120
    ) as sdk:
        yield sdk


def test_chat_completion(client: openai.OpenAI, served: tuple[str, Daemon]) -> None:
    kind, _ = served
    response = client.chat.completions.create(
        model="ai/tiny",
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logit_bias=NO_STOP,
    )
    assert response.object == "chat.completion"
    (choice,) = response.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert response.usage is not None
    # llama-cpp-python's chat handler (0.3.36) counts one token more than it generated.
    generated = MAX_TOKENS if kind == "native" else MAX_TOKENS + 1
    assert response.usage.completion_tokens == generated
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + generated


def test_chat_streaming_assembles_the_same_answer(
    client: openai.OpenAI, served: tuple[str, Daemon]
) -> None:
    kind, _ = served
    whole = client.chat.completions.create(
        model="ai/tiny",
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logit_bias=NO_STOP,
    )
    stream = client.chat.completions.create(
        model="ai/tiny",
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        temperature=0,
        logit_bias=NO_STOP,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    with_choices = [c for c in chunks if c.choices]
    assembled = "".join(c.choices[0].delta.content or "" for c in with_choices)
    # Greedy decoding: the relayed stream, put together, is the non-streamed answer.
    assert assembled == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason]
    assert finishes == ["length"]
    if kind == "native":
        # llama-cpp-python ignores stream_options; llama-server ends with a usage chunk.
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == MAX_TOKENS


def test_completions(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model="ai/tiny",
        prompt="hello world",
        max_tokens=MAX_TOKENS,
        temperature=0,
        logit_bias=NO_STOP,
    )
    assert response.object == "text_completion"
    (choice,) = response.choices
    assert isinstance(choice.text, str)
    assert choice.finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == MAX_TOKENS

    streamed = list(
        client.completions.create(
            model="ai/tiny",
            prompt="hello world",
            max_tokens=MAX_TOKENS,
            temperature=0,
            logit_bias=NO_STOP,
            stream=True,
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text


def test_embeddings_start_an_embedding_runner(
    client: openai.OpenAI, served: tuple[str, Daemon]
) -> None:
    _, daemon = served
    response = client.embeddings.create(model="ai/emb", input=["hello world", "the cat is tiny"])
    assert [d.index for d in response.data] == [0, 1]
    first, second = (d.embedding for d in response.data)
    assert len(first) == len(second) == 32  # the embedder's n_embd
    assert all(isinstance(x, float) for x in first)
    assert first != second
    single = client.embeddings.create(model="ai/emb", input="hello world")
    assert single.data[0].embedding == pytest.approx(first, rel=1e-4, abs=1e-5)
    ps = httpx.get(daemon.url + "/engines/ps").json()
    assert {"model_name": "ai/emb", "mode": "embedding"}.items() <= next(
        e for e in ps if e["model_name"] == "ai/emb"
    ).items()


def test_model_list_and_retrieve(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert {"docker.io/ai/tiny:latest", "docker.io/ai/emb:latest"} <= models.keys()
    tiny = models["docker.io/ai/tiny:latest"]
    assert tiny.object == "model" and tiny.owned_by == "docker"
    assert tiny.model_extra is not None
    assert tiny.model_extra["dmr"]["architecture"] == "llama"
    assert tiny.model_extra["dmr"]["context_window"] == 256
    for ref in ("ai/tiny", "docker.io/ai/tiny:latest", "tiny"):
        retrieved = client.models.retrieve(ref)  # the SDK sends "ai%2Ftiny" in the path
        assert retrieved.id == "docker.io/ai/tiny:latest"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("ai/absent")


def test_unknown_model_is_a_not_found_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="ai/absent", messages=MESSAGES)
