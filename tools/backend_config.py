"""Which backend to serve: the embedded engine unless a Contree token, URL or profile is configured.

Contree settings follow COMPAT §9.3 (flags > CONTREE_* > NEBIUS_API_KEY+NEBIUS_AI_PROJECT > auth.ini
profile); `contree.config.resolve_backend_config` is used when present, this module only decides
*whether* the cloud is configured and where the caches live.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "https://api.tokenfactory.nebius.com/sandboxes"


@dataclass
class RemoteSettings:
    url: str
    token: str
    project: str | None
    auth_type: str


def contree_home(env: Mapping[str, str]) -> Path:
    if env.get("CONTREE_HOME"):
        return Path(env["CONTREE_HOME"]).expanduser()
    xdg = env.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "contree"


def engine_home(env: Mapping[str, str]) -> Path:
    xdg = env.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "contree-mcp"


def _profile(env: Mapping[str, str], name: str | None) -> dict[str, str]:
    path = contree_home(env) / "auth.ini"
    if not path.is_file():
        return {}
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error:
        return {}
    chosen = name or env.get("CONTREE_PROFILE") or parser.defaults().get("profile") or "default"
    section = f"profile:{chosen}"
    if not parser.has_section(section):
        return {}
    return {k: v for k, v in parser.items(section) if k != "profile"}


def remote_configured(flags: Mapping[str, str | None], env: Mapping[str, str]) -> bool:
    if flags.get("token") or flags.get("url") or flags.get("profile"):
        return True
    if env.get("CONTREE_TOKEN") or env.get("CONTREE_URL") or env.get("CONTREE_PROFILE"):
        return True
    if env.get("NEBIUS_API_KEY") and env.get("NEBIUS_AI_PROJECT"):
        return True
    return bool(_profile(env, None).get("token"))


def resolve_remote(flags: Mapping[str, str | None], env: Mapping[str, str]) -> RemoteSettings:
    """Field-by-field precedence of COMPAT §9.3; raises SystemExit with 0.5.0's messages."""
    profile = _profile(env, flags.get("profile"))
    nebius = bool(env.get("NEBIUS_API_KEY") and env.get("NEBIUS_AI_PROJECT"))
    token = flags.get("token") or env.get("CONTREE_TOKEN") or (env["NEBIUS_API_KEY"] if nebius else None)
    token = token or profile.get("token")
    project = (
        flags.get("project") or env.get("CONTREE_PROJECT") or (env["NEBIUS_AI_PROJECT"] if nebius else None)
    )
    project = project or profile.get("project")
    auth_type = profile.get("type") or (flags.get("auth_type") if not profile else "jwt") or "iam"
    url = flags.get("url") or env.get("CONTREE_URL") or profile.get("url")
    if not url and auth_type == "iam":
        url = DEFAULT_URL
    if not token:
        raise SystemExit(
            "No API token configured. Pass --token, set CONTREE_TOKEN or add a profile to auth.ini."
        )
    if not url:
        raise SystemExit(
            "No API URL configured. Pass --url, set CONTREE_URL or set url in the auth.ini profile."
        )
    if auth_type == "iam" and not project:
        raise SystemExit("IAM auth requires a project ID. Pass --project or set CONTREE_PROJECT.")
    return RemoteSettings(url=url, token=token, project=project, auth_type=auth_type)


def environ() -> dict[str, str]:
    return dict(os.environ)
