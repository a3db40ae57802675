"""Per-model runner configurations (`_configure`), persisted in the store so they survive
daemon restarts. DMR keeps them in memory only."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmr_cli.runtime.config import RunnerConfig
from dmr_cli.store.fsutil import atomic_write

FILE_NAME = "runner-configs.json"


@dataclass(frozen=True)
class ConfigKey:
    backend: str
    model_id: str
    mode: str


@dataclass
class StoredConfig:
    key: ConfigKey
    model: str  # the reference the client configured, shown when the ID is no longer local
    config: RunnerConfig


class ConfigStore:
    def __init__(self, root: Path) -> None:
        self.path = root / FILE_NAME
        self._lock = threading.Lock()
        self._configs: dict[ConfigKey, StoredConfig] = {}
        self._load()

    def _load(self) -> None:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        for entry in entries if isinstance(entries, list) else []:
            try:
                key = ConfigKey(entry["backend"], entry["model_id"], entry["mode"])
                config = RunnerConfig.from_json(entry["config"])
            except (KeyError, TypeError, ValueError):
                continue  # an entry this version cannot read is skipped, not fatal
            self._configs[key] = StoredConfig(key, entry.get("model", ""), config)

    def _save(self) -> None:
        entries: list[dict[str, Any]] = [
            {
                "backend": c.key.backend,
                "model_id": c.key.model_id,
                "mode": c.key.mode,
                "model": c.model,
                "config": c.config.to_json(),
            }
            for c in self._configs.values()
        ]
        atomic_write(self.path, (json.dumps(entries, indent=2) + "\n").encode())

    def get(self, key: ConfigKey) -> RunnerConfig | None:
        with self._lock:
            stored = self._configs.get(key)
            return stored.config if stored else None

    def lookup(self, backend: str, model_id: str, mode: str) -> RunnerConfig | None:
        """Reranking and image generation reuse the completion config when they have none."""
        found = self.get(ConfigKey(backend, model_id, mode))
        if found is None and mode in ("reranking", "image-generation"):
            found = self.get(ConfigKey(backend, model_id, "completion"))
        return found

    def set(self, key: ConfigKey, model: str, config: RunnerConfig) -> bool:
        """Store a config; False when the identical config was already there (a no-op)."""
        with self._lock:
            current = self._configs.get(key)
            if current is not None and current.config.to_json() == config.to_json():
                return False
            self._configs[key] = StoredConfig(key, model, config)
            self._save()
            return True

    def remove(self, backend: str | None, model_id: str | None = None) -> int:
        """Drop configs of a model on a backend (None = every backend / every model)."""
        with self._lock:
            doomed = [
                k
                for k in self._configs
                if (backend is None or k.backend == backend)
                and (model_id is None or k.model_id == model_id)
            ]
            for key in doomed:
                del self._configs[key]
            if doomed:
                self._save()
            return len(doomed)

    def all(self) -> list[StoredConfig]:
        with self._lock:
            return list(self._configs.values())
