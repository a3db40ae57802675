"""`dmr run`'s chat: one-shot answers and the interactive REPL (spec §10.3, §10.4).

Input handling (`\"\"\"` blocks, `/` commands, `@file` inclusion) and the stream display are
plain functions and small classes that need no terminal; `interactive` puts them behind
readline. Model output goes to stdout, everything else (notices, the token-usage line, and
reasoning when stdout is not a terminal) to stderr, so a pipe receives the answer alone.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from dmr_cli import client, config, render
from dmr_cli.errors import BadRequest, DmrError, ModelNotFound

PROMPT = "> "
CONTINUATION = ". "
BLOCK = '"""'
HISTORY_LENGTH = 1000
MAX_IMAGE_BYTES = 100 * 1024 * 1024
IMAGE_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
}
COLOR_MODES = ("auto", "yes", "no")
EXIT_HINT = "\nUse Ctrl + d or /bye to exit.\n"

HELP = """Available Commands:
  /bye            Exit
  /set            Set a session variable
  /?, /help       Help for a command
  /? shortcuts    Help for keyboard shortcuts
  /? files        Help for file inclusion with @ symbol
  /? set          Help for /set command

Use \"\"\" to begin a multi-line message.

File Inclusion:
  Type @ followed by a filename to include its content in your prompt
  Examples: @README.md, @./src/main.go, @/path/to/file.txt
"""
HELP_SHORTCUTS = """Available keyboard shortcuts:
  Ctrl + a            Move to the beginning of the line (Home)
  Ctrl + e            Move to the end of the line (End)
   Alt + b            Move back (left) one word
   Alt + f            Move forward (right) one word
  Ctrl + k            Delete the sentence after the cursor
  Ctrl + u            Delete the sentence before the cursor
  Ctrl + w            Delete the word before the cursor

  Ctrl + l            Clear the screen
  Ctrl + c            Stop the model from responding
  Ctrl + d            Exit (/bye)
"""
HELP_FILES = """File Inclusion with @ symbol:
  Type @ followed by a filename to include its content in your prompt

  Examples:
    @README.md          Include content of README.md from current directory
    @./src/main.go      Include content of main.go from ./src/ directory
    @/full/path/file    Include content of file using absolute path
    @"file with spaces.txt"  Include content of file with spaces in name

  Images (.jpg, .jpeg, .png, .webp; up to 100 MB) are sent to the model as images.
"""
HELP_SET = """Available /set commands:
  /set system <message>       Set system message for the conversation
  /set num_ctx <n>            Set context window size (in tokens)
  /set parameter num_ctx <n>  Set context window size (in tokens) [deprecated]
"""


# -- multi-line input ---------------------------------------------------------------------


class BlockReader:
    """Collects `\"\"\"` multi-line messages: a line starting with \"\"\" opens a block (text after
    the quotes is kept), a line ending with \"\"\" closes it, and `\"\"\"text\"\"\"` is a block of
    one line. Any other line is a message by itself."""

    def __init__(self) -> None:
        self._lines: list[str] | None = None

    @property
    def in_block(self) -> bool:
        return self._lines is not None

    def reset(self) -> None:
        self._lines = None

    def feed(self, line: str) -> str | None:
        """The complete message once LINE ends one, else None (the block goes on)."""
        if self._lines is None:
            if not line.startswith(BLOCK):
                return line
            rest = line[len(BLOCK) :]
            if len(rest) >= len(BLOCK) and rest.endswith(BLOCK):
                return rest[: -len(BLOCK)]
            self._lines = [rest] if rest else []
            return None
        if not line.endswith(BLOCK):
            self._lines.append(line)
            return None
        last = line[: -len(BLOCK)]
        lines = self._lines + ([last] if last else [])
        self._lines = None
        return "\n".join(lines)


# -- commands -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class SetSystem:
    text: str  # "" clears


@dataclass(frozen=True)
class SetNumCtx:
    value: int


@dataclass(frozen=True)
class Notice:
    text: str  # shown on stderr: help, usage, an unknown command


Command = Quit | SetSystem | SetNumCtx | Notice


def parse_command(line: str) -> Command:
    """What a line starting with `/` asks for (DMR's REPL commands and messages)."""
    words = line.split()
    name = words[0] if words else line
    if name in ("/bye", "/exit"):
        return Quit()
    if name in ("/?", "/help"):
        topic = words[1] if len(words) > 1 else ""
        if topic in ("shortcut", "shortcuts"):
            return Notice(HELP_SHORTCUTS)
        if topic in ("file", "files"):
            return Notice(HELP_FILES)
        return Notice(HELP_SET if topic == "set" else HELP)
    if name == "/set":
        return _parse_set(line, words)
    return Notice(f"Unknown command '{name}'. Type /? for help")


def _parse_set(line: str, words: list[str]) -> Command:
    if len(words) < 2:
        return Notice(HELP_SET)
    option = words[1]
    if option == "system":
        # The text as typed (inner spacing and pasted newlines kept), not re-joined words.
        return SetSystem(line.split(None, 2)[2].strip() if len(words) > 2 else "")
    if option == "num_ctx":
        return _num_ctx(words[2]) if len(words) > 2 else Notice("Usage: /set num_ctx <value>")
    if option == "parameter":
        if len(words) < 4:
            return Notice("Usage: /set parameter <name> <value>\nAvailable parameters: num_ctx")
        if words[2] != "num_ctx":
            return Notice(f"Unknown parameter: {words[2]}\nAvailable parameters: num_ctx")
        return _num_ctx(words[3])
    return Notice(f"Unknown /set option: {option}\n{HELP_SET}")


def _num_ctx(value: str) -> Command:
    if re.fullmatch(r"\d+", value) and 0 < int(value) < 2**31:
        return SetNumCtx(int(value))
    return Notice(f"Invalid value for num_ctx: {value} (must be a positive integer)")


# -- @file inclusion and images -----------------------------------------------------------

_IMAGE_EXT = r"\.(?:jpe?g|png|webp)"
_INCLUSION = re.compile(
    # @file, @"file with spaces", @'file': only at the start of a word, so mail addresses
    # and the like stay text.
    r"""(?<!\S)@(?:"(?P<dq>[^"]+)"|'(?P<sq>[^']+)'|(?P<bare>[^\s"']+))"""
    # DMR also takes image paths without the @: quoted, or starting with / ./ ../ ~/
    rf"""|"(?P<dq_image>[^"\n]+{_IMAGE_EXT})"|'(?P<sq_image>[^'\n]+{_IMAGE_EXT})'"""
    rf"""|(?<!\S)(?P<path_image>(?:~|\.{{1,2}})?/[^\s"']*{_IMAGE_EXT})(?!\S)""",
    re.IGNORECASE,
)
_TRAILING_PUNCTUATION = ".,;:!?)"


@dataclass
class Prompt:
    text: str
    images: list[str] = field(default_factory=list)  # data: URIs


def image_type(path: Path, head: bytes) -> str | None:
    """The image media type of a file from its first bytes, else from its name; None when
    it is no image."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return IMAGE_TYPES.get(path.suffix.lower())


def _image_uri(path: Path) -> str | None:
    """PATH as a base64 data URI if it is an image (≤ 100 MB), else None."""
    try:
        with path.open("rb") as f:
            media_type = image_type(path, f.read(16))
            if media_type is None:
                return None
            if path.stat().st_size > MAX_IMAGE_BYTES:
                raise BadRequest(
                    f"couldn't process image {str(path)!r}: file size exceeds maximum limit "
                    f"({MAX_IMAGE_BYTES // 2**20} MB)"
                )
            f.seek(0)
            data = f.read()
    except OSError as e:
        raise BadRequest(f"cannot read {path}: {e.strerror or e}") from e
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"cannot include {path}: not a UTF-8 text file") from e
    except OSError as e:
        raise BadRequest(f"cannot read {path}: {e.strerror or e}") from e


def _file(base: Path, raw: str) -> Path | None:
    """RAW (relative to BASE, `~` expanded) if it names a regular file."""
    path = base / os.path.expanduser(raw)
    try:
        return path if path.is_file() else None
    except OSError:  # a name too long to be a path, say
        return None


def expand_prompt(text: str, cwd: Path | None = None) -> Prompt:
    """Replace each `@file` in TEXT with the file's content and take image files (by `@` or
    by path) out of the text as data URIs. What names no file (`@here`, `@dataclass`) stays
    as typed; relative paths start at CWD (default: the current directory)."""
    base = cwd or Path.cwd()
    images: list[str] = []

    def include(match: re.Match[str]) -> str:
        at_path = match["dq"] or match["sq"] or match["bare"]
        raw = at_path or match["dq_image"] or match["sq_image"] or match["path_image"]
        suffix = ""
        path = _file(base, raw)
        if path is None and match["bare"]:
            # `read @notes.txt.` ends a sentence: the dot is not part of the name.
            stripped = raw.rstrip(_TRAILING_PUNCTUATION)
            suffix = raw[len(stripped) :]
            path = _file(base, stripped) if stripped else None
        if path is None:
            return match[0]
        uri = _image_uri(path)
        if uri is not None:
            images.append(uri)
            return suffix
        if at_path is None:
            return match[0]  # a path with an image's name but no image inside
        return _read_text(path) + suffix

    expanded = _INCLUSION.sub(include, text)
    return Prompt(expanded.strip() if images else expanded, images)


def compose_prompt(typed: str, piped: str) -> Prompt:
    """The one-shot prompt: the typed words (with `@file`s expanded), then piped stdin after
    a blank line. Piped text is data and is never expanded."""
    prompt = expand_prompt(typed) if typed else Prompt("")
    if piped.strip():
        prompt.text = f"{prompt.text}\n\n{piped}" if prompt.text else piped
    return prompt


def user_content(prompt: Prompt) -> str | list[dict[str, Any]]:
    """A user message's content: the text, or image parts first and then the text."""
    if not prompt.images:
        return prompt.text
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": uri}} for uri in prompt.images
    ]
    if prompt.text:
        parts.append({"type": "text", "text": prompt.text})
    return parts


# -- conversation and streaming -----------------------------------------------------------


@dataclass
class Conversation:
    system: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)

    def messages(self, user: Mapping[str, Any]) -> list[dict[str, Any]]:
        """What a turn sends: the system message first, the history, then USER."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.history, dict(user)]

    def record(self, user: Mapping[str, Any], answer: str) -> None:
        self.history += [dict(user), {"role": "assistant", "content": answer}]


def chat_body(model: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


class StreamPrinter:
    """Shows a chat stream as DMR does: reasoning under `Thinking:`, then `--`, then the
    answer, each piece written as it arrives.

    The answer goes to OUT, reasoning to THOUGHTS (faint when COLOR). When they differ
    (stdout is piped: reasoning goes to stderr) OUT receives the answer and nothing else."""

    def __init__(
        self, out: Callable[[str], None], thoughts: Callable[[str], None], *, color: bool
    ) -> None:
        self._out, self._thoughts, self._color = out, thoughts, color
        self._state = ""  # "" (nothing yet), "reasoning" or "content"
        self._answer: list[str] = []
        self.usage: dict[str, Any] | None = None

    @property
    def answer(self) -> str:
        return "".join(self._answer)

    def feed(self, chunk: Mapping[str, Any]) -> None:
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = chunk.get("choices") or []
        delta = (choices[0].get("delta") or {}) if choices else {}
        shared = self._out is self._thoughts
        reasoning = delta.get("reasoning_content")
        if reasoning:
            if self._state == "content" and shared:
                self._out("\n\n")
            if self._state != "reasoning":
                self._think("Thinking:\n")
            self._state = "reasoning"
            self._think(reasoning)
        content = delta.get("content")
        if content:
            if self._state == "reasoning":
                self._thoughts("\n\n--\n\n")
            self._state = "content"
            self._out(content)
            self._answer.append(content)

    def _think(self, text: str) -> None:
        self._thoughts(render.dim(text) if self._color else text)

    def end(self) -> None:
        """End the output line (also after an interrupted or failed stream)."""
        if self._state == "reasoning" and self._out is not self._thoughts:
            self._thoughts("\n")
        self._out("\n")


def usage_line(usage: Mapping[str, Any] | None) -> str | None:
    if not usage:
        return None
    return (
        f"Token usage: {usage.get('prompt_tokens', 0)} prompt + "
        f"{usage.get('completion_tokens', 0)} completion = {usage.get('total_tokens', 0)} total"
    )


def _show_usage(usage: Mapping[str, Any] | None, color: bool) -> None:
    line = usage_line(usage)
    if line:
        render.err(render.dim(line) if color else line)


def stream_answer(body: Mapping[str, Any], printer: StreamPrinter) -> None:
    # closing(): an interrupt between two chunks still closes the connection at once.
    with contextlib.closing(client.chat_stream(body)) as chunks:
        for chunk in chunks:
            printer.feed(chunk)


def use_color(mode: str, stream: TextIO) -> bool:
    """`--color`: yes, no, or auto (a terminal, unless NO_COLOR is set or TERM=dumb)."""
    if mode != "auto":
        return mode == "yes"
    return stream.isatty() and not config.env("NO_COLOR") and config.env("TERM") != "dumb"


# -- the command's steps ------------------------------------------------------------------


def ensure_local(model: str) -> None:
    """Pull MODEL first when the daemon does not have it, announcing it as DMR does."""
    try:
        with client.failing("Failed to inspect model"):
            client.model(model)
        return
    except ModelNotFound:
        pass
    render.err(f"Unable to find model '{model}' locally. Pulling from the server.")
    display = render.progress_display()
    try:
        with client.failing("Failed to pull model"):
            message = client.pull(model, display.update)
    finally:
        display.close()
    render.err(message)  # stdout carries the answer only


def one_shot(model: str, prompt: Prompt, *, color: bool) -> None:
    """Answer PROMPT once: the answer streamed to stdout and a newline; reasoning to stdout
    on a terminal, to stderr otherwise; the token-usage line to stderr."""
    thoughts = render.write if sys.stdout.isatty() else render.write_err
    printer = StreamPrinter(render.write, thoughts, color=color)
    body = chat_body(model, [{"role": "user", "content": user_content(prompt)}])
    try:
        with client.failing("Failed to generate a response"):
            stream_answer(body, printer)
    finally:
        printer.end()
    _show_usage(printer.usage, color)


def history_path() -> Path | None:
    """Where input history is kept; None when DOCKER_MODEL_NOHISTORY is set."""
    if config.env("DOCKER_MODEL_NOHISTORY"):
        return None
    return config.state_dir() / "history"


class Terminal:
    """`input()` with readline line editing and a history file, recording what was on the
    line when Ctrl-C came."""

    def __init__(self, history: Path | None) -> None:
        self.history = history
        self.interrupted_text = ""
        self._line_buffer: Callable[[], str] | None = None
        self._save: Callable[[str], None] | None = None
        try:
            import readline
        except ImportError:  # a Python built without it: plain input()
            return
        self._line_buffer = readline.get_line_buffer
        readline.set_history_length(HISTORY_LENGTH)
        if history is not None:
            with contextlib.suppress(OSError):
                readline.read_history_file(history)
            self._save = readline.write_history_file

    def read(self, prompt: str) -> str:
        """One line; raises EOFError on Ctrl-D and KeyboardInterrupt on Ctrl-C."""
        self.interrupted_text = ""
        previous = signal.signal(signal.SIGINT, self._interrupted)
        try:
            return input(prompt)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _interrupted(self, signum: int, frame: FrameType | None) -> None:
        # Python runs this before readline clears the line, so the typed text is still there.
        if self._line_buffer is not None:
            self.interrupted_text = self._line_buffer()
        raise KeyboardInterrupt

    def close(self) -> None:
        if self._save is not None and self.history is not None:
            with contextlib.suppress(OSError):
                self.history.parent.mkdir(parents=True, exist_ok=True)
                self._save(str(self.history))


class Chat:
    """The interactive chat with one model (spec §10.4)."""

    def __init__(self, model: str, *, color: bool) -> None:
        self.model, self.color = model, color
        self.conversation = Conversation()
        self.reader = BlockReader()
        # Load the model while the user types the first message; a failure shows on that
        # message's request.
        self._preload = threading.Thread(target=self._load, name="dmr-preload", daemon=True)

    def _load(self) -> None:
        with contextlib.suppress(DmrError):
            client.preload(self.model)

    def run(self, terminal: Terminal) -> None:
        """Read and answer until /bye, /exit or Ctrl-D."""
        self._preload.start()
        while True:
            try:
                line = terminal.read(CONTINUATION if self.reader.in_block else PROMPT)
            except EOFError:
                render.write("\n")
                return
            except KeyboardInterrupt:
                empty = not self.reader.in_block and not terminal.interrupted_text
                render.write(EXIT_HINT if empty else "\n")
                self.reader.reset()
                continue
            if not self.reader.in_block and line.startswith("/"):
                if not self.command(parse_command(line)):
                    return
                continue
            message = self.reader.feed(line)
            if message is not None and message.strip():
                self.turn(message)

    def command(self, command: Command) -> bool:
        """Carry out COMMAND; False when it ends the chat."""
        if isinstance(command, Quit):
            return False
        if isinstance(command, SetSystem):
            self.conversation.system = command.text
            render.err("Set system message." if command.text else "Cleared system message.")
        elif isinstance(command, SetNumCtx):
            # A runner still loading cannot be reconfigured (409): let the preload finish.
            self._preload.join()
            try:
                client.configure({"model": self.model, "context-size": command.value})
            except DmrError as e:
                render.err(f"Failed to set num_ctx: {e.message}")
            else:
                render.err(f"Set num_ctx to {command.value}")
        else:
            render.err(command.text)
        return True

    def turn(self, message: str) -> None:
        """Send MESSAGE with the conversation so far and stream the answer. Ctrl-C stops the
        answer and forgets the turn; the chat goes on."""
        try:
            prompt = expand_prompt(message)
        except DmrError as e:
            render.error(e.message, e.hint)
            return
        user = {"role": "user", "content": user_content(prompt)}
        printer = StreamPrinter(render.write, render.write, color=self.color)
        try:
            stream_answer(chat_body(self.model, self.conversation.messages(user)), printer)
        except KeyboardInterrupt:
            printer.end()
            return
        except DmrError as e:
            printer.end()
            render.err(f"Failed to generate a response: {e.message}")
            return
        printer.end()
        self.conversation.record(user, printer.answer)
        _show_usage(printer.usage, self.color)


def interactive(model: str, *, color: bool) -> None:
    terminal = Terminal(history_path())
    try:
        Chat(model, color=color).run(terminal)
    finally:
        terminal.close()
