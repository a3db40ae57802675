"""Registry auth: challenge parsing, docker config credentials, the token flow, the SSRF guard."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import httpx
import pytest

from dmr_cli.distribution.auth import (
    DOCKER_HUB_AUTH_KEY,
    Authenticator,
    Challenge,
    Credentials,
    check_realm,
    load_credentials,
    parse_challenges,
)
from dmr_cli.errors import Unauthorized
from dmr_cli.reference import parse_reference
from dmr_cli.runtime.credentials import credential_helper_get


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- WWW-Authenticate ---------------------------------------------------------------------------


def test_bearer_challenge_with_quoted_parameters():
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:ai/smollm2:pull"'
    )
    assert parse_challenges(header) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:ai/smollm2:pull",
            },
        )
    ]


def test_several_challenges_bare_values_and_escapes():
    header = (
        'Basic realm="my \\"registry\\"", BEARER Realm=https://r.example/t , scope="a:b:pull,push"'
    )
    assert parse_challenges(header) == [
        Challenge("basic", {"realm": 'my "registry"'}),
        Challenge("bearer", {"realm": "https://r.example/t", "scope": "a:b:pull,push"}),
    ]


def test_scheme_without_parameters_and_empty_header():
    assert parse_challenges("Negotiate") == [Challenge("negotiate", {})]
    assert parse_challenges("") == []


# -- ~/.docker/config.json ----------------------------------------------------------------------


@pytest.fixture
def docker_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "docker"
    directory.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # only the helpers a test installs
    return directory


def write_config(directory: Path, config: dict[str, object]) -> None:
    (directory / "config.json").write_text(json.dumps(config))


def install_helper(tmp_path: Path, name: str, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    helper = bin_dir / f"docker-credential-{name}"
    helper.write_text("#!/bin/sh\n" + script)
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)


def test_auth_entry_base64(docker_dir: Path):
    write_config(docker_dir, {"auths": {"reg.example:5000": {"auth": b64("me:pa:ss")}}})
    creds = load_credentials("reg.example:5000")
    assert creds == Credentials(username="me", password="pa:ss")
    assert creds is not None and creds.basic == "Basic " + b64("me:pa:ss")
    assert "pa:ss" not in repr(creds)


def test_docker_hub_uses_the_v1_key(docker_dir: Path):
    write_config(docker_dir, {"auths": {DOCKER_HUB_AUTH_KEY: {"username": "u", "password": "p"}}})
    for registry in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        assert load_credentials(registry) == Credentials(username="u", password="p")
    assert load_credentials("ghcr.io") is None


def test_keys_with_scheme_and_path_match_the_host(docker_dir: Path):
    write_config(
        docker_dir,
        {
            "auths": {
                "https://reg.example/v2/": {"auth": b64("a:1")},
                "other.example": {"identitytoken": "refresh-me"},
                "empty.example": {},
            }
        },
    )
    assert load_credentials("reg.example") == Credentials(username="a", password="1")
    assert load_credentials("other.example") == Credentials(identity_token="refresh-me")
    assert load_credentials("empty.example") is None


def test_missing_or_broken_config(docker_dir: Path):
    assert load_credentials("reg.example") is None
    (docker_dir / "config.json").write_text("{not json")
    assert load_credentials("reg.example") is None


def test_credential_helper_for_one_registry(docker_dir: Path, tmp_path: Path):
    # The helper gets the server URL on stdin, as docker's protocol says.
    install_helper(
        tmp_path,
        "test",
        'read url\n[ "$url" = "https://index.docker.io/v1/" ] || exit 1\n'
        'echo \'{"ServerURL":"x","Username":"hub-user","Secret":"hub-secret"}\'\n',
    )
    write_config(docker_dir, {"credHelpers": {"docker.io": "test"}})
    assert load_credentials("docker.io") == Credentials(username="hub-user", password="hub-secret")
    assert load_credentials("reg.example") is None


def test_creds_store_identity_token_and_fallback_to_auths(docker_dir: Path, tmp_path: Path):
    install_helper(
        tmp_path,
        "store",
        'read url\n[ "$url" = "tok.example" ] || { echo "credentials not found" >&2; exit 1; }\n'
        'echo \'{"Username":"<token>","Secret":"refresh"}\'\n',
    )
    write_config(
        docker_dir,
        {"credsStore": "store", "auths": {"plain.example": {"auth": b64("p:q")}}},
    )
    assert load_credentials("tok.example") == Credentials(identity_token="refresh")
    assert load_credentials("plain.example") == Credentials(username="p", password="q")


def test_credential_helper_edge_cases(docker_dir: Path, tmp_path: Path):
    install_helper(tmp_path, "junk", "echo not-json\n")
    assert credential_helper_get("junk", "x") is None
    assert credential_helper_get("absent", "x") is None
    assert credential_helper_get("../../bin/sh", "x") is None  # names are not paths


# -- the token flow -----------------------------------------------------------------------------


class FakeRegistry:
    """A registry and token server behind httpx.MockTransport, to watch the exchange."""

    def __init__(self, realm: str = "https://auth.example/token") -> None:
        self.realm = realm
        self.token_requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            self.token_requests.append(request)
            if request.headers.get("authorization") != "Basic " + b64("u:p"):
                return httpx.Response(401)
            return httpx.Response(200, json={"access_token": f"t{len(self.token_requests)}"})
        return httpx.Response(
            401,
            headers={"WWW-Authenticate": f'Bearer realm="{self.realm}",service="reg"'},
        )


def test_bearer_token_fetched_with_scope_and_cached(docker_dir: Path):
    write_config(docker_dir, {"auths": {"reg.example": {"username": "u", "password": "p"}}})
    fake = FakeRegistry("https://93.184.216.34/token")  # a public address: no DNS needed
    auth = Authenticator(httpx.Client(transport=httpx.MockTransport(fake)))
    ref = parse_reference("reg.example/team/model:v1")

    assert auth.header(ref) is None  # anonymous until challenged
    challenge = f'Bearer realm="{fake.realm}",service="reg"'
    assert auth.on_unauthorized(ref, False, challenge, None) == "Bearer t1"
    assert auth.header(ref) == "Bearer t1"
    assert auth.header(ref, push=True) is None  # a pull token does not push
    assert auth.on_unauthorized(ref, True, challenge, None) == "Bearer t2"
    [pull, push] = fake.token_requests
    assert pull.url.params.get_list("scope") == ["repository:team/model:pull"]
    assert push.url.params.get_list("scope") == ["repository:team/model:pull,push"]
    assert pull.url.params["service"] == "reg"
    # A rejected token is replaced once; the same answer again means no access.
    assert auth.on_unauthorized(ref, False, challenge, "Bearer t1") == "Bearer t3"


def test_token_server_refusal_is_unauthorized(docker_dir: Path):
    fake = FakeRegistry("https://93.184.216.34/token")
    auth = Authenticator(httpx.Client(transport=httpx.MockTransport(fake)))
    ref = parse_reference("reg.example/team/model")
    with pytest.raises(Unauthorized, match="refused"):
        auth.on_unauthorized(ref, False, f'Bearer realm="{fake.realm}"', None)


def test_explicit_bearer_token_is_sent_as_given(docker_dir: Path):
    write_config(docker_dir, {"auths": {"reg.example": {"username": "u", "password": "p"}}})
    auth = Authenticator(
        httpx.Client(transport=httpx.MockTransport(FakeRegistry())), bearer_token="abc"
    )
    ref = parse_reference("reg.example/team/model")
    assert auth.header(ref) == "Bearer abc"
    assert auth.on_unauthorized(ref, False, 'Bearer realm="https://x/token"', "Bearer abc") is None


def test_basic_challenge_uses_config_credentials(docker_dir: Path):
    write_config(docker_dir, {"auths": {"reg.example": {"auth": b64("u:p")}}})
    auth = Authenticator(httpx.Client(transport=httpx.MockTransport(FakeRegistry())))
    ref = parse_reference("reg.example/team/model")
    assert auth.on_unauthorized(ref, False, 'Basic realm="r"', None) == "Basic " + b64("u:p")
    assert auth.header(ref) == "Basic " + b64("u:p")
    other = parse_reference("other.example/team/model")
    assert auth.on_unauthorized(other, False, 'Basic realm="r"', None) is None


# -- the SSRF guard -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "realm",
    [
        "http://127.0.0.1:8080/token",
        "http://localhost/token",
        "http://169.254.169.254/latest/meta-data",
        "http://10.1.2.3/token",
        "http://[::1]/token",
    ],
)
def test_internal_realm_refused_for_a_remote_registry(realm: str):
    with pytest.raises(Unauthorized, match="internal address"):
        check_realm(realm, "registry.example.com")


def test_realm_on_the_registry_host_is_allowed():
    check_realm("http://127.0.0.1:5001/token", "127.0.0.1:5000")
    check_realm("http://localhost:5001/token", "127.0.0.1:5000")  # resolves to the same address
    check_realm("https://93.184.216.34/token", "registry.example.com")  # public


def test_bad_realm_scheme_refused():
    with pytest.raises(Unauthorized, match="invalid token realm"):
        check_realm("file:///etc/passwd", "registry.example.com")


def test_internal_realm_never_reached(docker_dir: Path):
    fake = FakeRegistry("http://169.254.169.254/token")
    auth = Authenticator(httpx.Client(transport=httpx.MockTransport(fake)))
    ref = parse_reference("reg.example/team/model")
    with pytest.raises(Unauthorized):
        auth.on_unauthorized(ref, False, f'Bearer realm="{fake.realm}"', None)
    assert fake.token_requests == []
