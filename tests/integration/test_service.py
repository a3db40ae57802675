"""`dmr service`: the systemd unit checked by the real `systemd-analyze verify`, the launchd
plist, the managers driven through their runner seam, the real systemctl where this machine
has no user bus, and the service's command line serving with its log where `dmr logs` looks."""

from __future__ import annotations

import os
import plistlib
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from dmr_cli.errors import BadRequest, DmrError
from dmr_cli.runtime import service
from dmr_cli.runtime.service import (
    CommandResult,
    LaunchAgent,
    ServiceSpec,
    SystemdUserService,
)
from tests.helpers.daemon import isolated_env
from tests.helpers.registry import free_port

SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"
# A directory name that breaks every naive quoting: a space, a specifier systemd would
# expand (%h: the home directory), a variable it must not expand there, a lone percent.
NASTY = "venv %h $HOME 100%"


def sections(unit: str) -> dict[str, list[tuple[str, str]]]:
    """The unit's `Key=Value` lines per section, comments left out."""
    found: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for line in unit.splitlines():
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            found[current] = []
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found[current].append((key, value))
    return found


def exec_argv(exec_start: str) -> list[str]:
    """The argv systemd makes of an ExecStart= value: words split and unquoted with C
    escapes (shlex does `\\\\` and `\\"` the same way), then `%%` → `%`, then `$$` → `$`."""
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(exec_start)]


def verify(unit: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify --user` on UNIT saved as DIRECTORY/dmr.service."""
    path = directory / "dmr.service"
    path.write_text(unit)
    runtime = directory / "runtime"  # the user manager it simulates needs one
    runtime.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--user", "--man=no", str(path)],
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated home for this process: config and state dirs under tmp_path."""
    home = tmp_path / "home"
    for name in [n for n in os.environ if n.startswith(("MODEL", "DMR_", "HF_"))]:
        monkeypatch.delenv(name)
    for name, value in isolated_env(home).items():
        monkeypatch.setenv(name, value)
    return home


@pytest.fixture
def nasty_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This Python, reached through a directory named NASTY, as sys.executable."""
    directory = tmp_path / NASTY
    directory.mkdir()
    link = directory / "python"
    link.symlink_to(sys.executable)
    monkeypatch.setattr(sys, "executable", str(link))
    return link


def nasty_spec(tmp_path: Path) -> ServiceSpec:
    models = tmp_path / 'store "quoted" back\\slash %h $HOME'
    env = [("LOG_LEVEL", 'de"bug \\ %h $HOME'), ("DMR_API_KEYS_FILE", str(tmp_path / "k 100%"))]
    return service.service_spec("0.0.0.0", 23456, models, env)


# -- the systemd unit ---------------------------------------------------------------------


def test_unit_passes_systemd_analyze_verify(home: Path, nasty_python: Path, tmp_path: Path) -> None:
    unit = service.systemd_unit(nasty_spec(tmp_path), tmp_path / "env 100% %h" / "service.env")
    result = verify(unit, tmp_path)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_would_catch_an_unescaped_program_path(
    home: Path, nasty_python: Path, tmp_path: Path
) -> None:
    # The control for the test above: verify resolves the program, so a `%h` left
    # unescaped makes it look for python under the home directory, and fail.
    unit = service.systemd_unit(nasty_spec(tmp_path), tmp_path / "service.env")
    broken = unit.replace("venv %%h", "venv %h", 1)
    assert broken != unit
    result = verify(broken, tmp_path)
    assert result.returncode != 0
    assert "is not executable" in result.stderr


def test_unit_runs_dmr_serve_with_the_given_settings(
    home: Path, nasty_python: Path, tmp_path: Path
) -> None:
    spec = nasty_spec(tmp_path)
    env_file = tmp_path / "secrets 100%" / "service.env"
    unit = sections(service.systemd_unit(spec, env_file))
    settings = dict(unit["Service"])
    assert exec_argv(settings["ExecStart"]) == list(spec.argv)
    assert spec.argv == (
        str(nasty_python),
        "-m",
        "dmr_cli",
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        "23456",
        "--models-path",
        str(tmp_path / 'store "quoted" back\\slash %h $HOME'),
    )
    assignments = [exec_argv(v)[0] for k, v in unit["Service"] if k == "Environment"]
    environment = dict(a.split("=", 1) for a in assignments)
    from dmr_cli import config

    assert environment["MODEL_RUNNER_LOG_DIR"] == str(config.log_dir())
    assert environment["PATH"] == os.environ["PATH"]
    assert environment["LOG_LEVEL"] == 'de"bug \\ %h $HOME'
    assert environment["DMR_API_KEYS_FILE"] == str(tmp_path / "k 100%")
    assert settings["EnvironmentFile"] == "-" + str(env_file).replace("%", "%%")
    assert settings["Restart"] == "on-failure"
    assert settings["Type"] == "exec"
    assert settings["KillMode"] == "mixed"
    assert dict(unit["Install"]) == {"WantedBy": "default.target"}


def test_the_shells_models_path_is_carried_over(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shell = service.service_spec("127.0.0.1", 12434, None, [])
    assert shell.argv[-2:] == ("--models-path", os.environ["MODELS_PATH"])
    flag = service.service_spec("127.0.0.1", 12434, tmp_path / "flag", [])
    assert flag.argv[-2:] == ("--models-path", str(tmp_path / "flag"))
    monkeypatch.delenv("MODELS_PATH")
    default = service.service_spec("127.0.0.1", 12434, None, [])
    assert "--models-path" not in default.argv  # the daemon's own default, wherever it runs


def test_secrets_are_refused_with_a_place_to_put_them(home: Path, tmp_path: Path) -> None:
    env_file = tmp_path / "service.env"
    with pytest.raises(BadRequest) as keys:
        service.parse_env(["DMR_API_KEYS=k1,k2"], env_file=env_file)
    assert "api-keys" in (keys.value.hint or "")
    with pytest.raises(BadRequest) as token:
        service.parse_env(["HF_TOKEN=hf_x"], env_file=env_file)
    assert str(env_file) in (token.value.hint or "")
    with pytest.raises(BadRequest) as mac:
        service.parse_env(["MY_PASSWORD=x"], env_file=None)
    assert "MY_PASSWORD" in mac.value.message
    with pytest.raises(BadRequest, match="expected NAME=VALUE"):
        service.parse_env(["1BAD=x"], env_file=env_file)
    with pytest.raises(BadRequest, match="expected NAME=VALUE"):
        service.parse_env(["NOVALUE"], env_file=env_file)
    assert service.parse_env(["DMR_API_KEYS_FILE=/k", "A=b=c", "E="], env_file=env_file) == [
        ("DMR_API_KEYS_FILE", "/k"),
        ("A", "b=c"),
        ("E", ""),
    ]


def test_unprintable_values_and_quoted_program_paths_are_refused(tmp_path: Path) -> None:
    spec = ServiceSpec(("/usr/bin/python3", "-m", "dmr_cli"), (("A", "x\ny"),), tmp_path)
    with pytest.raises(BadRequest, match="line break"):
        service.systemd_unit(spec, tmp_path / "env")
    quoted = ServiceSpec(('/opt/it"s/python', "-m", "dmr_cli"), (), tmp_path)
    with pytest.raises(BadRequest, match="quotes or backslashes"):
        service.systemd_unit(quoted, tmp_path / "env")


# -- systemctl through the runner seam ----------------------------------------------------

NOT_FOUND = "LoadState=not-found\nActiveState=inactive\nSubState=dead\nUnitFileState=\nMainPID=0\n"
RUNNING = (
    "LoadState=loaded\nActiveState=active\nSubState=running\nUnitFileState=enabled\nMainPID=4242\n"
)
NO_BUS = "Failed to connect to bus: No medium found\n"


class FakeSystemctl:
    """Answers `systemctl --user ...` as systemd 252 does, and records what each call saw."""

    def __init__(self, unit: Path, answers: dict[str, CommandResult] | None = None) -> None:
        self.unit = unit
        self.answers = answers or {}
        self.calls: list[tuple[list[str], bool]] = []  # (argv, did the unit file exist)

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        self.calls.append((list(argv), self.unit.is_file()))
        assert argv[:2] == ["systemctl", "--user"]
        verb = argv[2]
        if verb in self.answers:
            return self.answers[verb]
        if verb == "show" and "dmr.service" in argv:
            return CommandResult(0, RUNNING if self.unit.is_file() else NOT_FOUND, "")
        if verb == "show":
            return CommandResult(0, "Version=252.39-1~deb12u2\n", "")
        return CommandResult(0, "", "")

    @property
    def verbs(self) -> list[str]:
        return [" ".join(argv[2:]) for argv, _ in self.calls]


@pytest.fixture
def units(tmp_path: Path) -> Path:
    return tmp_path / "config" / "systemd" / "user"


def test_install_writes_the_unit_then_reloads_enables_and_restarts(
    home: Path, units: Path, tmp_path: Path
) -> None:
    fake = FakeSystemctl(units / "dmr.service")
    manager = SystemdUserService(fake, units, tmp_path / "service.env")
    spec = service.service_spec("127.0.0.1", 12434, None, [])
    manager.install(spec)
    assert manager.path.read_text() == service.systemd_unit(spec, tmp_path / "service.env")
    assert fake.verbs == [
        "show --property=Version",
        "daemon-reload",
        "enable dmr.service",
        "restart dmr.service",
    ]
    assert [existed for _, existed in fake.calls] == [False, True, True, True]
    state = manager.status()
    assert state.to_json() == {
        "manager": "systemd",
        "name": "dmr.service",
        "path": str(units / "dmr.service"),
        "installed": True,
        "enabled": True,
        "active": True,
        "state": "active (running)",
        "pid": 4242,
    }


def test_uninstall_disables_and_removes_the_unit(home: Path, units: Path, tmp_path: Path) -> None:
    fake = FakeSystemctl(units / "dmr.service")
    manager = SystemdUserService(fake, units, tmp_path / "service.env")
    manager.install(service.service_spec("127.0.0.1", 12434, None, []))
    fake.calls.clear()
    assert manager.uninstall() is True
    assert not manager.path.exists()
    assert fake.verbs == ["disable --now dmr.service", "daemon-reload", "reset-failed dmr.service"]
    assert [existed for _, existed in fake.calls] == [True, False, False]
    fake.calls.clear()
    assert manager.uninstall() is False
    assert fake.calls == []
    state = manager.status()
    assert (state.installed, state.enabled, state.active, state.pid) == (False, False, False, None)
    assert state.state == "inactive (dead)"


def test_no_user_bus_is_reported_before_anything_is_written(home: Path, units: Path) -> None:
    fake = FakeSystemctl(units / "dmr.service", {"show": CommandResult(1, "", NO_BUS)})
    manager = SystemdUserService(fake, units, units / "service.env")
    with pytest.raises(DmrError) as failure:
        manager.install(service.service_spec("127.0.0.1", 12434, None, []))
    assert "Failed to connect to bus: No medium found" in failure.value.message
    assert "loginctl enable-linger" in (failure.value.hint or "")
    assert not manager.path.exists()
    assert fake.verbs == ["show --property=Version"]


def test_a_failed_start_points_to_the_logs_and_keeps_the_unit(home: Path, units: Path) -> None:
    failed = CommandResult(
        1,
        "",
        "Job for dmr.service failed because the control process exited with error code.\n"
        'See "systemctl --user status dmr.service" and "journalctl --user -xeu dmr.service"'
        " for details.\n",
    )
    fake = FakeSystemctl(units / "dmr.service", {"restart": failed})
    manager = SystemdUserService(fake, units, units / "service.env")
    with pytest.raises(DmrError) as failure:
        manager.install(service.service_spec("127.0.0.1", 12434, None, []))
    assert "systemctl --user restart dmr.service` failed (exit 1)" in failure.value.message
    assert "Job for dmr.service failed" in failure.value.message
    assert "journalctl --user -u dmr.service" in (failure.value.hint or "")
    assert manager.path.is_file()


def test_missing_systemctl_is_explained(
    home: Path, units: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = SystemdUserService(service.run_command, units, units / "service.env")
    monkeypatch.setenv("PATH", str(units))
    with pytest.raises(DmrError, match="systemctl not found"):
        manager.status()


# -- the real systemctl on this machine ----------------------------------------------------


def _user_bus() -> bool:
    """Whether this machine has a systemd user instance to talk to."""
    try:
        probe = subprocess.run(
            ["systemctl", "--user", "show", "--property=Version"], capture_output=True, text=True
        )
    except FileNotFoundError:
        return False
    return probe.returncode == 0


def test_real_systemctl_status(home: Path) -> None:
    manager = SystemdUserService()  # the real runner
    if _user_bus():
        state = manager.status()  # read-only: a real user instance is left alone
        assert state.installed == manager.path.is_file()
    else:
        with pytest.raises(DmrError) as failure:
            manager.status()
        assert failure.value.message.startswith("cannot reach your systemd user instance")
        assert "Failed to connect to bus" in failure.value.message


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dmr_cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.skipif(_user_bus(), reason="installs for real where a user bus exists")
def test_cli_install_without_a_user_bus_fails_cleanly(tmp_path: Path) -> None:
    env = isolated_env(tmp_path / "home")
    result = run_cli("service", "install", env=env)
    assert result.returncode == 1
    assert "Error: cannot reach your systemd user instance" in result.stderr
    assert "Hint: `systemctl --user` needs a login session" in result.stderr
    assert not (tmp_path / "home" / ".config" / "systemd").exists()
    status = run_cli("service", "status", "--json", env=env)
    assert status.returncode == 1
    assert "Failed to connect to bus" in status.stderr


def test_cli_dry_run_prints_a_unit_that_verifies(tmp_path: Path) -> None:
    env = isolated_env(tmp_path / "home")
    result = run_cli(
        "service", "install", "--dry-run", "--port", "23456", "-e", "LOG_LEVEL=debug", env=env
    )
    assert result.returncode == 0, result.stderr
    unit = dict(sections(result.stdout)["Service"])
    argv = exec_argv(unit["ExecStart"])
    # This shell's store goes along: the service manager would not pass MODELS_PATH on.
    store = ["--models-path", env["MODELS_PATH"]]
    assert argv[1:] == ["-m", "dmr_cli", "serve", "--host", "127.0.0.1", "--port", "23456", *store]
    checked = verify(result.stdout, tmp_path)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")
    assert not (tmp_path / "home" / ".config" / "systemd").exists()
    refused = run_cli("service", "install", "--dry-run", "-e", "HF_TOKEN=hf_x", env=env)
    assert refused.returncode == 1
    assert "hf_x" not in refused.stdout + refused.stderr
    bad_host = run_cli("service", "install", "--dry-run", "--host", "a b", env=env)
    assert bad_host.returncode == 2


# -- launchd through the runner seam -------------------------------------------------------


def test_plist_keeps_paths_whole_and_restarts_on_failure(home: Path, tmp_path: Path) -> None:
    spec = service.service_spec("127.0.0.1", 12434, tmp_path / "my models", [("LOG_LEVEL", "x")])
    agent = plistlib.loads(service.launchd_plist(spec))
    from dmr_cli import config

    assert agent["Label"] == "dmr-cli.serve"
    assert agent["ProgramArguments"] == list(spec.argv)
    assert agent["ProgramArguments"][-2:] == ["--models-path", str(tmp_path / "my models")]
    assert agent["EnvironmentVariables"]["MODEL_RUNNER_LOG_DIR"] == str(config.log_dir())
    assert agent["EnvironmentVariables"]["LOG_LEVEL"] == "x"
    assert agent["RunAtLoad"] is True
    assert agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["StandardOutPath"] == agent["StandardErrorPath"]
    assert Path(agent["StandardErrorPath"]).parent == config.log_dir()


def test_an_explicit_log_dir_wins_everywhere(home: Path, tmp_path: Path) -> None:
    logs = tmp_path / "my logs"
    spec = service.service_spec("127.0.0.1", 12434, None, [("MODEL_RUNNER_LOG_DIR", str(logs))])
    assert dict(spec.environment)["MODEL_RUNNER_LOG_DIR"] == str(logs)
    agent = plistlib.loads(service.launchd_plist(spec))
    assert agent["StandardOutPath"] == str(logs / "daemon.log")


LAUNCHCTL_PRINT = """gui/501/dmr-cli.serve = {
\tactive count = 1
\tpath = /Users/me/Library/LaunchAgents/dmr-cli.serve.plist
\ttype = LaunchAgent
\tstate = running

\tprogram = /usr/bin/python3
\tpid = 777
}
"""


class FakeLaunchctl:
    """Answers launchctl as macOS 14 does for a GUI domain."""

    def __init__(self) -> None:
        self.loaded = False
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        self.calls.append(list(argv))
        verb = argv[1]
        if verb == "bootstrap":
            self.loaded = True
        elif verb == "bootout":
            if not self.loaded:
                return CommandResult(3, "", "Boot-out failed: 3: No such process\n")
            self.loaded = False
        elif verb == "print":
            if not self.loaded:
                return CommandResult(
                    113, "", 'Could not find service "dmr-cli.serve" in domain for user gui: 501\n'
                )
            return CommandResult(0, LAUNCHCTL_PRINT, "")
        elif verb == "print-disabled":
            return CommandResult(0, 'disabled services = {\n\t"com.other" => disabled\n}\n', "")
        return CommandResult(0, "", "")


def test_launch_agent_install_status_uninstall(home: Path, tmp_path: Path) -> None:
    fake = FakeLaunchctl()
    agent = LaunchAgent(fake, tmp_path / "LaunchAgents", uid=501)
    spec = service.service_spec("127.0.0.1", 12434, None, [])
    agent.install(spec)
    assert agent.path == tmp_path / "LaunchAgents" / "dmr-cli.serve.plist"
    assert agent.path.read_bytes() == service.launchd_plist(spec)
    assert fake.calls == [
        ["launchctl", "bootout", "gui/501/dmr-cli.serve"],
        ["launchctl", "enable", "gui/501/dmr-cli.serve"],
        ["launchctl", "bootstrap", "gui/501", str(agent.path)],
    ]
    state = agent.status()
    assert (state.installed, state.enabled, state.active, state.pid) == (True, True, True, 777)
    assert agent.uninstall() is True
    assert not agent.path.exists()
    assert fake.calls[-1] == ["launchctl", "bootout", "gui/501/dmr-cli.serve"]
    assert agent.uninstall() is False
    state = agent.status()
    assert (state.installed, state.active, state.state) == (False, False, "not loaded")


def test_launch_agent_bootstrap_failure_is_explained(home: Path, tmp_path: Path) -> None:
    def run(argv: Sequence[str]) -> CommandResult:
        if argv[1] == "bootstrap":
            return CommandResult(
                125, "", "Bootstrap failed: 125: Domain does not support specified action\n"
            )
        return CommandResult(0, "", "")

    agent = LaunchAgent(run, tmp_path / "LaunchAgents", uid=501)
    with pytest.raises(DmrError) as failure:
        agent.install(service.service_spec("127.0.0.1", 12434, None, []))
    assert "Domain does not support specified action" in failure.value.message
    assert "GUI login" in (failure.value.hint or "")


# -- the service's command, run the way its manager runs it --------------------------------


@pytest.fixture
def served(home: Path, tmp_path: Path) -> Iterator[tuple[ServiceSpec, int]]:
    """spec.argv with only spec.environment and a login's basics, as systemd starts it:
    none of the shell's DMR_STATE_DIR or XDG_STATE_HOME reach it."""
    port = free_port()
    spec = service.service_spec("127.0.0.1", port, home / "models", [])
    env = {"HOME": str(home / "elsewhere"), "LANG": "C.UTF-8", **dict(spec.environment)}
    process = subprocess.Popen(
        spec.argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, "the service's dmr serve exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as answer:
                    assert answer.read() == b"Docker Model Runner is running"
                    break
            except OSError:
                assert time.monotonic() < deadline, "the service's dmr serve never answered"
                time.sleep(0.05)
        yield spec, port
    finally:
        process.terminate()
        process.wait(30)


def test_the_service_command_serves_and_dmr_logs_finds_its_log(
    home: Path, served: tuple[ServiceSpec, int]
) -> None:
    spec, port = served
    # The default endpoint is this machine's daemon: `dmr logs` reads the log files itself,
    # from the log directory this shell's settings give (no daemon answers there).
    env = dict(os.environ)
    assert "MODEL_RUNNER_HOST" not in env and "MODEL_RUNNER_LOG_DIR" not in env
    result = run_cli("logs", "--no-engines", env=env)
    assert result.returncode == 0, result.stderr
    assert f"serving http://127.0.0.1:{port}" in result.stdout
    assert spec.log_dir == Path(env["DMR_STATE_DIR"]) / "logs"
