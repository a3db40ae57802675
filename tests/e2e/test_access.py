"""Who may use `dmr serve`: CORS as DMR means it (with the port wildcard DMR intended), API
keys (dmr's addition) from DMR_API_KEYS and an owner-only keys file, the CLI's DMR_API_KEY,
and the warning for a daemon listening beyond loopback."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest

from tests.helpers.daemon import Daemon, isolated_env, start_daemon
from tests.helpers.gguf_factory import make_tiny_llama
from tests.helpers.registry import free_port

ENV_KEYS = ("env-key-0123456789", "env-key-abcdefghij")
FILE_KEY = "file-key-klmnopqrst"
WRONG_KEY = "not-a-key-uvwxyz"
ORIGINS = "https://app.example.com, http://lan.example:*"
NO_STOP = {"2": -100, "260": -100}


def serve(home: Path, *args: str, **env: str) -> Daemon:
    """`dmr serve ARGS` as tests.helpers.daemon.start_daemon runs it, ready as soon as it
    answers at all: a daemon that requires keys answers the helper's probe with 401."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = isolated_env(
        home, MODEL_RUNNER_HOST=f"http://127.0.0.1:{port}", DMR_NO_AUTO_START="1", **env
    )
    with open(home / "daemon.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dmr_cli", "serve", "--port", str(port), *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    daemon = Daemon(home=home, port=port, process=process, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError((home / "daemon.log").read_text())
        try:
            httpx.get(daemon.url + "/version", timeout=1)
            return daemon
        except httpx.TransportError:
            time.sleep(0.05)
    daemon.stop()
    raise RuntimeError("dmr serve did not answer: " + (home / "daemon.log").read_text())


def log_text(daemon: Daemon) -> str:
    return (daemon.home / "daemon.log").read_text()


# -- CORS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """No keys, loopback, DMR_ORIGINS with an exact origin and a port wildcard."""
    daemon = start_daemon(tmp_path_factory.mktemp("open") / "home", DMR_ORIGINS=ORIGINS)
    yield daemon
    daemon.stop()


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost",
        "http://localhost:3000",
        "https://localhost:8443",
        "http://127.0.0.1:5173",
        "https://0.0.0.0:1",
        "http://[::1]:8080",
        "https://app.example.com",  # DMR_ORIGINS, exact
        "http://lan.example",  # DMR_ORIGINS `:*`: the default port
        "http://lan.example:9999",  # DMR_ORIGINS `:*`: any port
    ],
)
def test_allowed_origins_get_their_origin_back(open_daemon: Daemon, origin: str) -> None:
    answer = httpx.get(open_daemon.url + "/models", headers={"Origin": origin})
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == origin
    assert answer.headers["vary"] == "Origin"
    assert answer.headers["access-control-allow-credentials"] == "true"


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "null",
        "http://localhost.evil.example:3000",  # a default host as a prefix only
        "http://localhost:3000x",
        "http://localhost:",
        "https://app.example.com:8443",  # an exact DMR_ORIGINS entry allows no other port
        "https://lan.example:9999",  # the wildcard entry is for http only
    ],
)
def test_other_origins_are_refused(open_daemon: Daemon, origin: str) -> None:
    for method, path in (("GET", "/models"), ("POST", "/engines/v1/chat/completions")):
        answer = httpx.request(
            method, open_daemon.url + path, headers={"Origin": origin}, json={"model": "ai/x"}
        )
        assert (answer.status_code, answer.text) == (403, "Origin not allowed\n")
        assert "access-control-allow-origin" not in answer.headers


def test_requests_without_origin_pass_without_cors_headers(open_daemon: Daemon) -> None:
    answer = httpx.get(open_daemon.url + "/models")
    assert answer.status_code == 200 and answer.json() == []
    assert "access-control-allow-origin" not in answer.headers


def test_the_inference_path_answers_with_cors_headers(open_daemon: Daemon) -> None:
    origin = "http://localhost:3000"
    answer = httpx.post(
        open_daemon.url + "/engines/v1/chat/completions",
        headers={"Origin": origin},
        json={"model": "ai/absent", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert answer.status_code == 404  # the daemon's own answer, now readable by the page
    assert answer.headers.get_list("access-control-allow-origin") == [origin]


def test_preflight(open_daemon: Daemon) -> None:
    origin = "http://127.0.0.1:8080"
    answer = httpx.options(
        open_daemon.url + "/engines/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
        },
    )
    assert answer.status_code == 204 and answer.content == b""
    assert answer.headers["access-control-allow-origin"] == origin
    assert answer.headers["access-control-allow-credentials"] == "true"
    assert answer.headers["access-control-allow-methods"] == "GET, POST, DELETE"
    allowed = [h.strip().lower() for h in answer.headers["access-control-allow-headers"].split(",")]
    assert {"*", "authorization", "x-api-key", "content-type"} <= set(allowed)

    refused = httpx.options(open_daemon.url + "/models", headers={"Origin": "http://evil.example"})
    assert refused.status_code == 403
    # Without an Origin, OPTIONS is no preflight: the router answers as for any other method.
    plain = httpx.options(open_daemon.url + "/engines/v1/chat/completions")
    assert (plain.status_code, plain.text) == (404, "not found\n")


def test_a_loopback_daemon_does_not_warn(open_daemon: Daemon) -> None:
    assert "WARNING" not in log_text(open_daemon)


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """No keys, all interfaces, every origin allowed."""
    daemon = serve(
        tmp_path_factory.mktemp("exposed") / "home", "--host", "0.0.0.0", DMR_ORIGINS="*"
    )
    yield daemon
    daemon.stop()


def test_a_star_allows_every_origin(exposed: Daemon) -> None:
    for origin in ("https://anything.example:1234", "null"):
        answer = httpx.get(exposed.url + "/models", headers={"Origin": origin})
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == origin


def test_listening_beyond_loopback_without_keys_warns(exposed: Daemon) -> None:
    keys_file = exposed.home / ".config" / "dmr" / "api-keys"
    assert (
        "WARNING listening on 0.0.0.0 without API keys: anyone who can reach this address can "
        f"use the daemon; set DMR_API_KEYS or write keys to {keys_file}"
    ) in log_text(exposed)


# -- API keys -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, native_llama_server: Path) -> Iterator[Daemon]:
    """Keys from DMR_API_KEYS and from the default keys file (mode 600), all interfaces, the
    native runner, and the tiny model packaged through the CLI with a key."""
    tmp = tmp_path_factory.mktemp("keyed")
    keys_file = tmp / "home" / ".config" / "dmr" / "api-keys"
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text(f"# dmr API keys\n\n  {FILE_KEY}  \n# {WRONG_KEY}\n")
    keys_file.chmod(0o600)
    daemon = serve(
        tmp / "home",
        "--host",
        "0.0.0.0",
        DMR_API_KEYS=" , ".join(ENV_KEYS),
        LLAMA_SERVER_PATH=str(native_llama_server),
        DMR_RUNNER_DIR=str(tmp / "no-runners"),
    )
    try:
        tiny = make_tiny_llama(tmp / "tiny.gguf")
        ok(daemon.cli("package", "--gguf", str(tiny), "ai/tiny", DMR_API_KEY=ENV_KEYS[1]))
        ok(daemon.cli("configure", "ai/tiny", "--", "-n", "8", DMR_API_KEY=FILE_KEY))
        yield daemon
    finally:
        daemon.stop()


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Authorization", f"Bearer {ENV_KEYS[0]}"),
        ("Authorization", f"Bearer {ENV_KEYS[1]}"),
        ("Authorization", f"bearer {FILE_KEY}"),
        ("x-api-key", FILE_KEY),
        ("x-api-key", ENV_KEYS[0]),
    ],
)
def test_every_configured_key_opens_every_route(keyed: Daemon, header: str, value: str) -> None:
    with httpx.Client(base_url=keyed.url, headers={header: value}) as http:
        assert http.get("/").text == "Docker Model Runner is running"
        assert http.get("/models").json()[0]["tags"] == ["docker.io/ai/tiny:latest"]
        assert http.get("/engines/v1/models").status_code == 200
        assert http.get("/engines/status").status_code == 200


# (path, method, expected shape): each API's clients get a 401 they can read.
DENIALS = [
    ("/", "GET", "text"),
    ("/models", "GET", "text"),
    ("/engines/status", "GET", "text"),
    ("/engines/_configure", "POST", "text"),
    ("/engines/v1/models", "GET", "openai"),
    ("/v1/models", "GET", "openai"),
    ("/engines/v1/chat/completions", "POST", "openai"),
    ("/engines/llama.cpp/v1/embeddings", "POST", "openai"),
    ("/rerank", "POST", "openai"),
    ("/v1/responses", "POST", "openai"),
    ("/engines/v1/messages", "POST", "anthropic"),
    ("/anthropic/v1/messages", "POST", "anthropic"),
    ("/anthropic/v1/messages/count_tokens", "POST", "anthropic"),
    ("/api/tags", "GET", "ollama"),
    ("/api/chat", "POST", "ollama"),
]


def assert_denied(answer: httpx.Response, shape: str, message: str) -> None:
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"].startswith('Bearer realm="dmr"')
    if shape == "text":
        assert answer.headers["content-type"].startswith("text/plain")
        assert answer.text == message + "\n"
        return
    body = answer.json()
    if shape == "openai":
        assert body["error"]["message"] == message
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["code"] == "invalid_api_key"
    elif shape == "anthropic":
        assert body == {
            "type": "error",
            "error": {"type": "authentication_error", "message": message},
        }
    else:
        assert body == {"error": message}


@pytest.mark.parametrize(("path", "method", "shape"), DENIALS)
def test_a_missing_key_is_refused_in_the_shape_of_the_api(
    keyed: Daemon, path: str, method: str, shape: str
) -> None:
    answer = httpx.request(method, keyed.url + path, json={"model": "ai/tiny"})
    assert_denied(
        answer,
        shape,
        "API key required: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
    )
    assert "error=" not in answer.headers["www-authenticate"]


@pytest.mark.parametrize(("path", "method", "shape"), DENIALS)
def test_a_wrong_key_is_refused_in_the_shape_of_the_api(
    keyed: Daemon, path: str, method: str, shape: str
) -> None:
    for header, value in (("Authorization", f"Bearer {WRONG_KEY}"), ("x-api-key", WRONG_KEY)):
        answer = httpx.request(
            method, keyed.url + path, headers={header: value}, json={"model": "ai/tiny"}
        )
        assert_denied(answer, shape, "invalid API key")
        assert answer.headers["www-authenticate"].endswith('error="invalid_token"')


@pytest.mark.parametrize(
    "value",
    [
        f"Basic {FILE_KEY}",  # not a bearer token
        f"Bearer {FILE_KEY[:-1]}",  # a prefix of a key
        f"Bearer {FILE_KEY}x",  # a key plus more
        f"Bearer {WRONG_KEY}",  # commented out in the keys file
        "Bearer",  # the scheme alone
    ],
)
def test_near_misses_are_refused(keyed: Daemon, value: str) -> None:
    assert httpx.get(keyed.url + "/models", headers={"Authorization": value}).status_code == 401


def test_cors_with_keys(keyed: Daemon) -> None:
    origin = "http://localhost:5173"
    # A preflight carries no credentials: it needs no key.
    preflight = httpx.options(
        keyed.url + "/engines/v1/chat/completions",
        headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 204
    # The page can read why it was refused.
    refused = httpx.get(keyed.url + "/models", headers={"Origin": origin})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == origin
    # A key does not make a foreign origin acceptable.
    foreign = httpx.get(
        keyed.url + "/models",
        headers={"Origin": "http://evil.example", "Authorization": f"Bearer {FILE_KEY}"},
    )
    assert foreign.status_code == 403


def test_sdks_report_a_wrong_key_as_an_authentication_error(keyed: Daemon) -> None:
    sdk = openai.OpenAI(base_url=keyed.url + "/engines/v1", api_key=WRONG_KEY, max_retries=0)
    with sdk, pytest.raises(openai.AuthenticationError) as openai_error:
        sdk.models.list()
    assert openai_error.value.code == "invalid_api_key"

    claude = anthropic.Anthropic(
        base_url=keyed.url + "/anthropic", api_key=WRONG_KEY, max_retries=0
    )
    with pytest.raises(anthropic.AuthenticationError) as anthropic_error:
        claude.messages.create(
            model="ai/tiny", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
    assert anthropic_error.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid API key"},
    }

    llama = ollama.Client(host=keyed.url, headers={"Authorization": f"Bearer {WRONG_KEY}"})
    with pytest.raises(ollama.ResponseError) as ollama_error:
        llama.list()
    assert (ollama_error.value.status_code, ollama_error.value.error) == (401, "invalid API key")


def test_inference_with_a_key_and_the_key_stays_out_of_logs(keyed: Daemon) -> None:
    with openai.OpenAI(
        base_url=keyed.url + "/engines/v1", api_key=ENV_KEYS[0], max_retries=0, timeout=120
    ) as sdk:
        answer = sdk.chat.completions.create(
            model="ai/tiny",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=4,
            logit_bias=NO_STOP,
        )
    assert answer.choices[0].finish_reason == "length"
    chat = ok(keyed.cli("run", "ai/tiny", "hello", input="", DMR_API_KEY=FILE_KEY))
    assert chat.stdout.strip()

    recorded = httpx.get(
        keyed.url + "/engines/requests", headers={"x-api-key": FILE_KEY}, timeout=10
    )
    assert recorded.status_code == 200
    (entry,) = recorded.json()
    assert entry["count"] == 2
    secrets = [*ENV_KEYS, FILE_KEY]
    assert not [key for key in secrets if key in recorded.text]
    # Nothing the daemon or its runner wrote holds a key: logs, store, state.
    keys_file = keyed.home / ".config" / "dmr" / "api-keys"
    leaks = [
        (path, key)
        for path in keyed.home.rglob("*")
        if path.is_file() and path != keys_file
        for key in secrets
        if key.encode() in path.read_bytes()
    ]
    assert leaks == []
    assert "inference.log" in {p.name for p in keyed.home.rglob("*.log")}


def test_the_cli_sends_dmr_api_key(keyed: Daemon) -> None:
    listed = ok(keyed.cli("ls", DMR_API_KEY=ENV_KEYS[0]))
    assert "tiny" in listed.stdout
    status = ok(keyed.cli("status", "--json", DMR_API_KEY=FILE_KEY))
    assert '"running":true' in status.stdout.replace(" ", "")


@pytest.mark.parametrize(
    "args", [("ls",), ("status",), ("ps",), ("run", "ai/tiny", "hello"), ("logs",)]
)
def test_the_cli_without_a_key_fails_with_a_hint(keyed: Daemon, args: tuple[str, ...]) -> None:
    result = keyed.cli(*args, input="")
    assert result.returncode == 5, result.stderr
    assert "API key required" in result.stderr
    assert "Hint: set DMR_API_KEY to one of the daemon's API keys" in result.stderr


def test_the_cli_with_a_wrong_key_says_so(keyed: Daemon) -> None:
    result = keyed.cli("ls", DMR_API_KEY=WRONG_KEY)
    assert result.returncode == 5
    assert "invalid API key" in result.stderr
    assert "DMR_API_KEY is not one of the daemon's keys" in result.stderr


def test_a_keyed_daemon_beyond_loopback_warns_about_plain_http(keyed: Daemon) -> None:
    log = log_text(keyed)
    assert "without API keys" not in log
    assert "WARNING listening on 0.0.0.0 over plain HTTP: API keys cross the network" in log
    assert "INFO an API key is required on every request (3 keys)" in log


@pytest.mark.parametrize(
    ("content", "mode", "named", "message"),
    [
        (FILE_KEY, 0o644, True, "can be accessed by group or others (mode 0644)"),
        (FILE_KEY, 0o640, False, "can be accessed by group or others (mode 0640)"),
        (FILE_KEY, 0o620, True, "can be accessed by group or others (mode 0620)"),
        ("# no key yet\n\n", 0o600, False, "holds no key"),
        (None, 0, True, "(DMR_API_KEYS_FILE) does not exist"),
    ],
)
def test_a_keys_file_that_cannot_be_trusted_stops_the_daemon(
    tmp_path: Path, content: str | None, mode: int, named: bool, message: str
) -> None:
    home = tmp_path / "home"
    path = tmp_path / "keys" if named else home / ".config" / "dmr" / "api-keys"
    if content is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(mode)
    env = isolated_env(home, DMR_API_KEYS=ENV_KEYS[0])
    if named:
        env["DMR_API_KEYS_FILE"] = str(path)
    result = subprocess.run(
        [sys.executable, "-m", "dmr_cli", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"the API keys file {path} {message}" in result.stderr
    if mode & 0o077:
        assert f"chmod 600 {path}" in result.stderr
