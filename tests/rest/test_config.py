"""Configuration precedence (COMPAT §9): flags > CONTREE_* > NEBIUS pair > auth.ini profile > legacy."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from contree.config import (
    DEFAULT_IAM_URL,
    NO_PROJECT,
    NO_TOKEN,
    NO_URL,
    ConfigError,
    Profile,
    load_profiles,
    open_backend,
    resolve_backend_config,
    save_profile,
)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home"), "CONTREE_HOME": str(tmp_path / "cfg")}


def write_auth(env: dict[str, str], text: str) -> None:
    path = Path(env["CONTREE_HOME"]) / "auth.ini"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


AUTH = """
[DEFAULT]
profile = main

[profile:main]
type = iam
token = profile-token
project = profile-project

[profile:legacy]
url = https://contree.example
token = jwt-token
"""


def test_nothing_configured_means_embedded_engine(env: dict[str, str], tmp_path: Path) -> None:
    config = resolve_backend_config({}, env)
    assert config.kind == "local"
    assert config.home == tmp_path / "home" / ".local/share/contree-mcp"
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    assert resolve_backend_config({}, env).home == tmp_path / "data" / "contree-mcp"
    env["CONTREE_ENGINE_HOME"] = str(tmp_path / "eng")
    assert resolve_backend_config({}, env).home == tmp_path / "eng"
    assert resolve_backend_config({"home": str(tmp_path / "flag")}, env).home == tmp_path / "flag"


def test_backend_flag_forces_local_even_with_token(env: dict[str, str]) -> None:
    env["CONTREE_TOKEN"] = "t"
    assert resolve_backend_config({"backend": "local"}, env).kind == "local"
    with pytest.raises(ConfigError, match="--backend"):
        resolve_backend_config({"backend": "cloud"}, env)


def test_profile_is_used_and_its_type_wins(env: dict[str, str]) -> None:
    write_auth(env, AUTH)
    config = resolve_backend_config({"auth_type": "jwt"}, env)
    assert config.kind == "contree" and config.auth_type == "iam"
    assert (config.url, config.token, config.project) == (DEFAULT_IAM_URL, "profile-token", "profile-project")
    assert config.source == "auth.ini profile 'main'"
    legacy = resolve_backend_config({"profile": "legacy"}, env)
    assert legacy.auth_type == "jwt" and legacy.url == "https://contree.example" and legacy.project is None
    env["CONTREE_PROFILE"] = "legacy"
    assert resolve_backend_config({}, env).token == "jwt-token"
    assert resolve_backend_config({"profile": "main"}, env).token == "profile-token"  # flag > env
    with pytest.raises(ConfigError, match="'nope' not found"):
        resolve_backend_config({"profile": "nope"}, env)


def test_field_by_field_precedence(env: dict[str, str]) -> None:
    write_auth(env, AUTH)
    env.update(NEBIUS_API_KEY="nebius-key", NEBIUS_AI_PROJECT="nebius-project")
    config = resolve_backend_config({}, env)
    assert (config.token, config.project) == ("nebius-key", "nebius-project")
    env.update(CONTREE_TOKEN="env-token")
    config = resolve_backend_config({}, env)
    assert (config.token, config.project) == ("env-token", "nebius-project")  # per field
    config = resolve_backend_config(
        {"token": "flag-token", "project": "flag-project", "url": "https://u/"}, env
    )
    assert (config.token, config.project, config.url) == ("flag-token", "flag-project", "https://u")


def test_lone_nebius_key_is_ignored(env: dict[str, str]) -> None:
    env["NEBIUS_API_KEY"] = "ambient"
    assert resolve_backend_config({}, env).kind == "local"
    write_auth(env, AUTH)
    assert resolve_backend_config({}, env).token == "profile-token"


def test_exact_error_texts(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_backend_config({"backend": "contree"}, env)
    assert str(info.value) == NO_TOKEN
    assert NO_TOKEN.startswith("No API token configured. ")
    with pytest.raises(ConfigError) as info:
        resolve_backend_config({"token": "t", "auth_type": "jwt"}, env)
    assert str(info.value) == NO_URL
    with pytest.raises(ConfigError) as info:
        resolve_backend_config({"token": "t"}, env)  # default auth type is iam
    assert str(info.value) == NO_PROJECT
    assert NO_PROJECT.startswith("IAM auth requires a project ID. ")
    jwt = resolve_backend_config({"token": "t", "auth_type": "jwt", "url": "http://127.0.0.1:1"}, env)
    assert jwt.kind == "contree" and jwt.project is None


def test_legacy_settings_are_the_last_fallback(env: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    env["CONTREE_MCP_TOKEN"] = "old-token"
    with caplog.at_level(logging.WARNING, logger="contree.config"):
        config = resolve_backend_config({}, env)
    assert (config.kind, config.token, config.url, config.auth_type) == (
        "contree",
        "old-token",
        "https://contree.dev",
        "jwt",
    )
    assert config.warnings and "deprecated" in config.warnings[0]
    assert "old-token" not in caplog.text
    ini = Path(env["HOME"]) / ".config/contree/mcp.ini"
    ini.parent.mkdir(parents=True)
    ini.write_text("[DEFAULT]\nurl = https://old.example\ntoken = ini-token\n")
    del env["CONTREE_MCP_TOKEN"]
    config = resolve_backend_config({}, env)
    assert (config.token, config.url) == ("ini-token", "https://old.example")
    env["CONTREE_TOKEN"] = "new"
    env["CONTREE_PROJECT"] = "p"
    config = resolve_backend_config({}, env)
    assert config.token == "new" and config.auth_type == "iam" and not config.warnings


def test_secrets_never_in_repr(env: dict[str, str]) -> None:
    config = resolve_backend_config({"token": "s3cret", "project": "p"}, env)
    assert "s3cret" not in repr(config) and "s3cret" not in config.describe()
    assert "s3cret" not in repr(Profile(name="x", token="s3cret"))


def test_save_profile_is_private_and_round_trips(env: dict[str, str]) -> None:
    path = Path(env["CONTREE_HOME"]) / "auth.ini"
    save_profile(path, Profile(name="work", url="https://c.example/", token="tok", auth_type="jwt"))
    save_profile(path, Profile(name="iam", token="t2", project="p", auth_type="iam"), activate=False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    active, profiles = load_profiles(path)
    assert active == "work"
    assert profiles["work"] == Profile(name="work", url="https://c.example", token="tok", auth_type="jwt")
    assert profiles["iam"].project == "p"
    assert list(path.parent.iterdir()) == [path]  # no temp files left behind
    assert resolve_backend_config({}, env).url == "https://c.example"


def test_bad_profile_type_is_reported(env: dict[str, str]) -> None:
    write_auth(env, "[profile:default]\ntype = oauth\ntoken = x\n")
    with pytest.raises(ConfigError, match="iam or jwt"):
        resolve_backend_config({}, env)


async def test_open_backend_builds_a_remote_client(env: dict[str, str]) -> None:
    config = resolve_backend_config({"token": "t", "project": "p", "url": "http://127.0.0.1:9"}, env)
    backend = await open_backend(config)
    try:
        assert repr(backend) == "RemoteBackend('http://127.0.0.1:9/v1')"
    finally:
        await backend.close()


def test_legacy_server_settings(env: dict[str, str], tmp_path: Path) -> None:
    from contree.config import legacy_server_settings

    assert legacy_server_settings(env) == {}
    ini = tmp_path / "old.ini"
    ini.write_text("[DEFAULT]\nmode = http\n[http]\nport = 8000\nlisten = 0.0.0.0\n[cache]\nprune_days = 5\n")
    env.update(CONTREE_MCP_CONFIG=str(ini), CONTREE_MCP_HTTP_PORT="9000")
    assert legacy_server_settings(env) == {
        "mode": "http",
        "http_listen": "0.0.0.0",
        "http_port": "9000",  # env beats the file
        "cache_prune_days": "5",
    }
