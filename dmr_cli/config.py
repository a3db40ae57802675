"""Settings and well-known paths.

Precedence: defaults < environment. Kept free of heavy imports: every command reads it.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_PORT = 12434
DEFAULT_HOST = f"http://127.0.0.1:{DEFAULT_PORT}"
APP_NAME = "dmr"


def _user_dir(kind: str) -> Path:
    """platformdirs' `user_<kind>_dir`, imported only when a default path is needed."""
    import platformdirs

    return Path(getattr(platformdirs, f"user_{kind}_dir")(APP_NAME))


def env(name: str, default: str = "") -> str:
    """An environment value with spaces and surrounding quotes trimmed, as DMR does."""
    return os.environ.get(name, default).strip().strip("\"'")


def env_bool(name: str) -> bool:
    return env(name).lower() in ("1", "true", "yes", "on")


def models_path() -> Path:
    value = env("MODELS_PATH")
    if value:
        return Path(value).expanduser()
    return _user_dir("data") / "models"


def state_dir() -> Path:
    """Daemon pid file, auto-start log, chat history."""
    value = env("DMR_STATE_DIR")
    if value:
        return Path(value).expanduser()
    return _user_dir("state")


def log_dir() -> Path:
    value = env("MODEL_RUNNER_LOG_DIR")
    if value:
        return Path(value).expanduser()
    return state_dir() / "logs"


def runner_dir() -> Path:
    """Where installed llama-server variants live."""
    value = env("DMR_RUNNER_DIR")
    if value:
        return Path(value).expanduser()
    return _user_dir("data") / "runners"


def docker_config_dir() -> Path:
    value = env("DOCKER_CONFIG")
    return Path(value).expanduser() if value else Path.home() / ".docker"


def runner_host() -> str:
    """The daemon address the CLI talks to (`MODEL_RUNNER_HOST`)."""
    value = env("MODEL_RUNNER_HOST")
    if not value:
        return DEFAULT_HOST
    if "://" not in value:
        scheme = "https" if env_bool("MODEL_RUNNER_TLS") else "http"
        value = f"{scheme}://{value}"
    return value.rstrip("/")


def insecure_registries() -> list[str]:
    """Registries reached over plain HTTP beyond loopback and `.local` ones."""
    return [r.strip() for r in env("DMR_INSECURE_REGISTRIES").split(",") if r.strip()]
