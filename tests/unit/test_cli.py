from __future__ import annotations

import asyncio
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from qwen_gateway.cli import cli
from qwen_gateway.errors import AuthenticationError, StartupError
from qwen_gateway.service.keys import KeyService
from qwen_gateway.settings import Settings
from qwen_gateway.store.db import Store
from qwen_gateway.store.keys import KeyRow


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("QWEN_GATEWAY_"):
            monkeypatch.delenv(name)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def authenticate(home: Path, raw_key: str) -> KeyRow:
    async def main() -> KeyRow:
        async with await Store.open(Settings.load(overrides={"home": home}).resolved_database_url) as store:
            return await KeyService(store, cache_ttl=0).authenticate(raw_key)

    return asyncio.run(main())


def create(home: Path, name: str) -> tuple[str, str]:
    result = invoke("keys", "create", "--name", name, "--home", str(home))
    assert result.exit_code == 0, result.output
    match = re.search(r"Created key '(.+)' \(id (key_[0-9a-f]{12})\)\n(sk-[0-9a-f]{32})\n", result.stdout)
    assert match, result.stdout
    assert match[1] == name
    assert "not be shown again" in result.stderr
    return match[2], match[3]


def test_keys_create_authenticates_and_revoke_stops_it(home: Path) -> None:
    key_id, raw = create(home, "alice")
    assert (home / "gateway.db").is_file()
    row = authenticate(home, raw)
    assert (row.id, row.name) == (key_id, "alice")

    result = invoke("keys", "revoke", "alice", "--home", str(home))
    assert result.exit_code == 0
    assert f"Revoked key 'alice' (id {key_id})" in result.stdout
    with pytest.raises(AuthenticationError):
        authenticate(home, raw)

    again = invoke("keys", "revoke", key_id, "--home", str(home))
    assert again.exit_code == 0
    assert "already revoked" in again.stdout


def test_keys_revoke_by_id(home: Path) -> None:
    key_id, raw = create(home, "bob")
    assert invoke("keys", "revoke", key_id, "--home", str(home)).exit_code == 0
    with pytest.raises(AuthenticationError):
        authenticate(home, raw)


def test_keys_list_shows_metadata_never_secrets(home: Path) -> None:
    empty = invoke("keys", "list", "--home", str(home))
    assert empty.exit_code == 0
    assert "No API keys yet" in empty.stdout

    alice_id, alice_key = create(home, "alice")
    bob_id, _ = create(home, "bob")
    invoke("keys", "revoke", "bob", "--home", str(home))
    result = invoke("keys", "list", "--home", str(home))
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "NAME", "PREFIX"]
    alice_line = next(line for line in lines if alice_id in line)
    bob_line = next(line for line in lines if bob_id in line)
    assert "alice" in alice_line and alice_key[:8] in alice_line and "active" in alice_line
    assert "bob" in bob_line and "revoked" in bob_line
    assert alice_key not in result.stdout
    assert authenticate(home, alice_key).key_hash not in result.stdout


def test_duplicate_and_unknown_keys_are_one_line_errors(home: Path) -> None:
    create(home, "alice")
    duplicate = invoke("keys", "create", "--name", "alice", "--home", str(home))
    assert duplicate.exit_code == 1
    assert duplicate.stderr == "error: an API key named 'alice' already exists\n"
    assert "sk-" not in duplicate.stdout

    unknown = invoke("keys", "revoke", "nobody", "--home", str(home))
    assert unknown.exit_code == 1
    assert unknown.stderr.startswith("error: no API key with name or id 'nobody'")
    assert unknown.stderr.count("\n") == 1


def test_keys_use_the_database_of_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    db = tmp_path / "elsewhere" / "keys.db"
    config.write_text(f'[server]\ndatabase_url = "sqlite+aiosqlite:///{db}"\n')
    result = invoke("keys", "create", "--name", "ci", "--config", str(config), "--home", str(tmp_path / "h"))
    assert result.exit_code == 0, result.output
    assert db.is_file()
    assert not (tmp_path / "h" / "gateway.db").exists()


def test_home_comes_from_the_environment(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_GATEWAY_HOME", str(home))
    result = invoke("keys", "create", "--name", "env")
    assert result.exit_code == 0, result.output
    assert (home / "gateway.db").is_file()


@pytest.fixture
def fake_runtime(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Stands in for ``qwen_gateway.server`` (the real server) and the port binding before it
    (tests/e2e/test_edge.py binds for real), and records the call."""
    seen: dict[str, Any] = {}
    module = types.ModuleType("qwen_gateway.server")
    monkeypatch.setattr("qwen_gateway.listen.bind", lambda host, port: [])

    async def serve(settings: Settings, sockets: list[Any] | None = None) -> None:
        seen["settings"] = settings
        behaviour = seen.get("raise")
        if behaviour is not None:
            raise behaviour

    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "qwen_gateway.server", module)
    return seen


def test_serve_builds_settings_from_flags_and_config(
    tmp_path: Path, home: Path, fake_runtime: dict[str, Any]
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[server]\nport = 9000\nhost = "0.0.0.0"\n\n[[models]]\nid = "qwen-plus"\npath = "/m/a"\n'
    )
    result = invoke(
        "serve", "--config", str(config), "--home", str(home), "--port", "8123",
        "--model", "qwen3-8b=/m/b", "--log-level", "debug",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    settings: Settings = fake_runtime["settings"]
    assert settings.home == home
    assert settings.port == 8123  # the flag beats the file
    assert settings.host == "0.0.0.0"  # the file beats the default
    assert settings.log_level == "debug"
    assert [(m.id, m.path) for m in settings.models] == [("qwen-plus", "/m/a"), ("qwen3-8b", "/m/b")]


def test_serve_defaults(home: Path, fake_runtime: dict[str, Any]) -> None:
    assert invoke("serve", "--home", str(home)).exit_code == 0
    settings: Settings = fake_runtime["settings"]
    assert (settings.host, settings.port, settings.models) == ("127.0.0.1", 8000, ())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "foo"], "error: --model expects ID=PATH, got 'foo'"),
        (["--model", "=path"], "error: --model expects ID=PATH, got '=path'"),
        (
            ["--config", "/nonexistent/gateway.toml"],
            "error: config file not found: /nonexistent/gateway.toml",
        ),
        (["--port", "70000"], "error: invalid setting port:"),
    ],
)
def test_serve_startup_errors_are_one_line(
    home: Path, fake_runtime: dict[str, Any], args: list[str], message: str
) -> None:
    result = invoke("serve", "--home", str(home), *args)
    assert result.exit_code == 1
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output
    assert "settings" not in fake_runtime  # the server never started


def test_a_bad_toml_file_is_one_line(tmp_path: Path, home: Path, fake_runtime: dict[str, Any]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[[models]\nid = \n")
    result = invoke("serve", "--home", str(home), "--config", str(config))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: config file")
    assert result.stderr.count("\n") == 1


def test_a_startup_error_from_the_server_is_one_line(home: Path, fake_runtime: dict[str, Any]) -> None:
    fake_runtime["raise"] = StartupError("cannot load /m/x: no such checkpoint\n(details)")
    result = invoke("serve", "--home", str(home))
    assert result.exit_code == 1
    assert result.stderr == "error: cannot load /m/x: no such checkpoint (details)\n"


def test_ctrl_c_exits_quietly(home: Path, fake_runtime: dict[str, Any]) -> None:
    fake_runtime["raise"] = KeyboardInterrupt()
    result = invoke("serve", "--home", str(home))
    assert result.exit_code == 0
    assert result.output == ""


def test_help_and_version() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert "serve" in result.stdout and "keys" in result.stdout
    serve_help = invoke("serve", "--help").stdout
    for flag in ("--host", "--port", "--model", "--home", "--config", "--log-level"):
        assert flag in serve_help
    assert invoke("--version").stdout.startswith("qwen-gateway, version ")


def test_keys_list_shows_names_literally(home: Path) -> None:
    for name in ("[/]", "[bold red]x"):
        assert invoke("keys", "create", "--name", name, "--home", str(home)).exit_code == 0
    result = invoke("keys", "list", "--home", str(home))
    assert result.exit_code == 0, result.output
    assert "[/]" in result.output and "[bold red]x" in result.output


def test_admin_key_create_list_revoke(home: Path) -> None:
    created = invoke("admin-key", "create", "--name", "ops", "--home", str(home))
    assert created.exit_code == 0, created.output
    raw = re.search(r"qgw-admin-[0-9a-f]{32}", created.output)
    assert raw, created.output
    listed = invoke("admin-key", "list", "--home", str(home))
    assert "ops" in listed.output and raw.group(0)[14:] not in listed.output
    again = invoke("admin-key", "create", "--name", "ops", "--home", str(home))
    assert again.exit_code == 1 and "already exists" in again.output
    assert invoke("admin-key", "revoke", "ops", "--home", str(home)).exit_code == 0
    assert "revoked" in invoke("admin-key", "list", "--home", str(home)).output
    missing = invoke("admin-key", "revoke", "nobody", "--home", str(home))
    assert missing.exit_code == 1 and "no admin key" in missing.output


def test_database_url_flag_picks_the_database(tmp_path: Path, home: Path) -> None:
    other = tmp_path / "elsewhere" / "g.db"
    url = f"sqlite:///{other}"
    assert (
        invoke("keys", "create", "--name", "far", "--home", str(home), "--database-url", url).exit_code == 0
    )
    assert other.is_file() and not (home / "gateway.db").exists()
    assert "far" in invoke("keys", "list", "--database-url", url).output
    assert "far" not in invoke("keys", "list", "--home", str(home)).output
