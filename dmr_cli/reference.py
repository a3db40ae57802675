"""Model references: parsing, normalisation and canonical forms (DMR spec §3).

Two layers, as in DMR:

* `normalize_model_name` is applied to every reference a client sends (default `ai/`
  namespace, `:latest`, lower-cased name, `hf.co` → `huggingface.co`, IDs resolved).
* `parse_reference` turns a name into registry, repository, tag and digest, the way
  docker/distribution does, so `ai/x`, `docker.io/ai/x:latest` and `index.docker.io/ai/x`
  are one model.

The grammar is docker/distribution's: it admits no `..`, no absolute paths and no upper
case, which is what keeps references safe to use in URLs and store paths.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dmr_cli import config
from dmr_cli.errors import InvalidReference

DEFAULT_REGISTRY = "docker.io"
DEFAULT_ORG = "ai"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
HF_REGISTRY = "huggingface.co"
HF_ALIASES = ("hf.co", "huggingface.co")

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-fA-F0-9]{32,}"

_COMPONENT_RE = re.compile(rf"^{_COMPONENT}$")
_DOMAIN_RE = re.compile(rf"^{_DOMAIN}$")
_TAG_RE = re.compile(rf"^{_TAG}$")
_DIGEST_RE = re.compile(rf"^{_DIGEST}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX12 = re.compile(r"^[0-9a-f]{12}$")
_VALID_DIGEST = re.compile(r"^(?:sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
_MAX_NAME = 255


@dataclass(frozen=True)
class Reference:
    """A parsed, canonical model reference."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def tag_string(self) -> str:
        """`<registry>/<repo>:<tag>`: the form stored in the index (digest refs get `latest`)."""
        return f"{self.name}:{self.tag or 'latest'}"

    @property
    def reference(self) -> str:
        """What to put after `/manifests/` in a registry URL."""
        return self.digest or self.tag or "latest"

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API_HOST if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def is_huggingface(self) -> bool:
        return self.registry in HF_ALIASES

    def scheme(self, insecure_registries: Iterable[str] = ()) -> str:
        return "http" if is_plain_http_registry(self.registry, insecure_registries) else "https"

    def base_url(self, insecure_registries: Iterable[str] = ()) -> str:
        return f"{self.scheme(insecure_registries)}://{self.api_host}"

    def __str__(self) -> str:
        if self.digest:
            return f"{self.name}@{self.digest}"
        return self.tag_string


def is_plain_http_registry(registry: str, insecure_registries: Iterable[str] = ()) -> bool:
    """Loopback and `.local` registries speak plain HTTP; others HTTPS unless listed."""
    if registry in set(insecure_registries):
        return True
    if config.env_bool("INSECURE_REGISTRY"):
        return True
    host = _host_of(registry)
    if host == "localhost" or host.endswith(".local"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(registry: str) -> str:
    if registry.startswith("["):
        return registry[1 : registry.index("]")]
    return registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry


def validate_digest(digest: str) -> str:
    """Accept only `sha256:<64 hex>` / `sha512:<128 hex>`: digests become file names."""
    if not _VALID_DIGEST.match(digest):
        raise InvalidReference(
            f"invalid digest {digest!r}: expected sha256:<64 lowercase hex characters>"
        )
    return digest


def is_model_id(value: str) -> bool:
    """A full (`sha256:…`, 64 hex) or short (12 hex) model ID."""
    v = value.strip()
    if v.startswith("sha256:"):
        return bool(_HEX64.match(v[7:]))
    return bool(_HEX64.match(v) or _HEX12.match(v))


def _split_tag(name: str) -> tuple[str, str | None, str | None]:
    """Split `name[:tag][@digest]`; `:` is a tag separator only after the last `/`."""
    digest = None
    if "@" in name:
        name, digest = name.split("@", 1)
    tag = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest


def normalize_model_name(value: str, resolve_id: Callable[[str], str | None] | None = None) -> str:
    """DMR's `normalizeModelName` (spec §3a)."""
    name = value.strip()
    if not name:
        return name
    if name.startswith("hf.co/"):
        name = HF_REGISTRY + name[len("hf.co") :]
    if is_model_id(name):
        full = resolve_id(name) if resolve_id else None
        return full or name
    if "@" in name:
        base, digest = name.split("@", 1)
        return f"{_default_namespace(base).lower()}@{digest}"
    base, tag, _ = _split_tag(name)
    return f"{_default_namespace(base).lower()}:{tag or 'latest'}"


def _default_namespace(name: str) -> str:
    if "/" not in name:
        return f"{DEFAULT_ORG}/{name}"
    return name


def parse_reference(value: str, *, default_registry: str | None = None) -> Reference:
    """Parse like docker/distribution's `ParseNormalizedNamed`, with DMR's `ai/` default org."""
    raw = value.strip()
    if not raw:
        raise InvalidReference("invalid reference format: empty reference")
    if raw.startswith("hf.co/"):
        raw = HF_REGISTRY + raw[len("hf.co") :]
    name, tag, digest = _split_tag(raw)
    if tag is not None and tag == "":
        tag = None
    if tag is not None and not _TAG_RE.match(tag):
        raise InvalidReference(f"invalid reference format: invalid tag {tag!r} in {value!r}")
    if digest is not None:
        if not _DIGEST_RE.match(digest):
            raise InvalidReference(f"invalid reference format: invalid digest in {value!r}")
        validate_digest(digest)

    registry_default = default_registry or config.env("DEFAULT_REGISTRY") or DEFAULT_REGISTRY
    if registry_default == "index.docker.io":
        registry_default = DEFAULT_REGISTRY
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, rest
        if not _DOMAIN_RE.match(registry):
            raise InvalidReference(f"invalid reference format: invalid registry {registry!r}")
    else:
        registry, path = registry_default, name
    if registry == "index.docker.io":
        registry = DEFAULT_REGISTRY
    if registry in HF_ALIASES:
        registry = HF_REGISTRY
        path = path.lower()
    if path != path.lower():
        raise InvalidReference(
            f"invalid reference format: repository name {path!r} must be lowercase"
        )
    components = path.split("/")
    for component in components:
        if not _COMPONENT_RE.match(component):
            raise InvalidReference(
                f"invalid reference format: {value!r} is not a valid model reference",
                hint="references look like ai/smollm2, ai/smollm2:360M-Q4_K_M or "
                "registry.example.com/org/model:tag",
            )
    if len(components) == 1 and registry == DEFAULT_REGISTRY:
        # docker/distribution would say library/<name>; DMR's default org is ai/.
        path = f"{DEFAULT_ORG}/{path}"
    elif components[0] == "library" and len(components) == 2 and registry == DEFAULT_REGISTRY:
        path = f"{DEFAULT_ORG}/{components[1]}"
    if len(f"{registry}/{path}") > _MAX_NAME:
        raise InvalidReference("invalid reference format: repository name too long")
    if digest is None and tag is None:
        tag = "latest"
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)


def canonical_tag(value: str) -> str:
    """`ai/x` → `docker.io/ai/x:latest`; what the index stores and compares."""
    return parse_reference(normalize_model_name(value)).tag_string


def try_canonical(value: str) -> str | None:
    try:
        ref = parse_reference(value)
    except InvalidReference:
        return None
    return str(ref)


def display_name(tag: str) -> str:
    """Strip defaults for display: `docker.io/ai/gemma3:latest` → `gemma3`."""
    registry = config.env("DEFAULT_REGISTRY")
    for prefix in ("docker.io/", "index.docker.io/", f"{registry}/" if registry else ""):
        if prefix and tag.startswith(prefix):
            tag = tag[len(prefix) :]
            break
    if tag.startswith(f"{DEFAULT_ORG}/"):
        tag = tag[len(DEFAULT_ORG) + 1 :]
    if tag.endswith(":latest"):
        tag = tag[: -len(":latest")]
    return tag


def short_id(model_id: str) -> str:
    return model_id.removeprefix("sha256:")[:12]
