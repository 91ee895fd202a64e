"""The CLI resolves its backend with `contree.config` (COMPAT §9): precedence, auth type and exit texts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from contree.config import BackendConfig, resolve_backend_config
from tools.cli import backend_flags, build_parser


def resolve(argv: list[str], env: dict[str, str]) -> BackendConfig:
    return resolve_backend_config(backend_flags(build_parser().parse_args(argv)), env)


def run_cli(argv: list[str], home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), **env},
    )


def test_legacy_token_alone_is_a_jwt_token(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "CONTREE_MCP_TOKEN": "legacy-t", "CONTREE_MCP_URL": "http://127.0.0.1:9"}
    config = resolve([], env)
    assert (config.kind, config.auth_type, config.url) == ("contree", "jwt", "http://127.0.0.1:9")


def test_auth_type_flag_applies_without_a_profile(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    config = resolve(["--token", "t", "--url", "http://127.0.0.1:9", "--auth-type", "jwt"], env)
    assert (config.auth_type, config.project) == ("jwt", None)


def test_unset_auth_type_defaults_to_iam(tmp_path: Path) -> None:
    config = resolve(["--token", "t", "--project", "p"], {"HOME": str(tmp_path)})
    assert (config.auth_type, config.project) == ("iam", "p")
    assert config.url == "https://api.tokenfactory.nebius.com/sandboxes"


def test_profile_type_wins_over_the_auth_type_flag(tmp_path: Path) -> None:
    ini = tmp_path / ".config" / "contree" / "auth.ini"
    ini.parent.mkdir(parents=True)
    ini.write_text("[profile:default]\ntype = jwt\nurl = http://127.0.0.1:9\ntoken = from-profile\n")
    config = resolve(["--auth-type", "iam"], {"HOME": str(tmp_path)})
    assert (config.auth_type, config.token, config.source) == (
        "jwt",
        "from-profile",
        "auth.ini profile 'default'",
    )


def test_missing_token_exits_with_the_compat_text(tmp_path: Path) -> None:
    out = run_cli(["--backend", "contree"], tmp_path)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("No API token configured. Set CONTREE_TOKEN, pass --token")


def test_iam_without_project_exits_with_the_compat_text(tmp_path: Path) -> None:
    out = run_cli(["--token", "t"], tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith("IAM auth requires a project ID.")


def test_jwt_without_url_exits_with_the_compat_text(tmp_path: Path) -> None:
    out = run_cli(["--token", "t", "--auth-type", "jwt"], tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith("No API URL configured.")


# --- engine home: --home > $CONTREE_ENGINE_HOME > $XDG_DATA_HOME/contree-mcp; CONTREE_HOME is auth.ini's


def test_server_engine_home_ignores_contree_home(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "CONTREE_HOME": str(tmp_path / "cli"), "XDG_DATA_HOME": str(tmp_path / "d")}
    assert resolve([], env).home == tmp_path / "d" / "contree-mcp"
    assert resolve([], {**env, "CONTREE_ENGINE_HOME": str(tmp_path / "e")}).home == tmp_path / "e"
    assert resolve(["--home", str(tmp_path / "f")], env).home == tmp_path / "f"


def test_engine_check_uses_contree_engine_home(tmp_path: Path) -> None:
    out = run_cli(
        ["engine", "check"],
        tmp_path,
        CONTREE_HOME=str(tmp_path / "cli"),
        CONTREE_ENGINE_HOME=str(tmp_path / "engine"),
    )
    # Ready (root here) with no store yet: the home it looked at is named, and that is no failure.
    assert out.returncode == 0 and f"no engine store at {tmp_path / 'engine'} yet" in out.stdout


def test_engine_check_defaults_to_xdg_data_home(tmp_path: Path) -> None:
    out = run_cli(
        ["engine", "check"], tmp_path, CONTREE_HOME=str(tmp_path / "cli"), XDG_DATA_HOME=str(tmp_path / "d")
    )
    assert f"no engine store at {tmp_path / 'd' / 'contree-mcp'} yet" in out.stdout


def test_bootstrap_default_home_is_the_engine_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from contree.config import default_home

    monkeypatch.setenv("CONTREE_HOME", str(tmp_path / "cli"))
    monkeypatch.delenv("CONTREE_ENGINE_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "d"))
    assert default_home() == tmp_path / "d" / "contree-mcp"
    monkeypatch.setenv("CONTREE_ENGINE_HOME", str(tmp_path / "e"))
    assert default_home() == tmp_path / "e"


@pytest.mark.parametrize("words", [[], ["images", "bootstrap"], ["engine", "check"], ["serve-api"]])
def test_help_texts_name_the_engine_home_variable(tmp_path: Path, words: list[str]) -> None:
    out = run_cli([*words, "--help"], tmp_path)
    text = " ".join(out.stdout.split())  # argparse wraps help lines
    assert out.returncode == 0 and "$CONTREE_ENGINE_HOME" in text and "$CONTREE_HOME" not in text
    assert "$XDG_DATA_HOME/contree-mcp" in text


async def test_docs_site_names_the_engine_home_default(tmp_path: Path) -> None:
    from tests.tools.fakes import FakeBackend, make_registry
    from tools.site.docs_site import setup_body

    _, state = make_registry(FakeBackend(), tmp_path)
    body = setup_body(state, "127.0.0.1", 9452, False)
    assert "$CONTREE_ENGINE_HOME" in body and "$XDG_DATA_HOME/contree-mcp" in body
    await state.close()


# --- 0.1.x server settings (COMPAT §9.4): lowest-precedence defaults with a deprecation warning


def test_legacy_env_settings_become_defaults(tmp_path: Path) -> None:
    from tools.cli import legacy_defaults

    parser = build_parser()
    env = {"HOME": str(tmp_path), "CONTREE_MCP_MODE": "HTTP", "CONTREE_MCP_HTTP_PORT": "1234"}
    messages = legacy_defaults(parser, env)
    args = parser.parse_args([])
    assert (args.mode, args.http_port) == ("http", 1234)
    assert messages == [
        "Using deprecated 0.1.x settings (CONTREE_MCP_* / mcp.ini) as defaults for http_port, mode; "
        "pass the command-line flags instead."
    ]


def test_flags_win_over_legacy_settings(tmp_path: Path) -> None:
    from tools.cli import legacy_defaults

    parser = build_parser()
    legacy_defaults(parser, {"HOME": str(tmp_path), "CONTREE_MCP_HTTP_PORT": "1234"})
    assert parser.parse_args(["--http-port", "9999"]).http_port == 9999


def test_legacy_mcp_ini_sections_are_read(tmp_path: Path) -> None:
    from tools.cli import legacy_defaults

    ini = tmp_path / ".config" / "contree" / "mcp.ini"
    ini.parent.mkdir(parents=True)
    ini.write_text("[DEFAULT]\nlog_level = debug\n\n[http]\nlisten = 127.0.0.2\n\n[cache]\nprune_days = 7\n")
    parser = build_parser()
    legacy_defaults(parser, {"HOME": str(tmp_path)})
    args = parser.parse_args([])
    assert (args.log_level, args.http_listen, args.cache_prune_days) == ("debug", "127.0.0.2", 7.0)


def test_an_invalid_legacy_setting_is_ignored_with_a_warning(tmp_path: Path) -> None:
    from tools.cli import legacy_defaults

    parser = build_parser()
    messages = legacy_defaults(parser, {"HOME": str(tmp_path), "CONTREE_MCP_HTTP_PORT": "nine"})
    assert parser.parse_args([]).http_port == 9452
    assert messages[0].startswith("Ignoring the deprecated 0.1.x setting http_port='nine'")


def test_the_server_logs_the_legacy_deprecation_warning(tmp_path: Path) -> None:
    out = run_cli(["--backend", "contree"], tmp_path, CONTREE_MCP_HTTP_PORT="1234")
    assert "[WARNING] Using deprecated 0.1.x settings (CONTREE_MCP_* / mcp.ini)" in out.stderr
    assert out.returncode == 1 and "No API token configured." in out.stderr


@pytest.mark.parametrize(("group", "commands"), [("images", ["bootstrap", "prune"]), ("engine", ["check"])])
def test_command_groups_print_their_own_help(
    group: str, commands: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from tools.cli import main

    assert main([group, "--help"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"usage: contree-mcp {group} ") and "--http-port" not in shown
    assert all(f"\n  {name} " in shown for name in commands)
    assert main([group, "nonsense"]) == 2 and "unknown command 'nonsense'" in capsys.readouterr().err
    assert main([group]) == 2

