"""A model as the store sees it: index entry + manifest + config."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dmr_cli.reference import try_canonical


@dataclass
class IndexEntry:
    id: str
    tags: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IndexEntry:
        return cls(id=data["id"], tags=list(data.get("tags") or []), files=list(data["files"]))

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "tags": self.tags, "files": self.files}

    def has_tag(self, canonical: str) -> bool:
        """Stored tags may be legacy (`ai/x:latest`): compare canonical forms."""
        return any(t == canonical or try_canonical(t) == canonical for t in self.tags)


@dataclass
class Model:
    id: str
    tags: list[str]
    files: list[str]
    manifest: dict[str, Any]
    raw_config: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        """The inner DMR config object (`format`, `quantization`, ... , `gguf`)."""
        from dmr_cli.distribution.artifact import inner_config

        return inner_config(self.raw_config)

    @property
    def created(self) -> int:
        descriptor = self.raw_config.get("descriptor") or {}
        value = descriptor.get("created") or descriptor.get("createdAt")
        return rfc3339_to_unix(value) if isinstance(value, str) else 0

    @property
    def layers(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("layers") or [])

    @property
    def config_digest(self) -> str:
        return str(self.manifest["config"]["digest"])

    @property
    def size(self) -> int:
        return sum(int(layer.get("size", 0)) for layer in self.layers)

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.tags:
            out["tags"] = self.tags
        out["created"] = self.created
        out["config"] = self.config
        return out


def rfc3339_to_unix(value: str) -> int:
    """Go writes 0–9 fractional digits; Python 3.10's parser wants exactly 3 or 6."""
    value = re.sub(r"\.(\d+)", lambda m: "." + (m[1] + "000000")[:6], value.strip())
    value = value.replace("Z", "+00:00")
    try:
        return int(datetime.fromisoformat(value).timestamp())
    except ValueError:
        return 0


def load_json(data: bytes) -> dict[str, Any]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value
