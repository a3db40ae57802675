"""Ollama ↔ OpenAI translation for the Ollama API (spec §2.8): pure functions, no I/O.

Ollama requests become OpenAI chat completions and embeddings for the runners, and the
runners' answers, whole or streamed, become Ollama's objects. The routes live in
`server/ollama.py`; keeping the rules here lets each one be tested without a runner.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from dmr_cli.errors import BadRequest, DmrError
from dmr_cli.runtime.flags import parse_keep_alive

ZERO_TIME = "0001-01-01T00:00:00Z"  # Go's zero time.Time, which Ollama's JSON never omits

# Ollama's options → the OpenAI request fields. top_k, repeat_penalty, min_p and typical_p
# are llama.cpp's own fields (llama-cpp-python ignores typical_p).
OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "num_predict": "max_tokens",
    "stop": "stop",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repeat_penalty",
    "min_p": "min_p",
    "typical_p": "typical_p",
}
INTEGER_OPTIONS = ("top_k", "num_predict", "seed")
# The first bytes of an image, base64-encoded → its media type (spec §2.8; jpeg otherwise).
IMAGE_TYPES = {
    "/9j/": "image/jpeg",
    "iVBOR": "image/png",
    "R0lG": "image/gif",
    "UklGR": "image/webp",
}
THINK_LEVELS = ("high", "medium", "low")
NAME_PADDING = 30  # Ollama prints parameters as Go's "%-30s %#v"
MAX_CONTEXT = 2**31 - 1  # the context size is an int32 in DMR's configuration

# GGUF value types (GGUF specification) that model_info renders specially.
GGUF_FLOAT32 = 6
GGUF_ARRAY = 9


# -- requests -------------------------------------------------------------------------------


def model_name(body: dict[str, Any]) -> str:
    """`model`, or the older `name`, that every Ollama request carries."""
    name = body.get("model") or body.get("name")
    if name is None or name == "":
        raise BadRequest("model is required")
    if not isinstance(name, str) or not name.strip():
        raise BadRequest("invalid request: model must be a model name")
    return name.strip()


def stream_flag(body: dict[str, Any]) -> bool:
    """Ollama streams unless told `"stream": false`."""
    stream = body.get("stream")
    if stream is None:
        return True
    if not isinstance(stream, bool):
        raise BadRequest("invalid request: stream must be true or false")
    return stream


@dataclass
class RunnerSettings:
    """What a request asks of its runner, applied through `_configure` before it (spec §2.8)."""

    keep_alive: float | None = None
    context_size: int | None = None
    reasoning_budget: int | None = None

    def changes(self) -> dict[str, Any]:
        """The RunnerConfig fields to set."""
        fields = {
            "keep_alive": self.keep_alive,
            "context_size": self.context_size,
            "reasoning_budget": self.reasoning_budget,
        }
        return {k: v for k, v in fields.items() if v is not None}


def runner_settings(body: dict[str, Any]) -> RunnerSettings:
    """keep_alive (top level, else in options), options.num_ctx and think."""
    options = _options(body)
    keep_alive = body.get("keep_alive")
    if keep_alive is None:
        keep_alive = options.get("keep_alive")
    settings = RunnerSettings(keep_alive=parse_keep_alive(keep_alive))
    num_ctx = options.get("num_ctx")
    if num_ctx is not None:
        if isinstance(num_ctx, bool) or not isinstance(num_ctx, (int, float)):
            raise BadRequest(f"invalid options.num_ctx {num_ctx!r}: expected a number of tokens")
        if num_ctx > MAX_CONTEXT:
            raise BadRequest(f"invalid options.num_ctx {num_ctx!r}: too large")
        if num_ctx >= 1:  # as DMR: zero or less keeps the configured context
            settings.context_size = int(num_ctx)
    think = body.get("think")
    if think is not None:
        if think is False:
            settings.reasoning_budget = 0
        elif think is True or think in THINK_LEVELS:
            settings.reasoning_budget = -1  # unlimited
        else:
            raise BadRequest(
                f"invalid think value {think!r}: expected true, false, high, medium or low"
            )
    return settings


def _options(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise BadRequest("invalid request: options must be a JSON object")
    return options


def sampling(body: dict[str, Any]) -> dict[str, Any]:
    """The options that map to OpenAI request fields, type-checked here so that both runners
    refuse a bad one alike (400); a negative num_predict (Ollama's "until the model stops"
    and "fill the context") sets no limit."""
    out: dict[str, Any] = {}
    for name, value in _options(body).items():
        target = OPTIONS.get(name)
        if target is None or value is None:
            continue
        if name == "stop":
            out[target] = _stop(value)
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise BadRequest(f"invalid option {name} {value!r}: expected a number")
        if name in INTEGER_OPTIONS:
            if value != int(value):
                raise BadRequest(f"invalid option {name} {value!r}: expected an integer")
            value = int(value)
        if name == "num_predict" and value < 0:
            continue
        out[target] = value
    return out


def _stop(value: Any) -> str | list[str]:
    if isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(s, str) for s in value)
    ):
        return value
    raise BadRequest(f"invalid option stop {value!r}: expected a string or a list of strings")


def response_format(value: Any) -> dict[str, Any] | None:
    """Ollama's `format`: "json" or a JSON schema. Both runners read llama.cpp's
    `json_object` + `schema` form; llama-cpp-python rejects OpenAI's `json_schema` type."""
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_object", "schema": value}
    raise BadRequest(f'invalid format {value!r}: expected "json" or a JSON schema object')


def image_url(data: Any) -> str:
    """A raw base64 image as a data URI."""
    if not isinstance(data, str) or not data:
        raise BadRequest("invalid image: expected base64-encoded image data")
    media_type = next((t for p, t in IMAGE_TYPES.items() if data.startswith(p)), "image/jpeg")
    return f"data:{media_type};base64,{data}"


def _content(text: str, images: Any) -> str | list[dict[str, Any]]:
    if not images:
        return text
    if not isinstance(images, list):
        raise BadRequest("invalid request: images must be a list of base64 strings")
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    parts += [{"type": "image_url", "image_url": {"url": image_url(i)}} for i in images]
    return parts


def messages(value: Any) -> list[dict[str, Any]]:
    """Ollama chat messages as OpenAI messages.

    Tool-call arguments (objects) become JSON strings. Ollama tool calls carry no IDs and
    its tool results name a function (`tool_name`), not a call: calls get stable IDs and
    each result answers the oldest unanswered call of that name, else the oldest one.
    """
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest("invalid request: messages must be a list")
    out: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # (call id, function name)
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"invalid message {i}: expected an object with a role")
        text = message.get("content") or ""
        if not isinstance(text, str):
            raise BadRequest(f"invalid message {i}: content must be a string")
        role = message["role"]
        converted: dict[str, Any] = {"role": role, "content": _content(text, message.get("images"))}
        thinking = message.get("thinking")
        if role == "assistant" and isinstance(thinking, str) and thinking:
            converted["reasoning_content"] = thinking
        calls = message.get("tool_calls")
        if role == "assistant" and calls:
            converted["tool_calls"] = _openai_tool_calls(calls, i)
            unanswered += [(c["id"], c["function"]["name"]) for c in converted["tool_calls"]]
        if role == "tool":
            call_id = message.get("tool_call_id") or _answer(unanswered, message.get("tool_name"))
            if call_id:
                converted["tool_call_id"] = call_id
        out.append(converted)
    return out


def _openai_tool_calls(calls: Any, index: int) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise BadRequest(f"invalid message {index}: tool_calls must be a list")
    out = []
    for n, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(f"invalid message {index}: tool call {n} has no function name")
        arguments = function.get("arguments")
        out.append(
            {
                "id": call.get("id") or f"call_{index}_{n}",
                "type": "function",
                "function": {
                    "name": function["name"],
                    "arguments": (
                        arguments if isinstance(arguments, str) else json.dumps(arguments or {})
                    ),
                },
            }
        )
    return out


def _answer(unanswered: list[tuple[str, str]], name: Any) -> str | None:
    for n, (call_id, function) in enumerate(unanswered):
        if function == name:
            del unanswered[n]
            return call_id
    return unanswered.pop(0)[0] if unanswered else None


def tools(value: Any) -> list[dict[str, Any]]:
    """Ollama's tools are OpenAI's; `type` defaults to function as Ollama's client sends it."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise BadRequest("invalid request: tools must be a list of objects")
    return [{"type": "function", **t} for t in value]


def chat_request(body: dict[str, Any], model: str, *, stream: bool) -> dict[str, Any]:
    """POST /api/chat → the OpenAI chat completion request."""
    payload: dict[str, Any] = {"model": model, "messages": messages(body.get("messages"))}
    if body.get("tools"):
        payload["tools"] = tools(body["tools"])
    return _finish_request(payload, body, stream)


def generate_request(body: dict[str, Any], model: str, *, stream: bool) -> dict[str, Any]:
    """POST /api/generate → a chat completion of one user message (after `system`)."""
    prompt = body.get("prompt") or ""
    system = body.get("system") or ""
    if not isinstance(prompt, str) or not isinstance(system, str):
        raise BadRequest("invalid request: prompt and system must be strings")
    chat: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    chat.append({"role": "user", "content": _content(prompt, body.get("images"))})
    return _finish_request({"model": model, "messages": chat}, body, stream)


def _finish_request(payload: dict[str, Any], body: dict[str, Any], stream: bool) -> dict[str, Any]:
    payload["stream"] = stream
    if stream:  # llama-server then ends the stream with the token counts
        payload["stream_options"] = {"include_usage": True}
    payload.update(sampling(body))
    fmt = response_format(body.get("format"))
    if fmt is not None:
        payload["response_format"] = fmt
    return payload


def embed_inputs(value: Any) -> list[str]:
    """/api/embed's `input`: a string or a list of strings."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise BadRequest("invalid input: expected a string or a list of strings")


# -- answers --------------------------------------------------------------------------------


def now() -> str:
    """created_at, RFC 3339 with microseconds as Ollama writes it."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339(seconds: float | None) -> str:
    if seconds is None:
        return ZERO_TIME
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Turn:
    """A runner's answer, whole or assembled from a stream."""

    content: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's shape
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None  # llama-server's prompt_ms / predicted_ms

    @classmethod
    def from_response(cls, data: Any) -> Turn:
        """A non-streamed chat completion."""
        turn = cls()
        if not isinstance(data, dict):
            return turn
        turn._extras(data)
        choices = data.get("choices") or [{}]
        message = choices[0].get("message") or {}
        turn.content = message.get("content") or ""
        turn.thinking = message.get("reasoning_content") or ""
        turn.tool_calls = list(message.get("tool_calls") or [])
        turn.finish_reason = choices[0].get("finish_reason")
        return turn

    def _extras(self, data: dict[str, Any]) -> None:
        if isinstance(data.get("usage"), dict):
            self.usage = data["usage"]
        if isinstance(data.get("timings"), dict):
            self.timings = data["timings"]


class StreamReader:
    """Reads the chunks of a streamed chat completion: `feed` returns each chunk's new text
    and thinking; tool calls, which arrive in pieces, are assembled for the end."""

    def __init__(self) -> None:
        self.turn = Turn()
        self._calls: dict[int, dict[str, Any]] = {}

    def feed(self, chunk: dict[str, Any]) -> tuple[str, str]:
        self.turn._extras(chunk)
        choices = chunk.get("choices") or []
        if not choices:
            return "", ""
        choice = choices[0]
        if choice.get("finish_reason"):
            self.turn.finish_reason = choice["finish_reason"]
        delta = choice.get("delta") or {}
        for piece in delta.get("tool_calls") or []:
            call = self._calls.setdefault(
                int(piece.get("index", len(self._calls))),
                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
            )
            call["id"] = piece.get("id") or call["id"]
            function = piece.get("function") or {}
            call["function"]["name"] += function.get("name") or ""
            call["function"]["arguments"] += function.get("arguments") or ""
        self.turn.tool_calls = [self._calls[i] for i in sorted(self._calls)]
        return delta.get("content") or "", delta.get("reasoning_content") or ""


def stream_error(chunk: Any) -> str | None:
    """The message of an error event in a runner's stream, else None."""
    if isinstance(chunk, dict) and "error" in chunk:
        return error_message(chunk)
    return None


def error_message(data: Any) -> str:
    """The message in a runner's or dmr's error body: OpenAI's `{"error": {"message"}}`,
    a plain `{"error": "..."}`, FastAPI's `{"detail": ...}` or DMR's `{"message": ...}`."""
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str) and error:
            return error
        for key in ("detail", "message"):
            if data.get(key):
                return data[key] if isinstance(data[key], str) else json.dumps(data[key])
    return json.dumps(data)


def ollama_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI tool calls → Ollama's: arguments as an object, no `type`."""
    out = []
    for index, call in enumerate(calls):
        function = call.get("function") or {}
        item: dict[str, Any] = {
            "function": {
                "index": index,
                "name": function.get("name") or "",
                "arguments": _arguments(function.get("arguments")),
            }
        }
        if call.get("id"):
            item = {"id": call["id"], **item}
        out.append(item)
    return out


def _arguments(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if raw is None or raw == "":
        return {}
    try:
        value = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise DmrError(
            f"the model called a tool with arguments that are not JSON: {raw!r}"
        ) from exc
    if not isinstance(value, dict):
        raise DmrError(f"the model called a tool with arguments that are not an object: {raw!r}")
    return value


def done_reason(finish_reason: str | None) -> str:
    """OpenAI's finish_reason in Ollama's words: a tool call is a stop."""
    if finish_reason in (None, "", "tool_calls", "function_call"):
        return "stop"
    return finish_reason


def done_fields(turn: Turn, *, total_ns: int, load_ns: int | None) -> dict[str, Any]:
    """The statistics of Ollama's final object, from usage and llama-server's timings."""
    out: dict[str, Any] = {
        "done": True,
        "done_reason": done_reason(turn.finish_reason),
        "total_duration": total_ns,
    }
    if load_ns is not None:
        out["load_duration"] = load_ns
    usage, timings = turn.usage or {}, turn.timings or {}
    if isinstance(usage.get("prompt_tokens"), int):
        out["prompt_eval_count"] = usage["prompt_tokens"]
    if isinstance(timings.get("prompt_ms"), (int, float)):
        out["prompt_eval_duration"] = round(timings["prompt_ms"] * 1e6)
    if isinstance(usage.get("completion_tokens"), int):
        out["eval_count"] = usage["completion_tokens"]
    if isinstance(timings.get("predicted_ms"), (int, float)):
        out["eval_duration"] = round(timings["predicted_ms"] * 1e6)
    return out


def chunk(model: str, text: str, thinking: str, *, chat: bool) -> dict[str, Any]:
    """One streamed line: a chat message piece, or a generate `response` piece."""
    out: dict[str, Any] = {"model": model, "created_at": now()}
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            message["thinking"] = thinking
        out["message"] = message
    else:
        out["response"] = text
        if thinking:
            out["thinking"] = thinking
    out["done"] = False
    return out


def tool_call_chunk(model: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """The streamed line carrying the tool calls, once they are complete."""
    message = {"role": "assistant", "content": "", "tool_calls": ollama_tool_calls(calls)}
    return {"model": model, "created_at": now(), "message": message, "done": False}


def final(
    model: str, turn: Turn, *, chat: bool, whole: bool, total_ns: int, load_ns: int | None
) -> dict[str, Any]:
    """The last object: the whole answer when not streamed (`whole`), else empty text."""
    line = chunk(model, turn.content if whole else "", turn.thinking if whole else "", chat=chat)
    if whole and chat and turn.tool_calls:
        line["message"]["tool_calls"] = ollama_tool_calls(turn.tool_calls)
    del line["done"]
    return line | done_fields(turn, total_ns=total_ns, load_ns=load_ns)


def idle_reply(model: str, reason: str, *, chat: bool) -> dict[str, Any]:
    """The answer to the empty-prompt idioms: done_reason `load` or `unload`."""
    line = chunk(model, "", "", chat=chat)
    line["done"] = True
    line["done_reason"] = reason
    return line


def normalize(vector: list[float]) -> list[float]:
    """L2-normalised, as Ollama's /api/embed answers."""
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else list(vector)


def embeddings(data: Any) -> list[list[float]]:
    """The vectors of an OpenAI embeddings response, in input order."""
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise DmrError("the runner answered the embeddings request without data")
    ordered = sorted(items, key=lambda item: int(item.get("index", 0)))
    return [list(item.get("embedding") or []) for item in ordered]


def pull_status(event: dict[str, Any]) -> dict[str, Any]:
    """A DMR progress event (spec §2.4) as an Ollama pull status line (spec §2.8); zero
    counts are left out, as Ollama's omitempty does."""
    kind = event.get("type")
    if kind == "success":
        return {"status": "success"}
    if kind == "error":
        return {"error": str(event.get("message", ""))}
    if kind != "progress":
        return {"status": str(event.get("message", ""))}
    layer = event.get("layer") or {}
    digest = layer.get("id") or ""
    if not digest:
        return {"status": "pulling manifest"}
    out: dict[str, Any] = {"status": f"pulling {digest.removeprefix('sha256:')[:12]}"}
    out["digest"] = digest
    for key, value in (("total", layer.get("size")), ("completed", layer.get("current"))):
        if value:
            out[key] = value
    return out


# -- models ---------------------------------------------------------------------------------


def ollama_name(tag: str) -> str:
    """A stored tag as Ollama clients show it: `ai/tiny:latest` (Docker Hub's registry
    left out, the tag kept); the stores resolves it back."""
    for prefix in ("docker.io/", "index.docker.io/"):
        if tag.startswith(prefix):
            return tag[len(prefix) :]
    return tag


def digest(model_id: str) -> str:
    """Ollama's digests are bare hex."""
    return model_id.removeprefix("sha256:")


def details(config: dict[str, Any]) -> dict[str, Any]:
    family = str(config.get("architecture") or "")
    return {
        "parent_model": "",
        "format": str(config.get("format") or "gguf"),
        "family": family,
        "families": [family] if family else None,
        "parameter_size": str(config.get("parameters") or ""),
        "quantization_level": str(config.get("quantization") or ""),
    }


def model_info(
    kvs: dict[str, tuple[int, Any]], parameter_count: int, *, verbose: bool
) -> dict[str, Any]:
    """GGUF metadata as Ollama's /api/show `model_info`: typed values, sorted keys, without
    the name and chat template; arrays are null unless `verbose` (and then present only
    when the reader kept their items)."""
    info: dict[str, Any] = {}
    for key in sorted(kvs):
        if key in ("general.name", "tokenizer.chat_template"):
            continue
        vtype, value = kvs[key]
        info[key] = _gguf_value(vtype, value, verbose)
    info.setdefault("general.parameter_count", parameter_count)
    return dict(sorted(info.items()))


def _gguf_value(vtype: int, value: Any, verbose: bool) -> Any:
    if vtype == GGUF_ARRAY:
        item_type, count, items = value
        if not count:
            return []
        if not verbose or items is None:
            return None
        return [_gguf_value(item_type, item, verbose) for item in items]
    if isinstance(value, float):
        if not math.isfinite(value):
            return None  # JSON has no NaN or infinity
        return _shortest_float32(value) if vtype == GGUF_FLOAT32 else value
    return value


def _shortest_float32(value: float) -> float:
    """The shortest decimal that reads back as the same float32: 1e-05, not 9.9999997e-06."""
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == packed:
            return candidate
    return value


def capabilities(kvs: dict[str, tuple[int, Any]], template: str, *, vision: bool) -> list[str]:
    """Ollama's capabilities: embedding models are the ones with a pooling type."""
    arch = kvs.get("general.architecture", (0, ""))[1]
    found = ["embedding" if f"{arch}.pooling_type" in kvs else "completion"]
    if "tools" in template:
        found.append("tools")
    if any(marker in template for marker in ("<think>", "enable_thinking", "reasoning_content")):
        found.append("thinking")
    if vision:
        found.append("vision")
    return found


def parameters(values: dict[str, Any]) -> str:
    """Ollama's `parameters` text: one `name value` line each, strings quoted."""
    return "\n".join(f"{name:<{NAME_PADDING}} {_go_value(v)}" for name, v in values.items())


def _go_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value)


def modelfile(name: str, weights: str, template: str, params: dict[str, Any], license: str) -> str:
    """A Modelfile describing the model, as `ollama show --modelfile` prints one."""
    lines = [
        "# Modelfile generated by dmr",
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {name}",
        "",
        f"FROM {weights}",
    ]
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER {k} {_go_value(v)}" for k, v in params.items()]
    if license:
        lines.append(f'LICENSE """{license}"""')
    return "\n".join(lines) + "\n"
