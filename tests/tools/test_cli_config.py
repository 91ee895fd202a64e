"""The CLI resolves its backend with `contree.config` (COMPAT §9): precedence, auth type and exit texts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from contree.config import BackendConfig, resolve_backend_config
from tools.cli import backend_flags, build_parser


def resolve(argv: list[str], env: dict[str, str]) -> BackendConfig:
    return resolve_backend_config(backend_flags(build_parser().parse_args(argv)), env)


def run_cli(argv: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
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
