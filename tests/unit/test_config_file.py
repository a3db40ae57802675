"""config.toml: precedence (default < file < environment), errors that name the file and
line, secrets never printed, where each value came from (`dmr configure show --settings`,
`dmr status --json` against a real daemon), and the settings table against the code and
docs/config.md."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import platformdirs
import pytest

from dmr_cli import cli, client, config
from dmr_cli.errors import DmrError
from tests.helpers.daemon import start_daemon

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No setting in the environment; the user config dir under tmp_path."""
    for setting in config.SETTINGS:
        monkeypatch.delenv(setting.env, raising=False)
    monkeypatch.delenv(config.CONFIG_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    config.clear_cache()
    client.endpoint.cache_clear()
    yield tmp_path
    config.clear_cache()
    client.endpoint.cache_clear()


def write_config(home: Path, text: str) -> Path:
    path = home / "config" / "dmr" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(call: object) -> DmrError:
    with pytest.raises(DmrError) as caught:
        assert callable(call)
        call()
    return caught.value


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


# -- precedence -------------------------------------------------------------------------------


def test_default_then_file_then_environment(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.env("DMR_SLOTS") == ""
    assert config.models_path() == Path(platformdirs.user_data_dir("dmr")) / "models"
    config.clear_cache()
    write_config(home, 'slots = 2\nmodels_path = "~/store"\n')
    assert config.env("DMR_SLOTS") == "2"
    assert config.models_path() == Path.home() / "store"
    monkeypatch.setenv("DMR_SLOTS", "3")
    monkeypatch.setenv("MODELS_PATH", "/srv/models")
    assert config.env("DMR_SLOTS") == "3"
    assert config.models_path() == Path("/srv/models")
    monkeypatch.setenv("DMR_SLOTS", " ")  # empty counts as unset: the file's value again
    assert config.env("DMR_SLOTS") == "2"


def test_every_type_as_the_code_reads_it(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(
        home,
        'host = "gpu-box:12434"\ntls = true\nno_auto_start = false\n'
        'origins = ["http://a:1", "http://b:*"]\ninsecure_registries = "r1:5000, r2"\n',
    )
    assert config.runner_host() == "https://gpu-box:12434"
    assert config.env_bool("DMR_NO_AUTO_START") is False
    assert config.env("DMR_ORIGINS") == "http://a:1,http://b:*"
    assert config.insecure_registries() == ["r1:5000", "r2"]
    monkeypatch.setenv("MODEL_RUNNER_TLS", "0")
    monkeypatch.setenv("DMR_NO_AUTO_START", "1")
    assert config.runner_host() == "http://gpu-box:12434"
    assert config.env_bool("DMR_NO_AUTO_START") is True


def test_dmr_config_names_another_file(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_config(home, "slots = 2\n")
    other = home / "other.toml"
    other.write_text("slots = 5\n")
    monkeypatch.setenv("DMR_CONFIG", str(other))
    assert config.env("DMR_SLOTS") == "5"
    monkeypatch.setenv("DMR_CONFIG", str(home / "missing.toml"))
    config.clear_cache()
    assert error_of(lambda: config.env("DMR_SLOTS")).message == (
        f"the config file {home / 'missing.toml'} (DMR_CONFIG) does not exist"
    )


def test_the_file_is_read_once_per_process(home: Path) -> None:
    path = write_config(home, "slots = 2\n")
    assert config.env("DMR_SLOTS") == "2"
    path.write_text("slots = 4\n")
    assert config.env("DMR_SLOTS") == "2"
    config.clear_cache()
    assert config.env("DMR_SLOTS") == "4"


def test_the_file_is_read_only_when_a_setting_is_asked_for(home: Path) -> None:
    write_config(home, "slots = [\n")  # malformed
    code = (
        "import sys; from dmr_cli import config; config.env('NO_COLOR'); "
        "print('tomllib' in sys.modules, end=' '); "
        "\ntry: config.env('DMR_SLOTS')\nexcept Exception as e: print(type(e).__name__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=os.environ, capture_output=True, text=True, check=True
    )
    assert done.stdout == "False DmrError\n"
    # No setting is needed to print help: a broken file does not stop it.
    help_run = subprocess.run(
        [sys.executable, "-m", "dmr_cli", "--help"], env=os.environ, capture_output=True, text=True
    )
    assert help_run.returncode == 0


@pytest.mark.parametrize("xdg", [None, "/xdg", "relative/ignored"])
def test_user_dirs_match_platformdirs(monkeypatch: pytest.MonkeyPatch, xdg: str | None) -> None:
    """config finds them without importing platformdirs: it must agree with it."""
    for kind, (variable, _) in config._XDG.items():
        monkeypatch.delenv(variable, raising=False)
        if xdg is not None:
            monkeypatch.setenv(variable, xdg)
        assert config._user_dir(kind) == Path(getattr(platformdirs, f"user_{kind}_dir")("dmr"))


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message", "hint"),
    [
        ("slots = 2\nmodel_path = '/m'\n", ":2: unknown setting 'model_path'", "'models_path'"),
        ("\n\nDMR_SLOTS = 2\n", ":3: unknown setting 'DMR_SLOTS'", "did you mean 'slots'?"),
        ("[server]\nport = 1\n", ":1: unknown setting 'server'", "docs/config.md"),
        ("slots = 2\nslots = 3\n", ":2:COLUMN: invalid TOML: cannot overwrite a value", None),
        ("port = \n", ":1:COLUMN: invalid TOML: invalid value", None),
        ("\nslots = '2'\n", ":2: slots must be an integer, not a string ('2')", None),
        ("tls = 1\n", ":1: tls must be a boolean (true or false), not an integer (1)", None),
        ("origins = [1]\n", ":1: origins must be an array of strings", None),
        ("origins = ['a,b']\n", ":1: origins: an item holds a comma", None),
        ("models_path = ' '\n", ":1: models_path is empty", "remove the line"),
    ],
)
def test_errors_name_the_file_and_line(
    home: Path, text: str, message: str, hint: str | None
) -> None:
    path = write_config(home, text)
    error = error_of(lambda: config.env("DMR_SLOTS"))
    # tomllib and tomli may differ on the column
    expected = re.escape(f"{path}{message}").replace("COLUMN", r"\d+")
    assert re.match(expected, error.message), error.message
    if hint is None:
        assert error.hint is None
    else:
        assert error.hint is not None and hint in error.hint
    assert error_of(lambda: config.env("LOG_LEVEL")) is error  # found once, raised every time


def test_a_secret_of_the_wrong_type_is_not_echoed(home: Path) -> None:
    path = write_config(home, "\napi_keys = 12345678\n")
    error = error_of(lambda: config.env("DMR_API_KEYS"))
    assert error.message == (
        f"{path}:2: api_keys must be an array of strings (or a comma list in a string), "
        "not an integer"
    )


def test_a_broken_file_fails_commands_with_the_message(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(home, "sltos = 2\n")
    assert run(capsys, "configure", "show", "--settings") == (
        1,
        "",
        f"Error: {path}:1: unknown setting 'sltos'\nHint: did you mean 'slots'?\n",
    )


# -- where each value came from ----------------------------------------------------------------


def test_configure_show_settings_says_where_each_value_came_from(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(
        home, 'slots = 2\napi_keys = ["sk-file-1", "sk-file-2"]\nno_auto_start = true\n'
    )
    monkeypatch.setenv("LOG_LEVEL", "debug")
    monkeypatch.setenv("HF_TOKEN", "hf_envsecret")
    code, out, err = run(capsys, "configure", "show", "--settings")
    assert (code, err) == (0, "")
    assert out.startswith('{\n  "file": ')  # 2-space JSON, as `configure show`
    shown = json.loads(out)
    assert shown["file"] == str(path)
    settings = shown["settings"]
    in_file = f"config file {path}"
    assert settings["slots"] == {"value": 2, "source": in_file, "env": "DMR_SLOTS"}
    assert settings["no_auto_start"] == {
        "value": True,
        "source": in_file,
        "env": "DMR_NO_AUTO_START",
    }
    assert settings["api_keys"] == {"value": "(set)", "source": in_file, "env": "DMR_API_KEYS"}
    assert settings["log_level"] == {"value": "debug", "source": "environment", "env": "LOG_LEVEL"}
    assert settings["hf_token"]["value"] == "(set)"
    assert settings["port"] == {"value": 12434, "source": "default", "env": "MODEL_RUNNER_PORT"}
    assert settings["models_path"]["value"] == str(config.models_path())
    assert "tls" not in settings  # off, and set nowhere
    assert "sk-file" not in out and "hf_envsecret" not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["configure", "show", "ai/x", "--settings"], "takes one optional MODEL, or --settings"),
        (["configure", "ai/x", "--settings"], "only goes with show"),
    ],
)
def test_settings_goes_with_show_alone(
    home: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = run(capsys, *args)
    assert (code, out) == (2, "")
    assert message in err


def test_status_json_reports_the_sources_of_a_real_daemons_cli(tmp_path: Path) -> None:
    """The daemon applies the file (its slots), and `dmr status --json` reports each
    setting's source."""
    home = tmp_path / "home"
    path = home / ".config" / "dmr" / "config.toml"  # under isolated_env's XDG_CONFIG_HOME
    path.parent.mkdir(parents=True)
    path.write_text('slots = 2\nlog_level = "debug"\nhf_token = "hf_filesecret"\n')
    daemon = start_daemon(home)
    try:
        with urllib.request.urlopen(daemon.url + "/engines/runtime", timeout=10) as response:
            assert json.load(response)["slots"] == 2
        done = daemon.cli("status", "--json", LOG_LEVEL="warn")
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout)
        assert status["running"] is True
        settings = status["config"]["settings"]
        assert status["config"]["file"] == str(path)
        assert settings["slots"]["source"] == f"config file {path}"
        assert settings["log_level"] == {
            "value": "warn",
            "source": "environment",
            "env": "LOG_LEVEL",
        }
        assert settings["hf_token"] == {
            "value": "(set)",
            "source": f"config file {path}",
            "env": "HF_TOKEN",
        }
        assert settings["host"] == {
            "value": daemon.url,
            "source": "environment",
            "env": "MODEL_RUNNER_HOST",
        }
        assert settings["gpu"] == {"value": "auto", "source": "default", "env": "DMR_GPU"}
        assert "hf_filesecret" not in done.stdout
    finally:
        daemon.stop()


# -- the table, the code and the docs --------------------------------------------------------


# Read through config.env for its trimming, but conventions of every terminal program rather
# than dmr settings.
NOT_SETTINGS = {"NO_COLOR", "TERM"}


def test_every_setting_the_code_reads_is_in_the_table() -> None:
    pattern = re.compile(r"\b(?:env|env_bool)\(\s*\"([A-Z][A-Z0-9_]*)\"")
    read = {
        name
        for source in (ROOT / "dmr_cli").rglob("*.py")
        for name in pattern.findall(source.read_text())
    }
    assert read - NOT_SETTINGS - set(config.BY_ENV) == set()
    assert read - NOT_SETTINGS  # the pattern finds the reads


def test_the_table_is_consistent() -> None:
    assert len(config.BY_ENV) == len(config.BY_KEY) == len(config.SETTINGS)
    for s in config.SETTINGS:
        assert s.key == s.key.lower() and s.key.isidentifier()
        assert s.kind in ("str", "path", "int", "bool", "list")
        assert s.description.endswith(".")
    assert config.BY_ENV["MODEL_RUNNER_PORT"].default == str(config.DEFAULT_PORT)
    assert config.BY_ENV["MODEL_RUNNER_HOST"].default == config.DEFAULT_HOST


def test_docs_config_md_documents_every_setting_and_is_current() -> None:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    doc = (ROOT / "docs" / "config.md").read_text()
    for s in config.SETTINGS:
        assert f"| `{s.env}` | `{s.key}` |" in doc, f"{s.env} is not documented in docs/config.md"
    assert gen.config_doc() == {gen.CONFIG_DOC: doc}, "run: python scripts/gen_docs.py"
