"""`dmr run`'s chat logic without a terminal or a daemon: multi-line blocks, REPL commands,
`@file` inclusion, the messages each turn sends, the stream display and SSE parsing."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest

from dmr_cli import chat, client
from dmr_cli.chat import (
    BlockReader,
    Conversation,
    Notice,
    Prompt,
    Quit,
    SetNumCtx,
    SetSystem,
    StreamPrinter,
    compose_prompt,
    expand_prompt,
    parse_command,
    user_content,
)
from dmr_cli.errors import BadRequest, DmrError, ModelNotFound, NotFound

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 24


def feed_all(reader: BlockReader, lines: list[str]) -> list[str | None]:
    return [reader.feed(line) for line in lines]


# -- multi-line blocks --------------------------------------------------------------------


def test_plain_lines_are_messages_by_themselves() -> None:
    reader = BlockReader()
    assert reader.feed("hello there") == "hello there"
    assert reader.feed('say "hi"') == 'say "hi"'
    assert not reader.in_block


def test_block_collects_lines_until_one_ends_with_quotes() -> None:
    reader = BlockReader()
    assert feed_all(reader, ['"""', "first", "", "  third", 'last"""']) == [
        None,
        None,
        None,
        None,
        "first\n\n  third\nlast",
    ]
    assert not reader.in_block


def test_block_keeps_text_on_the_opening_line_and_drops_empty_edges() -> None:
    reader = BlockReader()
    assert reader.feed('"""Summarise:') is None
    assert reader.in_block
    assert reader.feed("a") is None
    assert reader.feed('"""') == "Summarise:\na"
    assert feed_all(reader, ['"""', "only", '"""']) == [None, None, "only"]


def test_same_line_block() -> None:
    reader = BlockReader()
    assert reader.feed('"""one line"""') == "one line"
    assert reader.feed('""""""') == ""
    assert not reader.in_block


def test_reset_abandons_a_block() -> None:
    reader = BlockReader()
    reader.feed('"""draft')
    reader.reset()
    assert not reader.in_block
    assert reader.feed("next") == "next"


# -- commands -----------------------------------------------------------------------------


def test_quit_commands() -> None:
    assert parse_command("/bye") == Quit()
    assert parse_command("/exit") == Quit()
    assert parse_command("  /bye  ".strip()) == Quit()


def test_help_topics() -> None:
    assert parse_command("/?") == Notice(chat.HELP)
    assert parse_command("/help") == Notice(chat.HELP)
    assert parse_command("/? shortcuts") == Notice(chat.HELP_SHORTCUTS)
    assert parse_command("/help files") == Notice(chat.HELP_FILES)
    assert parse_command("/? set") == Notice(chat.HELP_SET)
    assert parse_command("/? nonsense") == Notice(chat.HELP)
    assert "/bye" in chat.HELP and '"""' in chat.HELP


def test_set_system_keeps_the_text_as_typed() -> None:
    assert parse_command("/set system You are  a pirate.") == SetSystem("You are  a pirate.")
    assert parse_command("/set system line one\nline two") == SetSystem("line one\nline two")
    assert parse_command("/set system") == SetSystem("")
    assert parse_command("/set system   ") == SetSystem("")


def test_set_num_ctx_and_its_legacy_form() -> None:
    assert parse_command("/set num_ctx 4096") == SetNumCtx(4096)
    assert parse_command("/set parameter num_ctx 128") == SetNumCtx(128)
    for bad in ("0", "-5", "many", "1e3", "99999999999"):
        assert parse_command(f"/set num_ctx {bad}") == Notice(
            f"Invalid value for num_ctx: {bad} (must be a positive integer)"
        )
    assert parse_command("/set num_ctx") == Notice("Usage: /set num_ctx <value>")
    assert parse_command("/set parameter temperature 1") == Notice(
        "Unknown parameter: temperature\nAvailable parameters: num_ctx"
    )
    usage = parse_command("/set parameter num_ctx")
    assert isinstance(usage, Notice) and usage.text.startswith("Usage: /set parameter")


def test_set_without_a_known_option_shows_its_help() -> None:
    assert parse_command("/set") == Notice(chat.HELP_SET)
    unknown = parse_command("/set verbose")
    assert isinstance(unknown, Notice)
    assert unknown.text.startswith("Unknown /set option: verbose\n")


def test_unknown_command() -> None:
    assert parse_command("/load x") == Notice("Unknown command '/load'. Type /? for help")
    assert parse_command("/") == Notice("Unknown command '/'. Type /? for help")


# -- @file inclusion ----------------------------------------------------------------------


def test_at_file_is_replaced_by_its_content(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("alpha\nbeta\n")
    (tmp_path / "my notes.md").write_text("# spaced")
    prompt = expand_prompt('Read @notes.txt and @"my notes.md" then @./notes.txt.', tmp_path)
    assert prompt == Prompt("Read alpha\nbeta\n and # spaced then alpha\nbeta\n.", [])


def test_at_file_with_an_absolute_path_and_single_quotes(tmp_path: Path) -> None:
    target = tmp_path / "sub dir" / "f.py"
    target.parent.mkdir()
    target.write_text("print(1)")
    assert expand_prompt(f"@'{target}'", Path("/")).text == "print(1)"


def test_what_names_no_file_stays_as_typed(tmp_path: Path) -> None:
    (tmp_path / "example.com").write_text("NOT INCLUDED")
    (tmp_path / "adir").mkdir()
    text = f"mail me@example.com, use @dataclass, see @adir, @missing.txt, @~nobody/x, @{'n' * 300}"
    assert expand_prompt(text, tmp_path) == Prompt(text, [])


def test_unreadable_inclusions_are_errors(tmp_path: Path) -> None:
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(BadRequest, match="not a UTF-8 text file"):
        expand_prompt("@blob.bin", tmp_path)


def test_images_become_data_uris_before_the_text(tmp_path: Path) -> None:
    (tmp_path / "cat.png").write_bytes(PNG)
    (tmp_path / "photo one.JPG").write_bytes(JPEG)
    (tmp_path / "logo").write_bytes(PNG)  # an image by content, without a suffix
    prompt = expand_prompt('What is in @cat.png and "photo one.JPG" and @logo?', tmp_path)
    assert prompt.text == "What is in  and  and ?"
    assert prompt.images == [
        "data:image/png;base64," + base64.b64encode(PNG).decode(),
        "data:image/jpeg;base64," + base64.b64encode(JPEG).decode(),
        "data:image/png;base64," + base64.b64encode(PNG).decode(),
    ]
    content = user_content(prompt)
    assert isinstance(content, list)
    assert [part["type"] for part in content] == ["image_url"] * 3 + ["text"]
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert content[-1] == {"type": "text", "text": prompt.text}


def test_bare_image_paths_are_taken_as_images(tmp_path: Path) -> None:
    image = tmp_path / "shot.webp"
    image.write_bytes(b"RIFF\x00\x00\x00\x00WEBPVP8 ")
    prompt = expand_prompt(f"describe {image} please", Path("/"))
    assert prompt.text == "describe  please"
    assert prompt.images[0].startswith("data:image/webp;base64,")
    missing = f"describe {tmp_path}/none.png"
    assert expand_prompt(missing, Path("/")) == Prompt(missing, [])


def test_oversized_images_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "big.png").write_bytes(PNG)
    monkeypatch.setattr(chat, "MAX_IMAGE_BYTES", len(PNG) - 1)
    with pytest.raises(BadRequest, match="exceeds maximum limit"):
        expand_prompt("@big.png", tmp_path)


def test_text_only_content_is_a_plain_string() -> None:
    assert user_content(Prompt("hi")) == "hi"
    assert user_content(Prompt("", ["data:image/png;base64,AA=="])) == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    ]


def test_one_shot_prompt_appends_stdin_after_a_blank_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("A")
    assert compose_prompt("sum up @a.txt", "piped @a.txt\n") == Prompt(
        "sum up A\n\npiped @a.txt\n", []
    )
    assert compose_prompt("", "only stdin") == Prompt("only stdin", [])
    assert compose_prompt("words only", "  \n") == Prompt("words only", [])


# -- conversation -------------------------------------------------------------------------


def test_each_turn_resends_the_history_after_the_system_message() -> None:
    conversation = Conversation()
    first = {"role": "user", "content": "one"}
    assert conversation.messages(first) == [first]
    conversation.record(first, "answer one")
    conversation.system = "Be brief."
    second = {"role": "user", "content": "two"}
    assert conversation.messages(second) == [
        {"role": "system", "content": "Be brief."},
        first,
        {"role": "assistant", "content": "answer one"},
        second,
    ]
    conversation.system = ""
    assert conversation.messages(second)[0] == first


def test_chat_body_streams_with_usage() -> None:
    body = chat.chat_body("ai/x", [{"role": "user", "content": "hi"}])
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["model"] == "ai/x"


# -- stream display -----------------------------------------------------------------------


def delta(**fields: str) -> dict[str, object]:
    return {"choices": [{"index": 0, "delta": fields}]}


def test_stream_printer_shows_reasoning_then_the_answer_like_dmr() -> None:
    out: list[str] = []
    printer = StreamPrinter(out.append, out.append, color=False)
    for chunk in (
        delta(role="assistant"),
        delta(reasoning_content="Let me "),
        delta(reasoning_content="think."),
        delta(content="Hello"),
        delta(content=" world"),
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
    ):
        printer.feed(chunk)
    printer.end()
    assert "".join(out) == "Thinking:\nLet me think.\n\n--\n\nHello world\n"
    assert printer.answer == "Hello world"
    assert chat.usage_line(printer.usage) == "Token usage: 3 prompt + 4 completion = 7 total"


def test_stream_printer_keeps_a_piped_answer_clean() -> None:
    out: list[str] = []
    thoughts: list[str] = []
    printer = StreamPrinter(out.append, thoughts.append, color=True)
    for chunk in (
        delta(reasoning_content="hmm"),
        delta(content="42"),
        delta(reasoning_content="again"),
    ):
        printer.feed(chunk)
    printer.end()
    assert "".join(out) == "42\n"
    assert "".join(thoughts) == (
        "\x1b[2mThinking:\n\x1b[0m\x1b[2mhmm\x1b[0m\n\n--\n\n"
        "\x1b[2mThinking:\n\x1b[0m\x1b[2magain\x1b[0m\n"
    )


def test_stream_printer_without_color_or_usage() -> None:
    out: list[str] = []
    printer = StreamPrinter(out.append, out.append, color=False)
    printer.feed(delta(content="a"))
    printer.feed(delta(content="b", reasoning_content=""))
    printer.end()
    assert out == ["a", "b", "\n"]
    assert "\x1b" not in "".join(out)
    assert printer.usage is None and chat.usage_line(None) is None


def test_color_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert chat.use_color("yes", io.StringIO())
    assert not chat.use_color("no", Tty())
    assert chat.use_color("auto", Tty())
    assert not chat.use_color("auto", io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not chat.use_color("auto", Tty())


# -- SSE and errors -----------------------------------------------------------------------


def test_sse_lines() -> None:
    assert client.sse_chunk('data: {"choices": []}') == {"choices": []}
    assert client.sse_chunk('data:{"a":1}') == {"a": 1}
    for ignored in ("", ": keep-alive", "event: message", "data: [DONE]", "data: "):
        assert client.sse_chunk(ignored) is None
    with pytest.raises(DmrError, match="the runner exited unexpectedly"):
        client.sse_chunk(
            'data: {"error":{"message":"the runner exited unexpectedly","type":"server_error"}}'
        )
    with pytest.raises(DmrError, match="unexpected data"):
        client.sse_chunk("data: {not json")


def test_inference_errors_keep_just_the_message() -> None:
    runner = client._inference_error(400, '{"error": {"code": 400, "message": "bad input"}}')
    assert runner.message == "bad input"
    daemon = client._inference_error(500, '{"type":"error","message":"runner failed"}')
    assert daemon.message == "runner failed"
    plain = client._inference_error(404, "model not found\n")
    assert isinstance(plain, NotFound) and not isinstance(plain, ModelNotFound)
    assert plain.message == "model not found"


# -- history ------------------------------------------------------------------------------


def test_history_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DMR_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("DOCKER_MODEL_NOHISTORY", raising=False)
    assert chat.history_path() == tmp_path / "history"
    monkeypatch.setenv("DOCKER_MODEL_NOHISTORY", "1")
    assert chat.history_path() is None
