"""Reference normalisation and parsing, ported from DMR's normalize_test.go cases (spec §3)."""

from __future__ import annotations

import pytest

from dmr_cli.errors import InvalidReference
from dmr_cli.reference import (
    canonical_tag,
    display_name,
    is_plain_http_registry,
    normalize_model_name,
    parse_reference,
    validate_digest,
)

HEX = "a" * 64
IDS = {f"sha256:{HEX}", "sha256:" + "b" * 64}


def resolve(short: str) -> str | None:
    hexpart = short.removeprefix("sha256:")
    return next((i for i in IDS if i[7:].startswith(hexpart)), None)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("gemma3", "ai/gemma3:latest"),
        ("gemma3:latest", "ai/gemma3:latest"),
        ("gemma3:v1", "ai/gemma3:v1"),
        ("ai/gemma3", "ai/gemma3:latest"),
        ("MyModel", "ai/mymodel:latest"),
        ("model:", "ai/model:latest"),
        ("  gemma3  ", "ai/gemma3:latest"),
        ("myorg/model", "myorg/model:latest"),
        ("MyOrg/Model:Q4_K_M", "myorg/model:Q4_K_M"),
        ("registry.example.com/model:v1", "registry.example.com/model:v1"),
        ("localhost:5000/model", "localhost:5000/model:latest"),
        ("hf.co/bartowski/model", "huggingface.co/bartowski/model:latest"),
        ("hf.co/Org/Model:Q4_K_M", "huggingface.co/org/model:Q4_K_M"),
        ("huggingface.co/Org/Model", "huggingface.co/org/model:latest"),
        ("", ""),
        (HEX, f"sha256:{HEX}"),
        (HEX[:12], f"sha256:{HEX}"),
        (f"sha256:{HEX}", f"sha256:{HEX}"),
        ("c" * 12, "c" * 12),  # an unknown short ID stays as it is
        (f"ai/gemma3@sha256:{HEX}", f"ai/gemma3@sha256:{HEX}"),
    ],
)
def test_normalize_model_name(raw: str, expected: str) -> None:
    assert normalize_model_name(raw, resolve) == expected


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("ai/smollm2", "docker.io/ai/smollm2:latest"),
        ("smollm2", "docker.io/ai/smollm2:latest"),
        ("ai/smollm2:latest", "docker.io/ai/smollm2:latest"),
        ("docker.io/ai/smollm2:latest", "docker.io/ai/smollm2:latest"),
        ("index.docker.io/ai/smollm2", "docker.io/ai/smollm2:latest"),
        ("library/smollm2", "docker.io/ai/smollm2:latest"),
        ("ai/smollm2:360M-Q4_K_M", "docker.io/ai/smollm2:360M-Q4_K_M"),
        ("localhost:5000/org/m:v2", "localhost:5000/org/m:v2"),
        ("127.0.0.1:5000/m", "127.0.0.1:5000/m:latest"),
        ("hf.co/Bartowski/Model:Q8_0", "huggingface.co/bartowski/model:Q8_0"),
    ],
)
def test_canonical_tags_are_equivalent(raw: str, canonical: str) -> None:
    assert canonical_tag(raw) == canonical


def test_digest_reference() -> None:
    ref = parse_reference(f"ai/smollm2@sha256:{HEX}")
    assert ref.digest == f"sha256:{HEX}"
    assert ref.tag is None
    assert ref.reference == f"sha256:{HEX}"
    assert str(ref) == f"docker.io/ai/smollm2@sha256:{HEX}"
    # A digest pull is tagged name:latest (spec §3).
    assert ref.tag_string == "docker.io/ai/smollm2:latest"


def test_docker_hub_api_host() -> None:
    ref = parse_reference("ai/smollm2")
    assert ref.api_host == "registry-1.docker.io"
    assert ref.base_url() == "https://registry-1.docker.io"


@pytest.mark.parametrize(
    "bad",
    [
        "../etc/passwd",
        "ai/../../x",
        "/abs/path",
        "ai//x",
        "ai/x:bad/tag",
        "ai/x:..",
        "ai/x@sha256:../../etc",
        "ai/x@sha256:1234",
        "Upper/Case",  # parse (not normalise) refuses upper case like docker/distribution
        "a b",
        "ai/x;rm -rf",
    ],
)
def test_malicious_and_malformed_references_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(bad)


@pytest.mark.parametrize(
    "bad", ["sha256:" + "g" * 64, "sha256:" + "a" * 63, "md5:abc", "sha256:../" + "a" * 61, ""]
)
def test_validate_digest_rejects_non_hex(bad: str) -> None:
    with pytest.raises(InvalidReference):
        validate_digest(bad)


@pytest.mark.parametrize(
    ("registry", "plain"),
    [
        ("localhost:5000", True),
        ("localhost", True),
        ("127.0.0.1:5000", True),
        ("127.3.4.5", True),
        ("[::1]:5000", True),
        ("models.local", True),
        ("registry.example.com", False),
        ("docker.io", False),
        ("10.0.0.5:5000", False),
    ],
)
def test_plain_http_only_for_loopback_and_local(
    registry: str, plain: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INSECURE_REGISTRY", raising=False)
    assert is_plain_http_registry(registry) is plain


def test_insecure_registries_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INSECURE_REGISTRY", raising=False)
    assert is_plain_http_registry("registry.lan:5000", ["registry.lan:5000"])
    assert not is_plain_http_registry("registry.lan:5000", ["other:5000"])


@pytest.mark.parametrize(
    ("tag", "shown"),
    [
        ("docker.io/ai/gemma3:latest", "gemma3"),
        ("ai/gemma3:v1", "gemma3:v1"),
        ("docker.io/myorg/x:latest", "myorg/x"),
        ("index.docker.io/ai/gemma3:2B", "gemma3:2B"),
        ("huggingface.co/bartowski/m:latest", "huggingface.co/bartowski/m"),
    ],
)
def test_display_name(tag: str, shown: str) -> None:
    assert display_name(tag) == shown
