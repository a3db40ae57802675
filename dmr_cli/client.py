"""The DMR HTTP client the commands use, and the daemon auto-start.

Two transports, chosen for start-up time. Plain request/response calls (`ls`, `rm`, `tag`,
`df`, ...) go through a minimal HTTP/1.1 client on a raw socket: stdlib `socket` costs ~2 ms
to import against ~17 ms for `http.client` and ~100 ms for httpx, and `dmr ls` must start
in a fraction of typer's own import time. Streaming calls (pull, push, load) use httpx,
imported when they run.

Errors come back as the `DmrError` subclass matching the daemon's status, carrying its
plain-text message.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple, TypeVar
from urllib.parse import quote, urlencode, urlsplit

from dmr_cli import __version__, config, render
from dmr_cli.errors import (
    BadRequest,
    Conflict,
    DaemonUnavailable,
    DmrError,
    InvalidReference,
    ModelNotFound,
    NotFound,
    RegistryError,
    Unauthorized,
    UnsupportedMediaType,
)

if TYPE_CHECKING:
    import ssl

    import httpx

USER_AGENT = f"dmr/{__version__} docker-model-cli/{__version__}"
CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 300.0
AUTO_START_TIMEOUT = 15.0
AUTO_START_POLL = 0.05
RETRY_DELAYS = (1, 2, 4, 8)  # spec §6.3
RETRY_STATUSES = frozenset({502, 503, 504})

ProgressCallback = Callable[[Mapping[str, Any]], None]
T = TypeVar("T")


class DaemonNotRunning(DaemonUnavailable):
    """Nothing listens at the daemon address (connection refused, socket file missing)."""

    def __init__(self, url: str) -> None:
        super().__init__(f"dmr daemon is not running at {url}", hint="start it with: dmr serve")


# -- address ------------------------------------------------------------------------------


class Endpoint(NamedTuple):
    url: str  # as shown to users: http://127.0.0.1:12434 or unix:///path/to.sock
    scheme: str  # http | https | unix
    netloc: str  # Host header value
    host: str
    port: int
    socket_path: str | None = None
    prefix: str = ""  # path prefix from MODEL_RUNNER_HOST, prepended to every route


@cache
def endpoint() -> Endpoint:
    """Where the daemon is, from `MODEL_RUNNER_HOST` (default http://127.0.0.1:12434)."""
    return parse_endpoint(config.runner_host())


def parse_endpoint(url: str) -> Endpoint:
    """`http(s)://HOST:PORT[/prefix]` or `unix:///path/to.sock` as an `Endpoint`."""
    if url.startswith("unix://"):
        return Endpoint(url, "unix", "localhost", "localhost", 0, url[len("unix://") :])
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(
            f"invalid MODEL_RUNNER_HOST {url!r}",
            hint="use http://HOST:PORT, https://HOST:PORT or unix:///path/to.sock",
        )
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Endpoint(
        url, parts.scheme, parts.netloc, parts.hostname, port, prefix=parts.path.rstrip("/")
    )


def is_default_endpoint() -> bool:
    """The local default address: the only one the CLI starts a daemon for."""
    return not config.env("MODEL_RUNNER_HOST") or config.runner_host() == config.DEFAULT_HOST


def is_local_endpoint() -> bool:
    """The daemon is this machine's own: the default address or a Unix socket, so its log
    files are where `config.log_dir()` says."""
    return is_default_endpoint() or endpoint().scheme == "unix"


def engine_kind() -> str:
    """`dmr version`'s Engine line, in DMR's vocabulary."""
    if config.env("MODEL_RUNNER_HOST"):
        return "Docker Engine (Manual Install)"
    return "Docker Engine"


def _ssl_context() -> ssl.SSLContext:
    import ssl

    ctx = ssl.create_default_context(cafile=config.env("MODEL_RUNNER_TLS_CA_CERT") or None)
    if config.env_bool("MODEL_RUNNER_TLS_SKIP_VERIFY"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def auth_headers() -> dict[str, str]:
    """`Authorization: Bearer $DMR_API_KEY` for a daemon that requires API keys."""
    key = config.env("DMR_API_KEY")
    if not key:
        return {}
    # The raw-socket transport writes headers as they are: a line break would end the header.
    if not key.isprintable() or not key.isascii():
        raise BadRequest("DMR_API_KEY holds characters that cannot be sent in an HTTP header")
    return {"Authorization": f"Bearer {key}"}


# -- errors -------------------------------------------------------------------------------


def error_for_status(status: int, text: str, path: str) -> DmrError:
    """The `DmrError` for a non-2xx daemon answer (its body is DMR's plain-text message)."""
    message = text.strip() or f"the dmr daemon answered HTTP {status} for {path}"
    if status == 400:
        if "reference" in message.lower():
            return InvalidReference(message)
        return BadRequest(message)
    if status == 401 and "API key" in message:  # the daemon's own key check (server/access.py)
        hint = (
            "DMR_API_KEY is not one of the daemon's keys (DMR_API_KEYS or its keys file)"
            if config.env("DMR_API_KEY")
            else "set DMR_API_KEY to one of the daemon's API keys"
        )
        return Unauthorized(message, hint=hint)
    if status == 401:
        return Unauthorized(
            message,
            hint="check your registry credentials (docker login), or set HF_TOKEN for "
            "Hugging Face models",
        )
    if status == 404:
        models_route = path.startswith(("/models", "/engines/v1/models"))
        return ModelNotFound(message) if models_route else NotFound(message)
    if status == 409:
        return Conflict(message)
    if status == 422:
        return UnsupportedMediaType(message, hint="this model needs a newer version of dmr")
    if status == 503:
        return DaemonUnavailable(f"the dmr daemon at {endpoint().url} is unavailable: {message}")
    if status in RETRY_STATUSES:
        return RegistryError(message, http_status=status)
    return DmrError(message)


@contextmanager
def failing(prefix: str) -> Iterator[None]:
    """Prefix daemon errors with what the command was doing: `Failed to pull model: ...`."""
    try:
        yield
    except DaemonUnavailable:
        raise
    except DmrError as e:
        e.message = f"{prefix}: {e.message}"
        e.args = (e.message,)
        raise


# -- raw-socket transport (fast paths) ----------------------------------------------------


class Response(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body) if self.body.strip() else None


def _connect(ep: Endpoint, timeout: float) -> socket.socket:
    try:
        if ep.socket_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(CONNECT_TIMEOUT)
                sock.connect(ep.socket_path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((ep.host, ep.port), timeout=CONNECT_TIMEOUT)
    except (ConnectionRefusedError, FileNotFoundError) as e:
        raise DaemonNotRunning(ep.url) from e
    except OSError as e:
        raise DaemonUnavailable(f"cannot reach the dmr daemon at {ep.url}: {e}") from e
    if ep.scheme == "https":
        sock = _ssl_context().wrap_socket(sock, server_hostname=ep.host)
    sock.settimeout(timeout)
    return sock


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";", 1)[0], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


def _parse_response(raw: bytes, url: str) -> Response:
    try:
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = _dechunk(body)
        elif "content-length" in headers:
            body = body[: int(headers["content-length"])]
    except (ValueError, IndexError) as e:
        raise DaemonUnavailable(f"the server at {url} did not answer like a dmr daemon") from e
    return Response(status, headers, body)


def send(
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    timeout: float = REQUEST_TIMEOUT,
    at: Endpoint | None = None,
) -> Response:
    """One HTTP/1.1 exchange (`Connection: close`) with the daemon (or the one AT), response
    read whole."""
    ep = at or endpoint()
    head = [
        f"{method} {ep.prefix}{path} HTTP/1.1",
        f"Host: {ep.netloc}",
        f"User-Agent: {USER_AGENT}",
        "Accept: application/json",
        "Connection: close",
    ]
    head += [f"{name}: {value}" for name, value in auth_headers().items()]
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b"")
    with _connect(ep, timeout) as sock:
        try:
            sock.sendall(request)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError as e:
            raise DaemonUnavailable(
                f"lost the connection to the dmr daemon at {ep.url}: {e}"
            ) from e
    return _parse_response(b"".join(chunks), ep.url)


def _call(method: str, path: str, payload: Any = None, *, auto_start: bool = True) -> Response:
    body = None if payload is None else json.dumps(payload).encode()
    try:
        return send(method, path, body)
    except DaemonNotRunning:
        if not auto_start:
            raise
        _auto_start()
        return send(method, path, body)


def request_json(
    method: str,
    path: str,
    payload: Any = None,
    *,
    expect: Iterable[int] = (200,),
    auto_start: bool = True,
) -> Any:
    """Send, check the status, decode the JSON answer (None for an empty body)."""
    response = _call(method, path, payload, auto_start=auto_start)
    if response.status not in tuple(expect):
        raise error_for_status(response.status, response.text, path)
    try:
        return response.json()
    except ValueError as e:
        raise DmrError(
            f"unexpected answer from the dmr daemon to {method} {path}: {response.text[:200]}"
        ) from e


def get_json(path: str, *, auto_start: bool = True) -> Any:
    return request_json("GET", path, auto_start=auto_start)


# -- auto-start ---------------------------------------------------------------------------


def _auto_start() -> None:
    ep = endpoint()
    if not is_default_endpoint() or config.env_bool("DMR_NO_AUTO_START"):
        raise DaemonNotRunning(ep.url)
    start_daemon(["--host", ep.host, "--port", str(ep.port)])


def start_daemon(
    args: list[str], timeout: float = AUTO_START_TIMEOUT, *, at: Endpoint | None = None
) -> int:
    """Start `dmr serve ARGS` in the background and wait until GET /models answers at the
    CLI's endpoint (or AT, where ARGS make it listen); return its pid."""
    from dmr_cli.runtime.daemon import daemon_exit_status, log_path, pid_path, spawn_daemon

    ep = at or endpoint()
    log = log_path()
    pid = spawn_daemon(log, pid_path(), args)
    render.err(f"Starting dmr daemon (pid {pid}) on {ep.url}, log: {log}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            # 401: it answers, and asks for a key the next request will report missing.
            if send("GET", "/models", timeout=timeout, at=ep).status in (200, 401):
                return pid
        except DaemonUnavailable:
            pass
        code = daemon_exit_status(pid)
        if code is not None:
            raise DaemonUnavailable(
                f"the dmr daemon exited during start-up (exit status {code})",
                hint=f"see its log: {log}",
            )
        if time.monotonic() >= deadline:
            raise DaemonUnavailable(
                f"the dmr daemon (pid {pid}) did not answer on {ep.url} within {timeout:g} s",
                hint=f"see its log: {log}",
            )
        time.sleep(AUTO_START_POLL)


def ensure_daemon() -> None:
    """Make sure something answers (starting the daemon if allowed) before a long stream."""
    _call("GET", "/version")


# -- streaming transport (httpx) ----------------------------------------------------------


def _http_client() -> httpx.Client:
    import httpx

    ep = endpoint()
    transport = httpx.HTTPTransport(uds=ep.socket_path) if ep.socket_path else None
    base = "http://localhost" if ep.socket_path else f"{ep.scheme}://{ep.netloc}"
    return httpx.Client(
        base_url=base + ep.prefix,
        transport=transport,
        headers={"User-Agent": USER_AGENT, **auth_headers()},
        timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT),
        verify=_ssl_context() if ep.scheme == "https" else True,
        # The daemon is local or named explicitly: never route it through HTTP_PROXY.
        trust_env=False,
    )


def _consume(lines: Iterable[str], on_event: ProgressCallback) -> str:
    """Read DMR's NDJSON progress stream; return the success message, raise on error lines."""
    import html

    final: str | None = None
    garbage: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            try:  # a daemon that ignored our Accept header HTML-escapes each line
                event = json.loads(html.unescape(line))
            except ValueError:
                garbage.append(line)
                continue
        if not isinstance(event, dict):
            garbage.append(line)
        elif event.get("type") == "success":
            final = str(event.get("message", ""))
        elif event.get("type") == "error":
            raise DmrError(str(event.get("message", "")).removeprefix("Error: "))
        else:
            on_event(event)
    if final is None:
        if garbage:
            raise DmrError(
                "unexpected response from the dmr daemon (not progress data): "
                + "\n".join(garbage)[:4096]
            )
        raise DaemonUnavailable("the dmr daemon ended the progress stream without a result")
    return final


def _progress_request(
    path: str,
    on_event: ProgressCallback,
    *,
    payload: Any = None,
    content: Iterator[bytes] | None = None,
    content_type: str = "application/json",
) -> str:
    import httpx

    headers = {"Accept": "application/json", "Content-Type": content_type}
    try:
        with (
            _http_client() as http,
            http.stream("POST", path, json=payload, content=content, headers=headers) as resp,
        ):
            if resp.status_code != 200:
                resp.read()
                raise error_for_status(resp.status_code, resp.text, path)
            return _consume(resp.iter_lines(), on_event)
    except httpx.TransportError as e:
        raise DaemonUnavailable(
            f"lost the connection to the dmr daemon at {endpoint().url}: {e or type(e).__name__}"
        ) from e


def _retryable(e: DmrError) -> bool:
    if isinstance(e, RegistryError):
        return e.http_status in RETRY_STATUSES
    return isinstance(e, DaemonUnavailable)


def with_retries(what: str, attempt: Callable[[], T]) -> T:
    """Spec §6.3: retry network errors and 502/503/504 up to 4 times (1, 2, 4, 8 s)."""
    for n, delay in enumerate(RETRY_DELAYS, start=1):
        try:
            return attempt()
        except DmrError as e:
            if not _retryable(e):
                raise
            render.err(f"Retrying {what} (attempt {n}/{len(RETRY_DELAYS)}) in {delay}s...")
            time.sleep(delay)
    return attempt()


def _hf_token(model: str) -> str | None:
    if model.lower().startswith(("hf.co/", "huggingface.co/")):
        return config.env("HF_TOKEN") or None
    return None


def model_path(ref: str) -> str:
    return "/models/" + quote(ref, safe="/:@")


# -- the DMR API --------------------------------------------------------------------------


def models() -> list[dict[str, Any]]:
    return list(get_json("/models") or [])


def openai_models() -> dict[str, Any]:
    return dict(get_json("/engines/v1/models"))


def model(ref: str, *, remote: bool = False) -> dict[str, Any]:
    return dict(get_json(model_path(ref) + ("?remote=true" if remote else "")))


def openai_model(ref: str) -> dict[str, Any]:
    return dict(get_json("/engines/v1/models/" + quote(ref, safe="/:@")))


def delete(ref: str, *, force: bool) -> list[dict[str, str]]:
    path = f"{model_path(ref)}?force={'true' if force else 'false'}"
    return list(request_json("DELETE", path) or [])


def tag(source: str, repo: str, tag: str) -> dict[str, Any]:
    path = f"{model_path(source)}/tag?{urlencode({'repo': repo, 'tag': tag})}"
    return dict(request_json("POST", path, expect=(200, 201)) or {})


def disk_usage() -> dict[str, Any]:
    return dict(get_json("/engines/df"))


def unload_all() -> None:
    request_json("POST", "/engines/unload", {"all": True})


def purge() -> None:
    request_json("DELETE", "/models/purge")


def server_version() -> str | None:
    """The daemon's version, or None when nothing answers (never starts one)."""
    try:
        return str(get_json("/version", auto_start=False).get("version", ""))
    except DmrError:
        return None


def status() -> dict[str, str] | None:
    """DMR's status probe, which never starts a daemon: GET /models must answer (None when
    it answers 503, "not running"), then GET /engines/status gives each backend's status.

    Raises `DaemonUnavailable` when nothing can be reached."""
    response = send("GET", "/models")
    if response.status == 503:
        return None
    if response.status == 401:
        raise error_for_status(401, response.text, "/models")
    if response.status != 200:
        raise DmrError(f"unexpected status code: {response.status}")
    try:
        return dict(get_json("/engines/status", auto_start=False) or {})
    except NotFound:
        return {}  # a daemon without the runtime layer


def runtime() -> dict[str, Any] | None:
    """dmr's GET /engines/runtime (accelerator, runner, slots); None from a daemon without
    it, such as a real DMR."""
    try:
        return dict(get_json("/engines/runtime", auto_start=False))
    except NotFound:
        return None


def ps() -> list[dict[str, Any]]:
    """GET /engines/ps: the loaded runners."""
    return list(get_json("/engines/ps", auto_start=False) or [])


def unload(models: list[str], *, all_models: bool = False, backend: str = "") -> int:
    """POST /engines/unload; returns how many runners went."""
    payload = {"all": all_models, "backend": backend, "models": models}
    answer = request_json("POST", "/engines/unload", payload, auto_start=False)
    return int((answer or {}).get("unloaded_runners", 0))


def configure(body: Mapping[str, Any]) -> None:
    """POST /engines/_configure (spec §2.7 body); the daemon answers 202."""
    request_json("POST", "/engines/_configure", dict(body), expect=(202,))


def configs(model: str | None = None) -> list[dict[str, Any]]:
    """GET /engines/_configure[?model=]: the stored runner configurations."""
    query = "?" + urlencode({"model": model}) if model else ""
    return list(get_json("/engines/_configure" + query) or [])


def logs(*, follow: bool, no_engines: bool) -> Iterator[str]:
    """GET /logs: the daemon's merged log as text, piece by piece as it arrives."""
    import httpx

    query = urlencode({"follow": str(follow).lower(), "no-engines": str(no_engines).lower()})
    path = "/logs?" + query
    try:
        with (
            _http_client() as http,
            # A followed log can stay quiet for hours: no read timeout.
            http.stream("GET", path, timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT)) as resp,
        ):
            if resp.status_code != 200:
                resp.read()
                raise error_for_status(resp.status_code, resp.text, path)
            yield from resp.iter_text()
    except httpx.ConnectError as e:
        raise DaemonUnavailable(f"cannot reach the dmr daemon at {endpoint().url}: {e}") from e
    except httpx.TransportError as e:
        raise DaemonUnavailable(
            f"lost the connection to the dmr daemon at {endpoint().url}: {e or type(e).__name__}"
        ) from e


def follow_requests(*, model: str | None, include_existing: bool) -> Iterator[tuple[str, str]]:
    """GET /engines/requests as an event stream: (event, data) pairs as they arrive."""
    import httpx

    params = {"model": model or "", "include_existing": "true" if include_existing else ""}
    query = urlencode({k: v for k, v in params.items() if v})
    path = "/engines/requests" + ("?" + query if query else "")
    headers = {"Accept": "text/event-stream"}
    try:
        with (
            _http_client() as http,
            # Requests can be hours apart: no read timeout.
            http.stream(
                "GET", path, headers=headers, timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT)
            ) as resp,
        ):
            if resp.status_code != 200:
                resp.read()
                raise error_for_status(resp.status_code, resp.text, path)
            event = ""
            for line in resp.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    yield event, line[5:].removeprefix(" ")
                elif not line:
                    event = ""
    except httpx.ConnectError as e:
        raise DaemonUnavailable(f"cannot reach the dmr daemon at {endpoint().url}: {e}") from e
    except httpx.TransportError as e:
        raise DaemonUnavailable(
            f"lost the connection to the dmr daemon at {endpoint().url}: {e or type(e).__name__}"
        ) from e


def pull(ref: str, on_event: ProgressCallback) -> str:
    """POST /models/create; returns the success message (`Model pulled successfully`)."""
    payload = {"from": ref}
    token = _hf_token(ref)
    if token:
        payload["bearer-token"] = token
    ensure_daemon()
    return with_retries(
        "download", lambda: _progress_request("/models/create", on_event, payload=payload)
    )


def push(ref: str, on_event: ProgressCallback) -> str:
    token = _hf_token(ref)
    payload = {"bearer-token": token} if token else None
    ensure_daemon()
    return with_retries(
        "upload",
        lambda: _progress_request(model_path(ref) + "/push", on_event, payload=payload),
    )


def load(write: Callable[[BinaryIO], None], on_event: ProgressCallback) -> str:
    """POST /models/load with the tar that `write(out)` produces, streamed through a pipe."""
    ensure_daemon()
    return _progress_request(
        "/models/load", on_event, content=_piped(write), content_type="application/x-tar"
    )


def _piped(write: Callable[[BinaryIO], None]) -> Iterator[bytes]:
    """Run `write` in a thread into a pipe and yield what it writes, 1 MiB at a time."""
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with os.fdopen(write_fd, "wb") as sink:
                write(sink)
        except BaseException as e:  # handed to the reading side below
            failure.append(e)

    thread = threading.Thread(target=run, name="dmr-tar-writer", daemon=True)
    thread.start()
    with os.fdopen(read_fd, "rb") as source:
        while chunk := source.read(1 << 20):
            yield chunk
    thread.join()
    if failure:
        raise failure[0]


# -- inference: dmr run, dmr bench --------------------------------------------------------

CHAT_PATH = "/engines/v1/chat/completions"


def _inference_error(status: int, text: str) -> DmrError:
    """The error for a failed inference request. Runners answer OpenAI JSON
    (`{"error": {"message": ...}}`), the daemon plain text or `{"message": ...}`: keep just
    the message."""
    message = text
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            message = str(error["message"])
        elif isinstance(error, str) and error:
            message = error
        elif body.get("message"):
            message = str(body["message"])
    return error_for_status(status, message, CHAT_PATH)


def sse_chunk(line: str) -> dict[str, Any] | None:
    """The JSON chunk in one line of an OpenAI SSE stream; None for blank lines, comments,
    other fields and `[DONE]`. An error chunk (a runner that failed mid-stream) raises."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    try:
        chunk = json.loads(data)
    except ValueError as e:
        raise DmrError(f"unexpected data in the response stream: {data[:200]}") from e
    if not isinstance(chunk, dict):
        raise DmrError(f"unexpected data in the response stream: {data[:200]}")
    if "error" in chunk:
        raise _inference_error(500, data)
    return chunk


def _transport_error(e: Exception, timeout: float) -> DmrError:
    import httpx

    if isinstance(e, httpx.TimeoutException):
        return DmrError(f"no answer from the model within {timeout:g} s")
    if isinstance(e, httpx.ConnectError):
        return DaemonUnavailable(f"cannot reach the dmr daemon at {endpoint().url}: {e}")
    return DaemonUnavailable(
        f"lost the connection to the dmr daemon at {endpoint().url}: {e or type(e).__name__}"
    )


def chat_stream(
    body: Mapping[str, Any], *, timeout: float = REQUEST_TIMEOUT
) -> Generator[dict[str, Any], None, None]:
    """POST a streaming chat completion (`"stream": true` in BODY); yield each chunk as it
    arrives. TIMEOUT bounds the wait for each piece, model loading included.

    Closing the generator, or Ctrl-C while it waits, closes the connection: the daemon then
    stops the runner's generation and frees it."""
    import httpx

    headers = {"Accept": "text/event-stream"}
    try:
        with (
            _http_client() as http,
            http.stream(
                "POST",
                CHAT_PATH,
                json=dict(body),
                headers=headers,
                timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT),
            ) as resp,
        ):
            if resp.status_code != 200:
                resp.read()
                raise _inference_error(resp.status_code, resp.text)
            for line in resp.iter_lines():
                chunk = sse_chunk(line)
                if chunk is not None:
                    yield chunk
    except httpx.TransportError as e:
        raise _transport_error(e, timeout) from e


def preload(model: str) -> None:
    """Load MODEL's runner without generating anything (`X-Preload-Only: true`); it stays
    loaded for its keep_alive."""
    import httpx

    # max_tokens: a server that ignores the header answers one token, not a whole reply.
    payload = {"model": model, "messages": [{"role": "user", "content": ""}], "max_tokens": 1}
    try:
        with _http_client() as http:
            resp = http.post(CHAT_PATH, json=payload, headers={"X-Preload-Only": "true"})
    except httpx.TransportError as e:
        raise _transport_error(e, REQUEST_TIMEOUT) from e
    if resp.status_code != 200:
        raise _inference_error(resp.status_code, resp.text)


class AsyncChat:
    """Concurrent streaming chat completions over one connection pool (`dmr bench`)."""

    def __init__(self, *, timeout: float, connections: int) -> None:
        import httpx

        ep = endpoint()
        transport = httpx.AsyncHTTPTransport(uds=ep.socket_path) if ep.socket_path else None
        base = "http://localhost" if ep.socket_path else f"{ep.scheme}://{ep.netloc}"
        self.timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=base + ep.prefix,
            transport=transport,
            headers={"User-Agent": USER_AGENT, "Accept": "text/event-stream", **auth_headers()},
            timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT),
            limits=httpx.Limits(max_connections=connections),
            verify=_ssl_context() if ep.scheme == "https" else True,
            trust_env=False,
        )

    async def __aenter__(self) -> AsyncChat:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def stream(self, body: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Like `chat_stream`, for asyncio."""
        import httpx

        try:
            async with self._http.stream("POST", CHAT_PATH, json=dict(body)) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise _inference_error(resp.status_code, resp.text)
                async for line in resp.aiter_lines():
                    chunk = sse_chunk(line)
                    if chunk is not None:
                        yield chunk
        except httpx.TransportError as e:
            raise _transport_error(e, self.timeout) from e
