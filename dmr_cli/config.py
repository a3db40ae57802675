"""Settings and well-known paths.

Precedence: defaults < config file < environment (< a command's own flags). `SETTINGS` is
the one table of them: `env()` answers from the environment, then from the config file, for
every name in it, so the code reads a setting the same way whichever place it was set in.

The config file (`config.toml` in the user config dir, or `$DMR_CONFIG`) is read the first
time a setting is asked for, once per process, and only then; tomllib is imported only when
the file exists. Kept free of heavy imports: every command reads this module, and on Linux
the user dirs are found without platformdirs (~10 ms of start-up).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from dmr_cli.errors import DmrError

DEFAULT_PORT = 12434
DEFAULT_HOST = f"http://127.0.0.1:{DEFAULT_PORT}"
APP_NAME = "dmr"
CONFIG_ENV = "DMR_CONFIG"
CONFIG_FILE_NAME = "config.toml"
SECRET = "(set)"  # how a secret's value is shown
_TRUE = ("1", "true", "yes", "on")

# Where the XDG base directories are when their variable is unset (or not absolute).
_XDG = {
    "data": ("XDG_DATA_HOME", "~/.local/share"),
    "state": ("XDG_STATE_HOME", "~/.local/state"),
    "config": ("XDG_CONFIG_HOME", "~/.config"),
}


def _user_dir(kind: str) -> Path:
    """platformdirs' `user_<kind>_dir`. On Linux the same rule platformdirs applies (the XDG
    variable when it is an absolute path, else the XDG default), without importing it."""
    if sys.platform.startswith("linux"):
        variable, fallback = _XDG[kind]
        base = os.environ.get(variable, "")
        return Path(base if os.path.isabs(base) else os.path.expanduser(fallback)) / APP_NAME
    import platformdirs

    return Path(getattr(platformdirs, f"user_{kind}_dir")(APP_NAME))


# -- the settings table ---------------------------------------------------------------------


class Setting(NamedTuple):  # not a dataclass: importing dataclasses costs `dmr ls` ~7 ms
    """One setting: its environment variable, its key in config.toml, its type."""

    env: str
    key: str
    kind: str  # str | path | int | bool | list (a comma list in the environment)
    description: str
    # The value used when nothing sets it, as the environment would spell it; where it
    # depends on the machine, how the docs describe it (and `compute` gives the value).
    default: str = ""
    compute: Callable[[], str] | None = None
    secret: bool = False  # never printed: shown as "(set)"


def config_dir() -> Path:
    """The user config dir: config.toml and the daemon's API keys file live there."""
    return _user_dir("config")


def default_slots() -> int:
    """How many runners may be loaded at once when DMR_SLOTS is unset (DMR's rule)."""
    return min(os.cpu_count() or 1, 8)


SETTINGS: tuple[Setting, ...] = (
    # The CLI
    Setting(
        "MODEL_RUNNER_HOST",
        "host",
        "str",
        "Where the CLI finds the daemon: `http(s)://HOST:PORT[/prefix]` or `unix:///path/to.sock`.",
        DEFAULT_HOST,
    ),
    Setting("MODEL_RUNNER_TLS", "tls", "bool", "Use https for a `host` given without a scheme."),
    Setting(
        "MODEL_RUNNER_TLS_CA_CERT",
        "tls_ca_cert",
        "path",
        "CA certificates (PEM) to verify the daemon's TLS certificate with.",
    ),
    Setting(
        "MODEL_RUNNER_TLS_SKIP_VERIFY",
        "tls_skip_verify",
        "bool",
        "Do not verify the daemon's TLS certificate.",
    ),
    Setting(
        "DMR_API_KEY",
        "api_key",
        "str",
        "The API key the CLI sends to a daemon that requires one.",
        secret=True,
    ),
    Setting(
        "DMR_NO_AUTO_START",
        "no_auto_start",
        "bool",
        "Report a missing daemon instead of starting one in the background.",
    ),
    Setting(
        "DOCKER_MODEL_NOHISTORY",
        "no_history",
        "bool",
        "Keep no input history in `dmr run`'s interactive chat.",
    ),
    # The daemon
    Setting(
        "MODEL_RUNNER_PORT",
        "port",
        "int",
        "TCP port `dmr serve` listens on when given neither `--port` nor `--socket`.",
        str(DEFAULT_PORT),
    ),
    Setting(
        "MODELS_PATH",
        "models_path",
        "path",
        "The model store (a Docker Model Runner store works as is).",
        "<user data dir>/models",
        compute=lambda: str(_user_dir("data") / "models"),
    ),
    Setting(
        "DMR_STATE_DIR",
        "state_dir",
        "path",
        "The daemon's pid file, the auto-start log, the chat history.",
        "<user state dir>",
        compute=lambda: str(_user_dir("state")),
    ),
    Setting(
        "MODEL_RUNNER_LOG_DIR",
        "log_dir",
        "path",
        "The daemon's and the runners' log files (what `dmr logs` reads).",
        "<state_dir>/logs",
        compute=lambda: str(state_dir() / "logs"),
    ),
    Setting(
        "DMR_RUNNER_DIR",
        "runner_dir",
        "path",
        "Installed llama-server variants.",
        "<user data dir>/runners",
        compute=lambda: str(_user_dir("data") / "runners"),
    ),
    Setting(
        "DMR_SLOTS",
        "slots",
        "int",
        "How many runners (loaded models) may run at once.",
        "min(CPU count, 8)",
        compute=lambda: str(default_slots()),
    ),
    Setting(
        "DMR_GPU",
        "gpu",
        "str",
        "The accelerator: `auto`, `cpu`, `cuda`, `vulkan`, `metal`, `opencl` or `rocm`.",
        "auto",
    ),
    Setting(
        "LLAMA_SERVER_PATH",
        "llama_server_path",
        "path",
        "A llama-server binary, or a directory holding one, to use instead of the installed "
        "variants.",
    ),
    Setting("LLAMA_ARGS", "llama_args", "str", "Replaces llama-server's default arguments."),
    Setting(
        "DMR_RUNNER_IMAGE",
        "runner_image",
        "str",
        "The OCI repository `dmr install-runner` takes llama-server variants from.",
        "docker/docker-model-backend-llamacpp",
    ),
    Setting(
        "DMR_BUILD_CACHE",
        "build_cache",
        "path",
        "Sources and build trees of `dmr install-runner --from-source`.",
        "<runner_dir>/../build-cache",
        compute=lambda: str(runner_dir().parent / "build-cache"),
    ),
    Setting(
        "DMR_LLAMA_SDIST",
        "llama_sdist",
        "path",
        "A llama-cpp-python sdist to build from instead of downloading one.",
    ),
    Setting(
        "LOG_LEVEL",
        "log_level",
        "str",
        "The daemon's log level: `debug`, `info`, `warn` or `error`.",
        "info",
    ),
    Setting("DISABLE_METRICS", "disable_metrics", "bool", "Turn `/metrics` off."),
    Setting(
        "DMR_RESPONSES_TTL",
        "responses_ttl",
        "int",
        "Seconds the Responses API keeps a stored response (`previous_response_id`, GET).",
        "3600",
    ),
    Setting(
        "DMR_API_KEYS",
        "api_keys",
        "list",
        "API keys the daemon accepts (`Authorization: Bearer` or `x-api-key`); none: no key "
        "is needed.",
        secret=True,
    ),
    Setting(
        "DMR_API_KEYS_FILE",
        "api_keys_file",
        "path",
        "A file of API keys the daemon accepts, one a line, readable by its owner only.",
        "<user config dir>/api-keys",
        compute=lambda: str(config_dir() / "api-keys"),
    ),
    Setting(
        "DMR_ORIGINS",
        "origins",
        "list",
        "Extra CORS origins the daemon allows (`scheme://host[:port]`, `:*` for any port, "
        "`*` for all).",
    ),
    # Registries
    Setting(
        "DEFAULT_REGISTRY",
        "default_registry",
        "str",
        "The registry of references that name none.",
        "docker.io",
    ),
    Setting(
        "INSECURE_REGISTRY",
        "insecure_registry",
        "bool",
        "Reach every registry over plain HTTP.",
    ),
    Setting(
        "DMR_INSECURE_REGISTRIES",
        "insecure_registries",
        "list",
        "Registries reached over plain HTTP (loopback and `*.local` ones always are).",
    ),
    Setting(
        "DOCKER_CONFIG",
        "docker_config",
        "path",
        "Where `config.json` with registry credentials is.",
        "~/.docker",
        compute=lambda: str(Path.home() / ".docker"),
    ),
    Setting("HF_TOKEN", "hf_token", "str", "Token for Hugging Face pulls.", secret=True),
    Setting(
        "HF_ENDPOINT",
        "hf_endpoint",
        "str",
        "The Hugging Face Hub to pull `hf.co/...` models from.",
        "https://huggingface.co",
    ),
)
BY_ENV = {s.env: s for s in SETTINGS}
BY_KEY = {s.key: s for s in SETTINGS}


# -- reading --------------------------------------------------------------------------------


def _environ(name: str) -> str:
    """An environment value with spaces and surrounding quotes trimmed, as DMR does."""
    return os.environ.get(name, "").strip().strip("\"'")


def env(name: str, default: str = "") -> str:
    """A setting as the environment spells it: from the environment (an empty value counts
    as unset), else from the config file for the settings in `SETTINGS`, else DEFAULT."""
    value = _environ(name)
    if value or name not in BY_ENV:
        return value or default
    values = _config_file().values
    if name in values:
        return _env_form(BY_ENV[name], values[name])
    return default


def env_bool(name: str) -> bool:
    return env(name).lower() in _TRUE


def config_path() -> Path:
    value = _environ(CONFIG_ENV)
    return Path(value).expanduser() if value else config_dir() / CONFIG_FILE_NAME


class ConfigFile(NamedTuple):
    path: Path
    values: dict[str, Any]  # environment variable → the file's value, checked against its kind


_loaded: ConfigFile | DmrError | None = None


def _config_file() -> ConfigFile:
    """The config file, read once per process (an error, once found, is raised every time)."""
    global _loaded
    if _loaded is None:
        try:
            _loaded = _read_config_file(config_path(), explicit=bool(_environ(CONFIG_ENV)))
        except DmrError as e:
            _loaded = e
    if isinstance(_loaded, DmrError):
        raise _loaded
    return _loaded


def clear_cache() -> None:
    """Forget the config file read so far (the next setting asked for reads it again)."""
    global _loaded
    _loaded = None


def _read_config_file(path: Path, *, explicit: bool) -> ConfigFile:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise DmrError(f"the config file {path} ({CONFIG_ENV}) does not exist") from None
        return ConfigFile(path, {})
    except OSError as e:
        raise DmrError(f"cannot read the config file {path}: {e.strerror or e}") from e
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # tomllib is new in 3.11; tomli is the same parser
        import tomli as tomllib
    try:
        text = data.decode("utf-8")
        table = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise DmrError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except tomllib.TOMLDecodeError as e:
        raise DmrError(f"{path}:{_decode_error(str(e))}") from e
    values = {}
    for key, value in table.items():
        setting = BY_KEY.get(key)
        where = f"{path}:{_line_of(text, key)}"
        if setting is None:
            raise DmrError(f"{where}: unknown setting {key!r}", hint=_suggestion(key))
        values[setting.env] = _check(setting, value, where)
    return ConfigFile(path, values)


_DOCS_HINT = "docs/config.md lists the settings"
_TOML_TYPES = {
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    str: "a string",
    list: "an array",
    dict: "a table",
}
_EXPECTED = {
    "str": "a string",
    "path": "a string",
    "int": "an integer",
    "bool": "a boolean (true or false)",
    "list": "an array of strings (or a comma list in a string)",
}


def _check(setting: Setting, value: Any, where: str) -> Any:
    """VALUE when it has the setting's TOML type (a list may also be a comma list in a
    string); otherwise a DmrError saying what is wrong."""
    kind = setting.kind
    if kind == "list" and isinstance(value, str):
        value = [item.strip() for item in value.split(",") if item.strip()]
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "list":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if ok and any("," in v for v in value):
            raise DmrError(f"{where}: {setting.key}: an item holds a comma; list it apart")
    else:
        ok = isinstance(value, str)
        if ok and not value.strip():
            raise DmrError(
                f"{where}: {setting.key} is empty", hint="remove the line to use the default"
            )
    if not ok:
        got = _TOML_TYPES.get(type(value), "a date or time")
        shown = "" if setting.secret else f" ({value!r})"
        raise DmrError(f"{where}: {setting.key} must be {_EXPECTED[kind]}, not {got}{shown}")
    return value


def _env_form(setting: Setting, value: Any) -> str:
    """A config file value as the environment variable would hold it."""
    if setting.kind == "bool":
        return "1" if value else ""
    if setting.kind == "list":
        return ",".join(value)
    return str(value)


def _decode_error(message: str) -> str:
    """tomllib's "Invalid value (at line 3, column 8)" as "3:8: invalid TOML: invalid value"."""
    import re

    found = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message)
    if found is None:
        return f" invalid TOML: {message}"
    return f"{found[2]}:{found[3]}: invalid TOML: {found[1][:1].lower()}{found[1][1:]}"


def _line_of(text: str, key: str) -> str:
    """The line number where KEY is set (or its table opens) in TEXT, "?" if not found."""
    import re

    quoted = re.escape(key)
    pattern = re.compile(rf"""\s*\[*\s*(?:{quoted}|"{quoted}"|'{quoted}')\s*[=.\]]""")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return str(number)
    return "?"


def _suggestion(key: str) -> str:
    """Did you mean ...? Matched against the keys and, lowercased, the variables' names."""
    import difflib

    by_name = {**{s.env.lower(): s.key for s in SETTINGS}, **{s.key: s.key for s in SETTINGS}}
    close = difflib.get_close_matches(key.lower(), list(by_name), n=1, cutoff=0.6)
    if close:
        return f"did you mean {by_name[close[0]]!r}?"
    return _DOCS_HINT


# -- where each value came from ---------------------------------------------------------------


class Resolved(NamedTuple):
    setting: Setting
    value: Any  # typed by the setting's kind; "(set)" for secrets
    source: str  # "environment", "config file <path>" or "default"


def resolve(setting: Setting) -> Resolved | None:
    """The setting's value and its source; None when nothing sets it and it has no default
    (booleans that are off by default included)."""
    raw = _environ(setting.env)
    if raw:
        return Resolved(setting, _shown(setting, _typed(setting, raw)), "environment")
    file = _config_file()
    if setting.env in file.values:
        value = file.values[setting.env]
        return Resolved(setting, _shown(setting, value), f"config file {file.path}")
    default = setting.compute() if setting.compute else setting.default
    if not default or setting.kind == "bool":
        return None
    return Resolved(setting, _shown(setting, _typed(setting, default)), "default")


def report() -> dict[str, Any]:
    """`dmr status --json`'s "config" and `dmr configure show --settings`: the config file's
    path and, for each setting that has a value, the value, its source and its variable."""
    settings = {}
    for setting in SETTINGS:
        found = resolve(setting)
        if found is not None:
            settings[setting.key] = {
                "value": found.value,
                "source": found.source,
                "env": setting.env,
            }
    return {"file": str(config_path()), "settings": settings}


def _typed(setting: Setting, raw: str) -> Any:
    if setting.kind == "bool":
        return raw.lower() in _TRUE
    if setting.kind == "int":
        try:
            return int(raw)
        except ValueError:
            return raw  # reported as given: the code reading it explains what is wrong
    if setting.kind == "list":
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def _shown(setting: Setting, value: Any) -> Any:
    return SECRET if setting.secret and value else value


# -- paths and addresses ---------------------------------------------------------------------


def _path(name: str) -> Path:
    """A path setting: its value, else its default."""
    compute = BY_ENV[name].compute
    value = env(name) or (compute() if compute else "")
    return Path(value).expanduser()


def models_path() -> Path:
    return _path("MODELS_PATH")


def state_dir() -> Path:
    """Daemon pid file, auto-start log, chat history."""
    return _path("DMR_STATE_DIR")


def log_dir() -> Path:
    return _path("MODEL_RUNNER_LOG_DIR")


def runner_dir() -> Path:
    """Where installed llama-server variants live."""
    return _path("DMR_RUNNER_DIR")


def docker_config_dir() -> Path:
    return _path("DOCKER_CONFIG")


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
