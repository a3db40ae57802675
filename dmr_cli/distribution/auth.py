"""Registry authentication (DMR spec §6.1).

Credentials come from the request's bearer token, else `~/.docker/config.json` (`auths`,
`credsStore`, `credHelpers`). Requests go out anonymously first; a 401 challenge
(`WWW-Authenticate: Bearer realm=..,service=..,scope=..` or `Basic`) says what to do next.
Bearer tokens are cached per registry and scope. Secrets are never logged.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from dmr_cli.config import docker_config_dir
from dmr_cli.errors import RegistryError, Unauthorized
from dmr_cli.reference import DEFAULT_REGISTRY, Reference

log = logging.getLogger(__name__)

DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
_DOCKER_HUB_HOSTS = frozenset(
    {DEFAULT_REGISTRY, "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
AUTH_HINT = (
    "dmr reads registry credentials from ~/.docker/config.json (run `docker login <registry>`, "
    "or set DOCKER_CONFIG) or uses the bearer token sent with the request"
)
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_SCHEME_RE = re.compile(rf"[\s,]*({_TOKEN})")
_PARAM_RE = re.compile(rf'\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)\s*(?:,|$)')
_DEFAULT_TOKEN_LIFETIME = 60.0
_TOKEN_REFRESH_MARGIN = 10.0


@dataclass(frozen=True)
class Challenge:
    """One challenge of a `WWW-Authenticate` header; scheme lower-cased, parameter names too."""

    scheme: str
    params: Mapping[str, str]


def parse_challenges(header: str) -> list[Challenge]:
    """Parse `WWW-Authenticate` (RFC 7235): several challenges, quoted or bare parameter values."""
    challenges: list[Challenge] = []
    pos = 0
    while True:
        scheme = _SCHEME_RE.match(header, pos)
        if scheme is None:
            return challenges
        pos = scheme.end()
        params: dict[str, str] = {}
        while (param := _PARAM_RE.match(header, pos)) is not None and param.end() > pos:
            value = param.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[param.group(1).lower()] = value
            pos = param.end()
        challenges.append(Challenge(scheme.group(1).lower(), params))


@dataclass(frozen=True)
class Credentials:
    """What docker stores for one registry. Secrets stay out of `repr`."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)  # OAuth2 refresh token (`identitytoken`)
    registry_token: str = field(default="", repr=False)  # sent as-is as a bearer token

    @property
    def basic(self) -> str | None:
        if not (self.username and self.password):
            return None
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def config_key(registry: str) -> str:
    """The `auths`/helper key docker uses for a registry (Docker Hub's is a v1 URL)."""
    return DOCKER_HUB_AUTH_KEY if registry.lower() in _DOCKER_HUB_HOSTS else registry


def _normalize_key(key: str) -> str:
    """`https://index.docker.io/v1/` → `docker.io`; `https://reg:5000/x` → `reg:5000`."""
    host = key.strip()
    if "://" in host:
        host = host.split("://", 1)[1]
    host = host.split("/", 1)[0].lower()
    return DEFAULT_REGISTRY if host in _DOCKER_HUB_HOSTS else host


def load_credentials(registry: str, config_dir: Path | None = None) -> Credentials | None:
    """Credentials for `registry` from docker's config.json, through its helpers when configured."""
    path = (config_dir or docker_config_dir()) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable docker config %s: %s", path, type(exc).__name__)
        return None
    if not isinstance(data, dict):
        return None
    wanted = _normalize_key(registry)
    helpers = data.get("credHelpers")
    helper = None
    if isinstance(helpers, dict):
        helper = next((v for k, v in helpers.items() if _normalize_key(k) == wanted), None)
    helper = helper or data.get("credsStore")
    if isinstance(helper, str) and helper:
        from dmr_cli.runtime.credentials import credential_helper_get

        found = credential_helper_get(helper, config_key(registry))
        if found is not None:
            username, secret = found
            if username == "<token>":
                return Credentials(identity_token=secret)
            return Credentials(username=username, password=secret)
    auths = data.get("auths")
    if not isinstance(auths, dict):
        return None
    # An exact key beats a normalised match (`https://reg/v2/` vs `reg`).
    entries = sorted(auths.items(), key=lambda kv: kv[0] != config_key(registry))
    for key, entry in entries:
        if isinstance(entry, dict) and _normalize_key(key) == wanted:
            creds = _from_auth_entry(entry)
            if creds is not None:
                return creds
    return None


def _from_auth_entry(entry: Mapping[str, object]) -> Credentials | None:
    def text(name: str) -> str:
        value = entry.get(name)
        return value if isinstance(value, str) else ""

    username, password = text("username"), text("password")
    encoded = text("auth")
    if encoded and not (username and password):
        try:
            decoded = base64.b64decode(encoded, validate=False).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            log.warning("ignoring a malformed `auth` entry in the docker config")
            decoded = ""
        username, sep, password = decoded.partition(":")
        if not sep:
            username, password = "", ""
    creds = Credentials(
        username=username,
        password=password,
        identity_token=text("identitytoken"),
        registry_token=text("registrytoken"),
    )
    if creds.basic or creds.identity_token or creds.registry_token:
        return creds
    return None


def _host_only(hostport: str) -> str:
    if hostport.startswith("["):
        return hostport[1 : hostport.index("]")]
    return hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport


def _addresses(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP):
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        out.add(address)
    return out


def check_realm(realm: str, registry_host: str) -> None:
    """SSRF guard: a token realm on a loopback/private/link-local address is refused unless the
    registry itself is on that host (a local registry with its own token server)."""
    parts = urlsplit(realm)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise Unauthorized(f"registry {registry_host} sent an invalid token realm {realm!r}")
    try:
        realm_addresses = _addresses(host)
    except OSError as exc:
        raise RegistryError(
            f"cannot resolve token server {host} named by registry {registry_host}: {exc}"
        ) from exc
    internal = {a for a in realm_addresses if not a.is_global or a.is_multicast}
    if not internal:
        return
    registry_only = _host_only(registry_host)
    if host.lower() == registry_only.lower():
        return
    try:
        if realm_addresses & _addresses(registry_only):
            return
    except OSError:
        pass
    raise Unauthorized(
        f"refusing token server {host} named by registry {registry_host}: it resolves to the "
        f"internal address {min(internal, key=str)}, and the registry is not on that host"
    )


class Authenticator:
    """Authorization headers for one RegistryClient. Thread-safe; token fetches serialised."""

    def __init__(self, client: httpx.Client, *, bearer_token: str | None = None) -> None:
        self._client = client
        self._explicit = f"Bearer {bearer_token}" if bearer_token else None
        self._lock = threading.Lock()
        self._fetch_lock = threading.Lock()
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._basic: dict[str, str] = {}
        self._credentials: dict[str, Credentials | None] = {}

    @staticmethod
    def scope(ref: Reference, push: bool) -> str:
        return f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"

    def header(self, ref: Reference, push: bool = False) -> str | None:
        """The Authorization value to send now; None means try anonymously first."""
        if self._explicit:
            return self._explicit
        host = ref.api_host
        now = time.monotonic()
        with self._lock:
            scopes = (
                [self.scope(ref, True)] if push else [self.scope(ref, False), self.scope(ref, True)]
            )
            for scope in scopes:  # a pull,push token also serves pulls
                cached = self._tokens.get((host, scope))
                if cached and cached[1] > now:
                    return cached[0]
            if host in self._basic:
                return self._basic[host]
        creds = self._creds(ref.registry)
        if creds is not None and creds.registry_token:
            return f"Bearer {creds.registry_token}"
        return None

    def on_unauthorized(
        self, ref: Reference, push: bool, www_authenticate: str | None, sent: str | None
    ) -> str | None:
        """After a 401: a new Authorization value to retry with, or None if there is none."""
        if self._explicit:
            return None  # an explicit token is used as given (as docker does); nothing to swap in
        challenges = parse_challenges(www_authenticate or "")
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        host = ref.api_host
        creds = self._creds(ref.registry)
        if bearer is not None and bearer.params.get("realm"):
            scope = self.scope(ref, push)
            with self._fetch_lock:
                with self._lock:
                    cached = self._tokens.get((host, scope))
                # Another thread may have fetched a fresh token while this one waited.
                if cached and cached[0] != sent and cached[1] > time.monotonic():
                    return cached[0]
                token, lifetime = self._fetch_token(ref, bearer, scope, creds)
                value = f"Bearer {token}"
                expiry = time.monotonic() + max(lifetime - _TOKEN_REFRESH_MARGIN, 1.0)
                with self._lock:
                    self._tokens[(host, scope)] = (value, expiry)
            return value
        if any(c.scheme == "basic" for c in challenges) and creds is not None and creds.basic:
            with self._lock:
                self._basic[host] = creds.basic
            return creds.basic
        return None

    def _creds(self, registry: str) -> Credentials | None:
        with self._lock:
            if registry in self._credentials:
                return self._credentials[registry]
        creds = load_credentials(registry)
        with self._lock:
            self._credentials[registry] = creds
        return creds

    def _fetch_token(
        self, ref: Reference, challenge: Challenge, scope: str, creds: Credentials | None
    ) -> tuple[str, float]:
        realm = challenge.params["realm"]
        check_realm(realm, ref.api_host)
        service = challenge.params.get("service", "")
        scopes = [scope]
        offered = challenge.params.get("scope", "")
        if (
            offered
            and offered not in scopes
            and not offered.startswith(f"repository:{ref.repository}:")
        ):
            scopes.append(offered)
        try:
            if creds is not None and creds.identity_token:
                # docker's OAuth2 flow for identity tokens: a POST with the refresh token.
                response = self._client.post(
                    realm,
                    data={
                        "grant_type": "refresh_token",
                        "refresh_token": creds.identity_token,
                        "service": service,
                        "scope": " ".join(scopes),
                        "client_id": "dmr",
                    },
                )
            else:
                headers = (
                    {"Authorization": creds.basic} if creds is not None and creds.basic else {}
                )
                params: list[tuple[str, str | int | float | bool | None]] = (
                    [("service", service)] if service else []
                )
                params += [("scope", s) for s in scopes]
                response = self._client.get(realm, params=params, headers=headers)
        except httpx.TransportError as exc:
            raise RegistryError(
                f"cannot reach token server {urlsplit(realm).netloc} for {ref.api_host}: {exc}"
            ) from exc
        if response.status_code in (401, 403):
            raise Unauthorized(
                f"the token server for {ref.api_host} refused the credentials for {ref.name} "
                f"({response.status_code})",
                hint=AUTH_HINT,
            )
        if response.status_code != 200:
            raise RegistryError(
                f"token server {urlsplit(realm).netloc} answered {response.status_code} "
                f"for {ref.name}",
                http_status=response.status_code,
            )
        try:
            body = response.json()
        except ValueError as exc:
            raise RegistryError(f"token server for {ref.api_host} sent invalid JSON") from exc
        token = (body.get("token") or body.get("access_token")) if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token server for {ref.api_host} sent no token")
        lifetime = body.get("expires_in")
        if not isinstance(lifetime, (int, float)) or lifetime <= 0:
            lifetime = _DEFAULT_TOKEN_LIFETIME
        log.debug("got a token for %s scope %s (valid %ss)", ref.api_host, scope, lifetime)
        return token, float(lifetime)
