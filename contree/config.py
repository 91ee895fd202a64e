"""Backend configuration shared by the MCP server and the API client (COMPAT §9).

`resolve_backend_config(flags, env)` decides between the embedded engine and a Contree API and, for the
latter, resolves every field separately with this precedence (highest first):

1. CLI flags (`--token`, `--project`, `--url`, `--profile`, `--auth-type`);
2. `CONTREE_TOKEN` / `CONTREE_PROJECT` / `CONTREE_URL`;
3. `NEBIUS_API_KEY` + `NEBIUS_AI_PROJECT`, only when both are set (a lone ambient key is ignored);
4. the active `auth.ini` profile of the Contree CLI (`--profile` > `CONTREE_PROFILE` > `[DEFAULT] profile`
   > `default`), in `$CONTREE_HOME` (default `$XDG_CONFIG_HOME/contree`);
5. legacy 0.1.x settings, with a deprecation warning, only when nothing above supplies a token:
   `CONTREE_MCP_TOKEN` / `CONTREE_MCP_URL`, then `[DEFAULT] token/url` of `mcp.ini`
   (`$CONTREE_MCP_CONFIG`, default `~/.config/contree/mcp.ini`).

The auth type is the profile's `type` (a profile without one is `jwt`), else `--auth-type`, else `jwt`
when only legacy settings supplied the token, else `iam`. IAM without a URL gets the Nebius endpoint.

The embedded engine is chosen unless `--backend contree`, or a token, URL or profile is configured
somewhere above; `--backend local` forces it. Its state lives in `--home` > `$CONTREE_ENGINE_HOME` >
`$XDG_DATA_HOME/contree-mcp` (default `~/.local/share/contree-mcp`); `CONTREE_HOME` keeps its
Contree-CLI meaning (where `auth.ini` lives).

Tokens never appear in `repr()` or in log lines; files written here are created 0600.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from contree.fsutil import write_private

if TYPE_CHECKING:
    import configparser

    from contree.backend import Backend

log = logging.getLogger("contree.config")

BackendKind = Literal["local", "contree"]
AuthType = Literal["iam", "jwt"]

DEFAULT_IAM_URL = "https://api.tokenfactory.nebius.com/sandboxes"
LEGACY_DEFAULT_URL = "https://contree.dev"
PROFILE_PREFIX = "profile:"

NO_TOKEN = (
    "No API token configured. Set CONTREE_TOKEN, pass --token, or run "
    "`contree auth` (from contree-cli) to write a profile to $XDG_CONFIG_HOME/contree/auth.ini."
)
NO_URL = (
    "No API URL configured. Set CONTREE_URL, pass --url, or set one in $XDG_CONFIG_HOME/contree/auth.ini."
)
NO_PROJECT = "IAM auth requires a project ID. Set CONTREE_PROJECT, pass --project, or run `contree auth`."


class ConfigError(SystemExit):
    """A configuration that cannot work; exits the CLI with the message (like 0.5.0 does)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, repr=False)
class Profile:
    name: str
    url: str | None = None
    token: str | None = None
    project: str | None = None
    auth_type: AuthType = "jwt"

    def __repr__(self) -> str:
        return (
            f"Profile(name={self.name!r}, url={self.url!r}, token={'***' if self.token else None!r}, "
            f"project={self.project!r}, auth_type={self.auth_type!r})"
        )


@dataclass(frozen=True, repr=False)
class BackendConfig:
    kind: BackendKind
    home: Path  # embedded engine state
    config_home: Path  # auth.ini (and the MCP caches under config_home / "mcp")
    url: str | None = None
    token: str | None = None
    project: str | None = None
    auth_type: AuthType = "jwt"
    source: str = "embedded engine"  # where the credentials came from, for one INFO line
    home_given: bool = False  # --home or CONTREE_ENGINE_HOME: that home's engine, never a shared one
    warnings: tuple[str, ...] = field(default=())

    def __repr__(self) -> str:
        return (
            f"BackendConfig(kind={self.kind!r}, url={self.url!r}, token={'***' if self.token else None!r}, "
            f"project={self.project!r}, auth_type={self.auth_type!r}, home={str(self.home)!r}, "
            f"source={self.source!r})"
        )

    def describe(self) -> str:
        """One log line, secrets excluded."""
        if self.kind == "local":
            return f"backend: embedded engine (the engine service of {self.home})"
        project = self.project or "-"
        return f"backend: Contree API {self.url} (auth={self.auth_type}, project={project}; {self.source})"


def config_home(env: Mapping[str, str]) -> Path:
    if env.get("CONTREE_HOME"):
        return Path(env["CONTREE_HOME"]).expanduser()
    return _xdg(env, "XDG_CONFIG_HOME", ".config") / "contree"


def engine_home(env: Mapping[str, str]) -> Path:
    if env.get("CONTREE_ENGINE_HOME"):
        return Path(env["CONTREE_ENGINE_HOME"]).expanduser()
    return _xdg(env, "XDG_DATA_HOME", ".local/share") / "contree-mcp"


def default_home() -> Path:
    """The engine home every entry point uses when none is given (`engine_home` of this process's
    environment); `CONTREE_HOME` is the Contree CLI's auth.ini directory, not this."""
    return engine_home(os.environ)


def _home(env: Mapping[str, str]) -> Path:
    return Path(env["HOME"]) if env.get("HOME") else Path.home()


def _xdg(env: Mapping[str, str], name: str, fallback: str) -> Path:
    value = env.get(name)
    return Path(value).expanduser() if value else _home(env) / fallback


def _read_ini(path: Path) -> configparser.ConfigParser | None:
    try:
        fh = path.open(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    import configparser  # only with a file to read: most starts of the MCP server have none

    parser = configparser.ConfigParser(interpolation=None)
    with fh:
        try:
            parser.read_file(fh)
        except (OSError, UnicodeDecodeError, configparser.Error) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
    return parser


def load_profiles(path: Path) -> tuple[str, dict[str, Profile]]:
    """The `[DEFAULT] profile` name and every `[profile:<name>]` section of an auth.ini."""
    parser = _read_ini(path)
    if parser is None:
        return "default", {}
    profiles: dict[str, Profile] = {}
    for section in parser.sections():
        if not section.startswith(PROFILE_PREFIX):
            continue
        kind = parser.get(section, "type", fallback="jwt").strip().lower()
        if kind not in ("iam", "jwt"):
            raise ConfigError(f"{path}: [{section}] type must be iam or jwt, not {kind!r}")
        name = section[len(PROFILE_PREFIX) :]
        profiles[name] = Profile(
            name=name,
            url=parser.get(section, "url", fallback=None) or None,
            token=parser.get(section, "token", fallback=None) or None,
            project=parser.get(section, "project", fallback=None) or None,
            auth_type="iam" if kind == "iam" else "jwt",
        )
    return parser.defaults().get("profile", "default") or "default", profiles


def save_profile(path: Path, profile: Profile, *, activate: bool = True) -> None:
    """Add or replace one profile in auth.ini, written atomically with mode 0600."""
    import configparser

    parser = _read_ini(path) or configparser.ConfigParser(interpolation=None)
    section = PROFILE_PREFIX + profile.name
    if parser.has_section(section):
        parser.remove_section(section)
    parser.add_section(section)
    parser.set(section, "type", profile.auth_type)
    if profile.url:
        parser.set(section, "url", profile.url.rstrip("/"))
    if profile.token:
        parser.set(section, "token", profile.token)
    if profile.project:
        parser.set(section, "project", profile.project)
    if activate or "profile" not in parser.defaults():
        parser["DEFAULT"]["profile"] = profile.name
    write_private(path, _ini_text(parser))


def _ini_text(parser: configparser.ConfigParser) -> str:
    import io

    buffer = io.StringIO()
    parser.write(buffer)
    return buffer.getvalue()


def _legacy(env: Mapping[str, str]) -> tuple[str | None, str | None, str | None]:
    """(token, url, where) from the 0.1.x settings, lowest precedence."""
    token = env.get("CONTREE_MCP_TOKEN") or None
    url = env.get("CONTREE_MCP_URL") or None
    where = "CONTREE_MCP_TOKEN/CONTREE_MCP_URL" if token or url else None
    ini_path = Path(
        env.get("CONTREE_MCP_CONFIG") or _home(env) / ".config" / "contree" / "mcp.ini"
    ).expanduser()
    parser = _read_ini(ini_path)
    if parser is not None:
        ini_token = parser.defaults().get("token") or None
        ini_url = parser.defaults().get("url") or None
        if (ini_token and not token) or (ini_url and not url):
            where = f"{where} and {ini_path}" if where else str(ini_path)
        token = token or ini_token
        url = url or ini_url
    return token, url, where


# 0.1.x server settings: (key, env var, mcp.ini section, mcp.ini option)
_LEGACY_SERVER = (
    ("mode", "CONTREE_MCP_MODE", "DEFAULT", "mode"),
    ("log_level", "CONTREE_MCP_LOG_LEVEL", "DEFAULT", "log_level"),
    ("http_listen", "CONTREE_MCP_HTTP_LISTEN", "http", "listen"),
    ("http_port", "CONTREE_MCP_HTTP_PORT", "http", "port"),
    ("cache_files", "CONTREE_MCP_CACHE_FILES", "cache", "files"),
    ("cache_general", "CONTREE_MCP_CACHE_GENERAL", "cache", "general"),
    ("cache_prune_days", "CONTREE_MCP_CACHE_PRUNE_DAYS", "cache", "prune_days"),
)


def legacy_server_settings(env: Mapping[str, str]) -> dict[str, str]:
    """0.1.x server options (`CONTREE_MCP_*` env > `mcp.ini`), for the CLI to use as lowest-precedence
    defaults with a deprecation warning. Keys: mode, log_level, http_listen, http_port, cache_files,
    cache_general, cache_prune_days; only those that are set."""
    parser = _read_ini(_legacy_ini_path(env))
    found: dict[str, str] = {}
    for key, var, section, option in _LEGACY_SERVER:
        value = env.get(var)
        if not value and parser is not None:
            if section == "DEFAULT":
                value = parser.defaults().get(option)
            elif parser.has_section(section):
                value = parser.get(section, option, fallback=None)
        if value:
            found[key] = value
    return found


def _legacy_ini_path(env: Mapping[str, str]) -> Path:
    return Path(env.get("CONTREE_MCP_CONFIG") or _home(env) / ".config" / "contree" / "mcp.ini").expanduser()


def _flag(flags: Mapping[str, Any], name: str) -> str | None:
    value = flags.get(name)
    return str(value) if value not in (None, "") else None


def resolve_backend_config(flags: Mapping[str, Any], env: Mapping[str, str]) -> BackendConfig:
    """Flags are the CLI's parsed values keyed `backend`, `token`, `url`, `project`, `profile`,
    `auth_type`, `home` (missing or None = not given). Raises ConfigError with 0.5.0's messages."""
    backend = _flag(flags, "backend")
    if backend not in (None, "local", "contree"):
        raise ConfigError(f"--backend must be local or contree, not {backend!r}")
    auth_flag = _flag(flags, "auth_type")
    if auth_flag not in (None, "iam", "jwt"):
        raise ConfigError(f"--auth-type must be iam or jwt, not {auth_flag!r}")
    home_flag = _flag(flags, "home")
    home = Path(home_flag).expanduser() if home_flag else engine_home(env)
    home_given = bool(home_flag or env.get("CONTREE_ENGINE_HOME"))
    cfg_home = config_home(env)
    if backend == "local":
        return BackendConfig(kind="local", home=home, config_home=cfg_home, home_given=home_given)

    nebius = bool(env.get("NEBIUS_API_KEY") and env.get("NEBIUS_AI_PROJECT"))
    if env.get("NEBIUS_API_KEY") and not nebius:
        log.info("Ignoring NEBIUS_API_KEY: NEBIUS_AI_PROJECT is not set.")
    active, profiles = load_profiles(cfg_home / "auth.ini")
    profile_name = _flag(flags, "profile") or env.get("CONTREE_PROFILE") or active
    profile = profiles.get(profile_name)
    explicit_profile = _flag(flags, "profile") or env.get("CONTREE_PROFILE")
    if explicit_profile and profile is None:
        raise ConfigError(f"Profile {explicit_profile!r} not found in {cfg_home / 'auth.ini'}.")

    token = (
        _flag(flags, "token")
        or env.get("CONTREE_TOKEN")
        or (env["NEBIUS_API_KEY"] if nebius else None)
        or (profile.token if profile else None)
    )
    project = (
        _flag(flags, "project")
        or env.get("CONTREE_PROJECT")
        or (env["NEBIUS_AI_PROJECT"] if nebius else None)
        or (profile.project if profile else None)
    )
    url = _flag(flags, "url") or env.get("CONTREE_URL") or (profile.url if profile else None)
    configured = bool(
        token or url or (profile is not None and (profile.token or profile.url)) or explicit_profile
    )

    warnings: list[str] = []
    legacy_token, legacy_url, legacy_where = _legacy(env)
    # Legacy settings count only when nothing current supplies a token: mixing a 0.1.x contree.dev URL
    # with a current IAM token would silently talk to the wrong service.
    used_legacy = False
    if not token and legacy_token:
        token, used_legacy = legacy_token, True
        url = url or legacy_url
    if used_legacy:
        warnings.append(
            f"Using deprecated 0.1.x settings from {legacy_where}; move them to auth.ini "
            "(`contree auth`) or CONTREE_TOKEN/CONTREE_URL."
        )
        configured = True

    if backend is None and not configured:
        return BackendConfig(kind="local", home=home, config_home=cfg_home, home_given=home_given)

    auth_type: AuthType
    if profile is not None:
        auth_type = profile.auth_type  # the stored token was issued for that scheme
    elif auth_flag is not None:
        auth_type = "iam" if auth_flag == "iam" else "jwt"
    elif used_legacy and token == legacy_token:
        auth_type = "jwt"
    else:
        auth_type = "iam"
    if not url:
        if auth_type == "iam":
            url = DEFAULT_IAM_URL
        elif used_legacy:
            url = LEGACY_DEFAULT_URL
    if not token:
        raise ConfigError(NO_TOKEN)
    if not url:
        raise ConfigError(NO_URL)
    if auth_type == "iam" and not project:
        raise ConfigError(NO_PROJECT)
    if profile is not None:
        source = f"auth.ini profile {profile.name!r}"
    elif used_legacy:
        source = f"legacy settings ({legacy_where})"
    else:
        source = "explicit env/CLI override"
    for warning in warnings:
        log.warning("%s", warning)
    return BackendConfig(
        kind="contree",
        home=home,
        config_home=cfg_home,
        url=url.rstrip("/"),
        token=token,
        project=project if auth_type == "iam" else None,
        auth_type=auth_type,
        source=source,
        warnings=tuple(warnings),
    )


async def open_backend(
    config: BackendConfig,
    *,
    user_agent: str | None = None,
    import_roots: Sequence[str] | None = None,
    client_name: str = "client",
    engine_options: Sequence[str] = (),
) -> Backend:
    """The configured Backend, ready to use. The embedded engine is the home's engine service, attached
    (and started when nothing answers; `contree.service.starter.EngineStartError` when it cannot start);
    `import_roots` bound the local image sources it reads for us; `engine_options` (`engine serve` flags)
    are passed on to a service this call starts (a running one keeps its own, with a warning). The Contree
    API client connects lazily."""
    if config.kind == "local":
        from contree.service.client import ServiceBackend

        shared = None
        if os.geteuid() != 0 and not config.home_given:  # a user: the machine's shared engine first
            from contree.service import system

            shared = await asyncio.to_thread(system.find, os.environ)
        if shared is not None:
            socket, status = shared
            log.info("using the shared engine service on %s (home %s)", socket, status.home)
            engine = ServiceBackend(Path(status.home), import_roots=import_roots, client_name=client_name,
                                    user_agent=user_agent, socket=socket)
        else:
            engine = ServiceBackend(
                config.home,
                import_roots=import_roots,
                client_name=client_name,
                user_agent=user_agent,
                engine_options=engine_options,
            )
        try:
            await engine.connect()
        except BaseException:
            await engine.close()
            raise
        return engine
    from contree.client import RemoteBackend

    assert config.url is not None
    return RemoteBackend(
        config.url,
        token=config.token,
        project=config.project,
        auth_type=config.auth_type,
        user_agent=user_agent,
    )
