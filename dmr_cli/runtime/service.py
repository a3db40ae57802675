"""`dmr serve` as a background service: a systemd user unit on Linux, a launchd agent on
macOS, installed, removed and inspected with systemctl / launchctl.

The unit and plist texts come from pure functions (`systemd_unit`, `launchd_plist`). The
managers run their commands through a `Runner` they are given (`run_command` by default),
the seam the tests use in place of a user session this machine may not have.
"""

from __future__ import annotations

import os
import plistlib
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from dmr_cli import config
from dmr_cli.errors import BadRequest, DmrError
from dmr_cli.runtime.daemon import LOG_FILE

UNIT_NAME = "dmr.service"
LAUNCHD_LABEL = "dmr-cli.serve"
ENV_FILE_NAME = "service.env"
COMMAND_TIMEOUT = 120.0  # `systemctl restart` waits for the start job
# `dmr serve` stops its runners itself on SIGTERM (uvicorn gives requests 5 s, then each
# runner gets its own grace): this is the most it may take before systemd kills the rest.
STOP_TIMEOUT = 30

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Words systemd takes as they are; anything else is quoted (`%` and `$` are escaped apart).
_BARE_WORD = re.compile(r"[A-Za-z0-9_@%$+=:,./-]+")
# A name that holds a secret, unless it names a file or directory that holds it.
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_NOT_SECRET = re.compile(r"_(FILE|PATH|DIR)$", re.IGNORECASE)
_NO_BUS = ("Failed to connect to bus", "System has not been booted with systemd")


class CommandResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


Runner = Callable[[Sequence[str]], CommandResult]


def run_command(argv: Sequence[str]) -> CommandResult:
    """Run ARGV and capture its output; a missing program is exit status 127."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            errors="replace",
            stdin=subprocess.DEVNULL,
            timeout=COMMAND_TIMEOUT,
        )
    except FileNotFoundError:
        return CommandResult(127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired as exc:
        raise DmrError(f"`{' '.join(argv)}` did not finish within {COMMAND_TIMEOUT:g} s") from exc
    return CommandResult(done.returncode, done.stdout, done.stderr)


# -- what the service runs ----------------------------------------------------------------


@dataclass(frozen=True)
class ServiceSpec:
    """The command line and environment of the service's `dmr serve`."""

    argv: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]
    log_dir: Path


def env_file_path() -> Path:
    return config.config_dir() / ENV_FILE_NAME


def _keys_file() -> Path:
    from dmr_cli.server.access import default_keys_file

    return default_keys_file()


def parse_env(assignments: Sequence[str], *, env_file: Path | None) -> list[tuple[str, str]]:
    """`NAME=VALUE` words as pairs. Secrets are refused: a unit or plist is a plain file
    that other programs (and, for units, other users) can read. ENV_FILE: where systemd
    reads them from instead (None for launchd, which has no such file)."""
    pairs = []
    for assignment in assignments:
        name, equals, value = assignment.partition("=")
        if not equals or not _NAME.fullmatch(name):
            raise BadRequest(f"invalid --env {assignment!r}: expected NAME=VALUE")
        if _SECRET.search(name) and not _NOT_SECRET.search(name):
            if name in ("DMR_API_KEYS", "DMR_API_KEY"):
                hint = (
                    f"write the keys to {_keys_file()} (one a line, chmod 600): "
                    "the daemon reads that file itself"
                )
            elif env_file is not None:
                hint = f"put {name}=... in {env_file} (chmod 600): the unit reads that file"
            else:
                hint = "pass secrets to the daemon through files it reads (keys file, ~/.docker)"
            raise BadRequest(
                f"not writing the secret {name} into the service definition", hint=hint
            )
        pairs.append((name, value))
    return pairs


def service_spec(
    host: str, port: int, models_path: Path | None, env: Sequence[tuple[str, str]]
) -> ServiceSpec:
    """`python -m dmr_cli serve` with these settings, run by this Python (a venv's python
    keeps its venv). A service manager does not pass this shell's environment on, so what
    it sets is carried over: the store from $MODELS_PATH when MODELS_PATH is not given, the
    log directory `dmr logs` reads from here, and PATH (llama-server and GPU tools are found
    the same way). ENV comes last and wins."""
    if not sys.executable:
        raise DmrError("cannot tell which Python runs dmr (sys.executable is empty)")
    argv = [os.path.abspath(sys.executable), "-m", "dmr_cli", "serve"]
    argv += ["--host", host, "--port", str(port)]
    if models_path is None and config.env("MODELS_PATH"):
        models_path = config.models_path()
    if models_path is not None:
        argv += ["--models-path", str(models_path.expanduser().absolute())]
    pinned = {
        "PATH": os.environ.get("PATH", os.defpath),
        "MODEL_RUNNER_LOG_DIR": str(config.log_dir().absolute()),
    }
    environment = {**pinned, **dict(env)}
    log_dir = Path(environment["MODEL_RUNNER_LOG_DIR"])
    return ServiceSpec(tuple(argv), tuple(environment.items()), log_dir)


# -- systemd ------------------------------------------------------------------------------


def _printable(value: str, what: str) -> str:
    if not value.isprintable():
        raise BadRequest(f"{what} {value!r} holds a line break or control character")
    return value


def systemd_exec_path(path: str) -> str:
    """The program of an ExecStart= line. systemd expands `%` specifiers there but not
    `$` variables, and refuses quotes and backslashes in it outright."""
    _printable(path, "the program path")
    if any(c in path for c in "\"'\\"):
        raise BadRequest(
            f"systemd cannot run a program whose path holds quotes or backslashes: {path}",
            hint="install dmr under a path without them",
        )
    escaped = path.replace("%", "%%")
    return escaped if _BARE_WORD.fullmatch(path) else f'"{escaped}"'


def systemd_arg(word: str) -> str:
    """One ExecStart= argument, quoted so that systemd passes WORD as it is."""
    _printable(word, "the argument")
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return escaped if _BARE_WORD.fullmatch(word) else f'"{escaped}"'


def systemd_environment(name: str, value: str) -> str:
    """An Environment= value: quoted, `%` escaped (`$` means nothing there)."""
    _printable(value, f"the value of {name}")
    text = f"{name}={value}".replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{text}"'


def systemd_unit(spec: ServiceSpec, env_file: Path) -> str:
    """The text of the systemd user unit that runs SPEC, reading secrets from ENV_FILE."""
    program, *args = spec.argv
    exec_start = " ".join([systemd_exec_path(program), *map(systemd_arg, args)])
    env_path = _printable(str(env_file), "the environment file").replace("%", "%%")
    lines = [
        "# Written by `dmr service install`; `dmr service uninstall` removes it.",
        "[Unit]",
        "Description=dmr model runner (dmr serve)",
        "",
        "[Service]",
        "Type=exec",
        f"ExecStart={exec_start}",
        *(f"Environment={systemd_environment(k, v)}" for k, v in spec.environment),
        "# Secrets (HF_TOKEN, ...) go here, readable only by you; the file is optional.",
        f"EnvironmentFile=-{env_path}",
        "Restart=on-failure",
        "RestartSec=3",
        "# The daemon stops its runners on SIGTERM: signal it alone, and give it time.",
        "KillMode=mixed",
        f"TimeoutStopSec={STOP_TIMEOUT}",
        "# stdout/stderr go to the journal; the daemon writes MODEL_RUNNER_LOG_DIR itself.",
        "SyslogIdentifier=dmr",
        "",
        "[Install]",
        "WantedBy=default.target",
    ]
    return "\n".join(lines) + "\n"


def user_unit_dir() -> Path:
    """Where systemd looks for the user's own units: $XDG_CONFIG_HOME/systemd/user."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    # The XDG spec: a relative value is invalid and must be ignored (systemd does).
    root = Path(base) if os.path.isabs(base) else Path.home() / ".config"
    return root / "systemd" / "user"


# -- launchd ------------------------------------------------------------------------------


def launchd_plist(spec: ServiceSpec, label: str = LAUNCHD_LABEL) -> bytes:
    """The launchd agent that runs SPEC: started at login, restarted when it fails."""
    log = str(spec.log_dir / LOG_FILE)
    agent: dict[str, Any] = {
        "Label": label,
        "ProgramArguments": list(spec.argv),
        "EnvironmentVariables": dict(spec.environment),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # again after a crash, not after a clean stop
        "StandardOutPath": log,
        "StandardErrorPath": log,
    }
    return plistlib.dumps(agent)


# -- managers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceStatus:
    manager: str  # "systemd" | "launchd"
    name: str  # the unit name or launchd label
    path: Path  # the unit file or plist
    installed: bool
    enabled: bool  # starts at login
    active: bool  # running now
    state: str  # the manager's own words
    pid: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "manager": self.manager,
            "name": self.name,
            "path": str(self.path),
            "installed": self.installed,
            "enabled": self.enabled,
            "active": self.active,
            "state": self.state,
            "pid": self.pid,
        }


class ServiceManager(Protocol):
    @property
    def manager(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def path(self) -> Path: ...
    @property
    def env_file(self) -> Path | None:
        """Where secrets for the service go, when the manager reads such a file."""

    def render(self, spec: ServiceSpec) -> str: ...
    def install(self, spec: ServiceSpec) -> None: ...
    def uninstall(self) -> bool: ...
    def status(self) -> ServiceStatus: ...


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _failed(argv: Sequence[str], result: CommandResult, hint: str | None = None) -> DmrError:
    said = (result.stderr.strip() or result.stdout.strip()).splitlines()
    detail = f": {' '.join(said[-3:])}" if said else ""
    return DmrError(f"`{' '.join(argv)}` failed (exit {result.returncode}){detail}", hint=hint)


class SystemdUserService:
    """dmr.service in the user's systemd instance (`systemctl --user`)."""

    manager = "systemd"
    name = UNIT_NAME

    def __init__(
        self,
        run: Runner = run_command,
        unit_dir: Path | None = None,
        env_file: Path | None = None,
    ) -> None:
        self._run = run
        self.path = (unit_dir or user_unit_dir()) / UNIT_NAME
        self.env_file = env_file or env_file_path()

    def render(self, spec: ServiceSpec) -> str:
        return systemd_unit(spec, self.env_file)

    def _systemctl(self, *args: str, hint: str | None = None) -> CommandResult:
        argv = ["systemctl", "--user", *args]
        result = self._run(argv)
        if result.returncode == 0:
            return result
        if result.returncode == 127:
            raise DmrError(
                "systemctl not found: this system does not run systemd",
                hint="run the daemon with `dmr start-runner` instead",
            )
        said = result.stderr.strip()
        if any(marker in said for marker in _NO_BUS):
            raise DmrError(
                f"cannot reach your systemd user instance ({said.splitlines()[-1]})",
                hint=(
                    "`systemctl --user` needs a login session with a user bus, which containers,"
                    " CI jobs and su/sudo shells lack: log in as this user (ssh or desktop), or "
                    "enable lingering (loginctl enable-linger $USER) and set XDG_RUNTIME_DIR="
                    "/run/user/$(id -u); without systemd, use `dmr start-runner`. "
                    "`dmr service install --dry-run` prints the unit"
                ),
            )
        raise _failed(argv, result, hint)

    def install(self, spec: ServiceSpec) -> None:
        """Write the unit, then enable it and (re)start it with what was written."""
        text = self.render(spec)
        self._systemctl("show", "--property=Version")  # a user instance answers: or say why
        _write_atomic(self.path, text.encode())
        self._systemctl("daemon-reload")
        self._systemctl("enable", UNIT_NAME)
        self._systemctl(
            "restart",
            UNIT_NAME,
            hint=f"see `journalctl --user -u {UNIT_NAME}` and `dmr logs`",
        )

    def uninstall(self) -> bool:
        """Stop, disable and remove the unit; False when there was none."""
        if not self.path.is_file():
            return False
        self._systemctl("disable", "--now", UNIT_NAME)
        self.path.unlink()
        self._systemctl("daemon-reload")
        # A unit that failed stays listed as failed until this (harmless when it did not).
        self._run(["systemctl", "--user", "reset-failed", UNIT_NAME])
        return True

    def status(self) -> ServiceStatus:
        properties = "LoadState,ActiveState,SubState,UnitFileState,MainPID"
        shown = self._systemctl("show", UNIT_NAME, f"--property={properties}").stdout
        values = {}
        for line in shown.splitlines():
            key, _, value = line.partition("=")
            values[key] = value
        active, sub = values.get("ActiveState", "unknown"), values.get("SubState", "")
        pid = values.get("MainPID", "0")
        return ServiceStatus(
            manager=self.manager,
            name=self.name,
            path=self.path,
            installed=self.path.is_file(),
            enabled=values.get("UnitFileState", "").startswith("enabled"),
            active=active == "active",
            state=f"{active} ({sub})" if sub else active,
            pid=int(pid) if pid.isdigit() and int(pid) > 0 else None,
        )


class LaunchAgent:
    """The dmr agent in the user's launchd GUI domain (`launchctl ... gui/<uid>`)."""

    manager = "launchd"
    name = LAUNCHD_LABEL
    env_file: Path | None = None  # launchd has no such file: secrets stay out of the agent

    def __init__(
        self, run: Runner = run_command, agents_dir: Path | None = None, uid: int | None = None
    ) -> None:
        self._run = run
        self.path = (agents_dir or Path.home() / "Library" / "LaunchAgents") / f"{self.name}.plist"
        self.domain = f"gui/{os.getuid() if uid is None else uid}"
        self.target = f"{self.domain}/{self.name}"

    def render(self, spec: ServiceSpec) -> str:
        return launchd_plist(spec, self.name).decode()

    def _launchctl(self, *args: str) -> CommandResult:
        argv = ["launchctl", *args]
        result = self._run(argv)
        if result.returncode != 0:
            hint = None
            if args[0] == "bootstrap":
                hint = (
                    "a launchd agent needs this user's GUI login session (not just ssh); see "
                    f"`launchctl print {self.domain}`"
                )
            raise _failed(argv, result, hint)
        return result

    def install(self, spec: ServiceSpec) -> None:
        """Write the plist and (re)load it into the GUI domain."""
        data = launchd_plist(spec, self.name)
        # An agent already loaded keeps its old definition until it is booted out; not
        # being loaded is the usual case, so the outcome does not matter here.
        self._run(["launchctl", "bootout", self.target])
        _write_atomic(self.path, data)
        self._launchctl("enable", self.target)
        self._launchctl("bootstrap", self.domain, str(self.path))

    def uninstall(self) -> bool:
        """Unload and remove the agent; False when there was none."""
        loaded = self._run(["launchctl", "print", self.target]).returncode == 0
        if not loaded and not self.path.is_file():
            return False
        if loaded:
            self._launchctl("bootout", self.target)
        self.path.unlink(missing_ok=True)
        return True

    def status(self) -> ServiceStatus:
        printed = self._run(["launchctl", "print", self.target])
        loaded = printed.returncode == 0
        state = re.search(r"^\s*state = (.+)$", printed.stdout, re.MULTILINE)
        pid = re.search(r"^\s*pid = (\d+)$", printed.stdout, re.MULTILINE)
        disabled = self._run(["launchctl", "print-disabled", self.domain]).stdout
        # macOS 13+ writes `=> disabled`, older releases `=> true`.
        off = re.search(rf'"{re.escape(self.name)}" => (true|disabled)', disabled) is not None
        installed = self.path.is_file()
        return ServiceStatus(
            manager=self.manager,
            name=self.name,
            path=self.path,
            installed=installed,
            enabled=installed and not off,
            active=loaded and state is not None and state.group(1).strip() == "running",
            state=state.group(1).strip() if loaded and state else "not loaded",
            pid=int(pid.group(1)) if loaded and pid else None,
        )


def service_manager(run: Runner = run_command) -> ServiceManager:
    """This platform's service manager."""
    if sys.platform == "darwin":
        return LaunchAgent(run)
    if sys.platform.startswith("linux"):
        return SystemdUserService(run)
    raise DmrError(
        f"dmr service supports Linux (systemd) and macOS (launchd), not {sys.platform}",
        hint="start the daemon at login with your system's scheduler running `dmr start-runner`",
    )
