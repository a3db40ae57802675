"""Who may use the daemon: CORS as DMR means it (spec §2.1) and optional API keys.

One ASGI middleware in front of the whole app. Everything it compares against is prepared
at start-up, so a request costs one pass over its headers (and one SHA-256 when keys are
configured). The CORS headers go on the exchange (the `dmr.sink` extension of dmr's HTTP
server), so the app's `send` stays untouched.

CORS: DMR allows `DMR_ORIGINS` plus localhost, 127.0.0.1 and 0.0.0.0 and lists
`http://localhost:*` and the like, but matches origins exactly, so its `:*` entries match
nothing. Here `:*` is the port wildcard DMR meant, in the defaults and in `DMR_ORIGINS`;
a `*` entry allows every origin.

API keys are dmr's addition (DMR has none): from `DMR_API_KEYS` and a keys file that only
its owner may read, read once at start-up. Keys are kept only as SHA-256 digests and checked
against every configured key in constant time, whatever the key's length.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from dmr_cli import config
from dmr_cli.errors import DmrError

log = logging.getLogger("dmr")

# DMR's defaults, plus the IPv6 loopback, which DMR leaves out.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0", "[::1]")
KEYS_FILE_NAME = "api-keys"

MISSING_KEY = "API key required: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
WRONG_KEY = "invalid API key"

_ALLOW_METHODS = (b"access-control-allow-methods", b"GET, POST, DELETE")
# Browsers read `*` literally when credentials are allowed, and never let it cover
# Authorization: the key headers are named, and so are the ones the preflight asks for.
_ALLOW_HEADERS = b"*, Authorization, x-api-key"
_ANTHROPIC_SUFFIXES = ("/v1/messages", "/v1/messages/count_tokens")
_OPENAI_PREFIXES = ("/v1/", "/responses", "/rerank", "/score")


@dataclass(frozen=True)
class Policy:
    """What the middleware allows, prepared once."""

    origins: frozenset[bytes]  # exact `scheme://host[:port]` origins
    any_port: frozenset[bytes]  # `scheme://host` allowed with any port
    allow_all_origins: bool
    key_digests: tuple[bytes, ...]  # SHA-256 of each key; empty: no key needed

    @property
    def requires_key(self) -> bool:
        return bool(self.key_digests)

    def origin_allowed(self, origin: bytes) -> bool:
        if self.allow_all_origins or origin in self.origins:
            return True
        base, colon, port = origin.rpartition(b":")
        return bool(colon) and port.isdigit() and base in self.any_port

    def key_valid(self, candidates: Iterable[bytes | None]) -> bool:
        """Any candidate equals any key. Every candidate is compared with every key (no
        early exit), on digests, so the timing says nothing about which key matched."""
        valid = False
        for candidate in candidates:
            if candidate is None:
                continue
            digest = hashlib.sha256(candidate).digest()
            for key in self.key_digests:
                valid |= hmac.compare_digest(digest, key)
        return valid


def make_policy(origins: str, keys: Iterable[str]) -> Policy:
    """The policy for a `DMR_ORIGINS` value and a list of keys."""
    exact: set[bytes] = set()
    any_port: set[bytes] = set()
    allow_all = False
    defaults = [f"{scheme}://{host}:*" for scheme in ("http", "https") for host in LOCAL_HOSTS]
    for entry in [e.strip().rstrip("/") for e in origins.split(",")] + defaults:
        if not entry:
            continue
        if entry == "*":
            allow_all = True
            continue
        if "://" not in entry:
            log.warning(
                "DMR_ORIGINS entry %r never matches: browsers send origins as scheme://host[:port]",
                entry,
            )
        if entry.endswith(":*"):
            base = entry[:-2].lower().encode()
            any_port.add(base)
            exact.add(base)  # the default port: no port in the Origin at all
        else:
            exact.add(entry.lower().encode())
    digests = tuple(dict.fromkeys(hashlib.sha256(k.encode()).digest() for k in keys))
    return Policy(frozenset(exact), frozenset(any_port), allow_all, digests)


def default_keys_file() -> Path:
    return config.config_dir() / KEYS_FILE_NAME


def keys_file() -> tuple[Path, bool]:
    """The keys file, and whether it was named explicitly (`DMR_API_KEYS_FILE`)."""
    named = config.env("DMR_API_KEYS_FILE")
    return (Path(named).expanduser(), True) if named else (default_keys_file(), False)


def read_keys_file(path: Path, *, required: bool) -> list[str]:
    """Keys in PATH, one a line, `#` comments. A missing file is no keys unless REQUIRED.

    Raises DmrError when group or others have any access to it, or when it holds no key:
    a daemon that cannot apply the keys its owner meant must not start without them."""
    try:
        with open(path, encoding="utf-8") as file:
            mode = os.fstat(file.fileno()).st_mode
            # POSIX permission bits only: Windows has no group/other bits to check.
            if os.name != "nt" and mode & 0o077:
                raise DmrError(
                    f"the API keys file {path} can be accessed by group or others "
                    f"(mode {mode & 0o777:04o}); it must be readable only by its owner",
                    hint=f"chmod 600 {path}",
                )
            lines = file.read().splitlines()
    except FileNotFoundError:
        if required:
            raise DmrError(f"the API keys file {path} (DMR_API_KEYS_FILE) does not exist") from None
        return []
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise DmrError(f"cannot read the API keys file {path}: {reason}") from exc
    keys = [line.strip() for line in lines]
    keys = [key for key in keys if key and not key.startswith("#")]
    if not keys:
        raise DmrError(
            f"the API keys file {path} holds no key",
            hint="write one key per line, or remove the file to run without keys",
        )
    return keys


def load_policy() -> Policy:
    """The policy from the settings: `DMR_ORIGINS`, `DMR_API_KEYS`, the keys file."""
    keys = [k.strip() for k in config.env("DMR_API_KEYS").split(",") if k.strip()]
    path, named = keys_file()
    keys += read_keys_file(path, required=named)
    return make_policy(config.env("DMR_ORIGINS"), keys)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume others can reach it


def exposure_warning(host: str, policy: Policy) -> str | None:
    """What to warn about when the daemon listens on HOST (None on loopback)."""
    if is_loopback(host):
        return None
    if not policy.requires_key:
        return (
            f"listening on {host} without API keys: anyone who can reach this address can use "
            f"the daemon; set DMR_API_KEYS or write keys to {keys_file()[0]} (one a line, "
            "mode 600)"
        )
    return (
        f"listening on {host} over plain HTTP: API keys cross the network unencrypted; put a "
        "TLS proxy in front for other machines"
    )


def _shape(path: str) -> str:
    """Which API's error shape a client of PATH expects."""
    if path.startswith("/anthropic/") or path.endswith(_ANTHROPIC_SUFFIXES):
        return "anthropic"
    if path.startswith("/api/"):
        return "ollama"
    if path.startswith(_OPENAI_PREFIXES) or (
        path.startswith("/engines/") and ("/v1/" in path or path.endswith(("/rerank", "/score")))
    ):
        return "openai"
    return "text"


def _denial(shape: str, message: str) -> tuple[bytes, bytes]:
    """(content type, body) of a 401 in SHAPE."""
    if shape == "text":
        return b"text/plain; charset=utf-8", (message + "\n").encode()
    body: object
    if shape == "openai":
        error = {"message": message, "type": "invalid_request_error", "param": None}
        body = {"error": {**error, "code": "invalid_api_key"}}
    elif shape == "anthropic":
        body = {"type": "error", "error": {"type": "authentication_error", "message": message}}
    else:
        body = {"error": message}
    return b"application/json", json.dumps(body).encode()


_DENIALS = {
    (shape, missing): _denial(shape, MISSING_KEY if missing else WRONG_KEY)
    for shape in ("text", "openai", "anthropic", "ollama")
    for missing in (True, False)
}
_CHALLENGE = {True: b'Bearer realm="dmr"', False: b'Bearer realm="dmr", error="invalid_token"'}
_FORBIDDEN = b"Origin not allowed\n"


class Access:
    """The middleware: CORS first (a disallowed origin gets 403 even with a key, a
    preflight needs no key), then the key check, then the app."""

    def __init__(self, app: ASGIApp, policy: Policy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        origin = authorization = api_key = None
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value
            elif name == b"authorization":
                authorization = value
            elif name == b"x-api-key":
                api_key = value
        if origin is not None:
            if not self.policy.origin_allowed(origin):
                return await _answer(send, 403, b"text/plain; charset=utf-8", _FORBIDDEN)
            cors = [
                (b"access-control-allow-origin", origin),
                (b"access-control-allow-credentials", b"true"),
                (b"vary", b"Origin"),
            ]
            if scope["method"] == "OPTIONS":
                return await _preflight(scope, send, cors)
            # On the exchange, so that answers written without ASGI messages carry them too.
            scope["extensions"]["dmr.sink"].extra_headers = tuple(cors)
        if self.policy.requires_key:
            bearer = None
            if authorization is not None and authorization[:7].lower() == b"bearer ":
                bearer = authorization[7:].strip()
            if not self.policy.key_valid((bearer, api_key)):
                missing = bearer is None and api_key is None
                content_type, body = _DENIALS[_shape(scope["path"]), missing]
                challenge = [(b"www-authenticate", _CHALLENGE[missing])]
                return await _answer(send, 401, content_type, body, challenge)
        await self.app(scope, receive, send)


async def _preflight(scope: Scope, send: Send, cors: list[tuple[bytes, bytes]]) -> None:
    requested = next(
        (v for k, v in scope["headers"] if k == b"access-control-request-headers"), b""
    )
    allow = _ALLOW_HEADERS + b", " + requested if requested else _ALLOW_HEADERS
    headers = [*cors, _ALLOW_METHODS, (b"access-control-allow-headers", allow)]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def _answer(
    send: Send,
    status: int,
    content_type: bytes,
    body: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", b"%d" % len(body)),
        (b"x-content-type-options", b"nosniff"),
        *(extra or ()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
