"""`contree-mcp`: the MCP server (stdio by default) and the engine's helper subcommands."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from contree.config import legacy_server_settings, resolve_backend_config
from contree.config import open_backend as open_configured_backend
from contree.engine.runtime.limits import LimitConfigError
from contree.engine.runtime.limits import add_arguments as add_limit_arguments
from contree.engine.runtime.limits import settings_from as limit_settings
from contree.service.cli import engine_arguments
from contree.units import parse_size
from tools.http_tokens import TokensFileError, load_tokens
from tools.state import DEFAULT_READ_MAX_BYTES
from tools.version import __version__

if TYPE_CHECKING:  # imported when serving only: `contree-mcp --help` and the subcommands start faster
    from contree.backend import Backend
    from protocol.registry import Registry
    from protocol.server import Server
    from tools.state import ServerState

log = logging.getLogger("contree_mcp")

SUBCOMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("serve-api",): ("contree.rest", "main"),
    ("images", "bootstrap"): ("contree.engine.cli", "bootstrap_main"),
    ("images", "publish"): ("tools.commands.publish", "publish_main"),
    ("images", "unpublish"): ("tools.commands.publish", "unpublish_main"),
    ("images", "published"): ("tools.commands.publish", "published_main"),
    ("images", "prune"): ("tools.commands.prune", "prune_main"),
    ("engine", "check"): ("contree.engine.cli", "check_main"),
    ("engine", "serve"): ("contree.service.cli", "serve_main"),
    ("engine", "stop"): ("contree.service.cli", "stop_main"),
    ("engine", "status"): ("contree.service.cli", "status_main"),
    ("engine", "unshare"): ("contree.service.cli", "unshare_main"),
}
# What each command group's own --help lists (the groups are the first words of SUBCOMMANDS).
GROUP_HELP: dict[str, tuple[str, dict[str, str]]] = {
    "images": (
        "Manage the embedded engine's images.",
        {
            "bootstrap": "create the busybox:latest and debian:bookworm base images",
            "prune": "free disk: unused layers, old run output, uploads; untagged images (--untagged)",
            "publish": "share images with every principal of --http-tokens-file servers",
            "unpublish": "stop sharing images published before",
            "published": "list the published images",
        },
    ),
    "engine": (
        "Run and look after the embedded engine.",
        {
            "check": "can this user run the engine here (each missing piece with its fix), then the "
            "store's consistency (exit status 1 when something must be fixed)",
            "serve": "run the home's engine service (what MCP servers start by themselves)",
            "stop": "stop the home's (or a --socket's) engine service",
            "status": "show the home's (or a --socket's) engine service",
            "unshare": "run a command in the rootless engine's user namespace (e.g. rm -rf of a home)",
        },
    ),
}


def group_help(group: str) -> str:
    summary, commands = GROUP_HELP[group]
    width = max(len(name) for name in commands)
    lines = [f"usage: contree-mcp {group} {{{','.join(commands)}}} ...", "", summary, "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in commands.items()]
    lines += ["", f"Run 'contree-mcp {group} <command> --help' for a command's options."]
    return "\n".join(lines)


def run_group(group: str, rest: list[str]) -> int:
    """`contree-mcp images|engine` without a known command: its own help (0 for --help, else 2)."""
    if rest[:1] in (["-h"], ["--help"]):
        print(group_help(group))
        return 0
    what = f"unknown command {rest[0]!r}" if rest else "a command is required"
    print(f"{group_help(group)}\n\ncontree-mcp {group}: error: {what}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="contree-mcp",
        description="MCP server giving AI agents isolated Linux sandboxes with immutable, branchable images. "
        "Subcommands: 'serve-api …' (Contree REST API on the embedded engine), 'images bootstrap …', "
        "'images publish|unpublish|published …' (images shared with every --http-tokens-file principal), "
        "'engine serve|stop|status …' (the engine service every local session shares), 'engine check …' "
        "(readiness), 'engine unshare CMD' (a command in the rootless engine's user namespace).",
    )
    p.add_argument("-V", "--version", action="version", version=f"contree-mcp/{__version__}")
    p.add_argument("--mode", choices=("stdio", "http"), default="stdio", help="transport (default: stdio)")
    p.add_argument("--http-listen", default="127.0.0.1", help="HTTP listen address (default: 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=9452, help="HTTP port (default: 9452)")
    p.add_argument(
        "--http-token",
        default=None,
        help="bearer token HTTP clients must send (env CONTREE_MCP_HTTP_TOKEN); required beyond loopback",
    )
    p.add_argument(
        "--http-tokens-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="one '<principal> <token>' line per HTTP client; each sees only its own operations, "
        "images, tags, directory states, lineage and registry credentials, plus the images the operator "
        "shares (tagged outside this server, or 'contree-mcp images publish')",
    )
    p.set_defaults(http_tokens={})
    p.add_argument(
        "--log-level",
        choices=("critical", "error", "warning", "info", "debug", "notset"),
        default="info",
        help="log level; logs go to stderr (default: info)",
    )
    p.add_argument(
        "--backend",
        choices=("local", "contree"),
        default=None,
        help="local = embedded engine; contree = Contree API (default: contree when a token, URL "
        "or profile is configured, else local)",
    )
    p.add_argument(
        "--home",
        type=Path,
        default=None,
        help="embedded engine state directory (default: $CONTREE_ENGINE_HOME, else "
        "$XDG_DATA_HOME/contree-mcp, i.e. ~/.local/share/contree-mcp)",
    )
    p.add_argument(
        "--allowed-root",
        action="append",
        type=Path,
        default=None,
        metavar="PATH",
        help="host directory rsync/upload may read and download may write (repeatable; "
        "default: the current directory)",
    )
    p.add_argument(
        "--read-max-bytes",
        type=int,
        default=DEFAULT_READ_MAX_BYTES,
        help=f"read_file cap in bytes (default: {DEFAULT_READ_MAX_BYTES})",
    )
    p.add_argument(
        "--output-quota",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="embedded engine: stdout+stderr bytes one run may store, e.g. 512M (default 1G); output beyond "
        "it is counted, not kept, and the result says output_quota_exceeded. An engine setting: applies "
        "when this server starts the home's engine service (contree-mcp engine stop, to change it)",
    )
    p.add_argument("--profile", default=None, help="auth.ini profile (env CONTREE_PROFILE)")
    p.add_argument(
        "--auth-type",
        choices=("iam", "jwt"),
        default=None,  # unset, so a profile's type and legacy (jwt) settings can still decide
        help="Contree auth type (default: iam; a loaded profile's type wins)",
    )
    p.add_argument("--url", default=None, help="Contree API URL (env CONTREE_URL)")
    p.add_argument("--token", default=None, help="Contree API token (env CONTREE_TOKEN)")
    p.add_argument("--project", default=None, help="Nebius project id for IAM auth (env CONTREE_PROJECT)")
    p.add_argument(
        "--cache-files",
        type=Path,
        default=None,
        help="rsync state database (:memory: = keep nothing on disk)",
    )
    p.add_argument(
        "--cache-general", type=Path, default=None, help="lineage database (:memory: = keep nothing on disk)"
    )
    p.add_argument("--cache-prune-days", type=float, default=60.0, help="cache retention by last use (days)")
    p.add_argument(
        "--conformance",
        action="store_true",
        help="serve the MCP conformance fixture server instead (protocol.testing.conformance)",
    )
    add_limit_arguments(p)
    return p


def _choice(*allowed: str) -> Callable[[str], str]:
    def convert(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"use one of {', '.join(allowed)}")
        return value

    return convert


LEGACY_TYPES: dict[str, Callable[[str], Any]] = {
    "mode": _choice("stdio", "http"),
    "log_level": _choice("critical", "error", "warning", "info", "debug", "notset"),
    "http_listen": str.strip,
    "http_port": int,
    "cache_files": Path,
    "cache_general": Path,
    "cache_prune_days": float,
}


def legacy_defaults(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> list[str]:
    """0.1.x server settings (`CONTREE_MCP_*`, `mcp.ini`) become the lowest-precedence defaults
    (COMPAT §9.4); returns the deprecation warnings to log once logging is set up."""
    defaults: dict[str, Any] = {}
    messages: list[str] = []
    for key, raw in legacy_server_settings(env).items():
        try:
            defaults[key] = LEGACY_TYPES[key](raw)
        except ValueError as exc:
            messages.append(f"Ignoring the deprecated 0.1.x setting {key}={raw!r}: {exc}")
    if defaults:
        parser.set_defaults(**defaults)
        messages.append(
            "Using deprecated 0.1.x settings (CONTREE_MCP_* / mcp.ini) as defaults for "
            f"{', '.join(sorted(defaults))}; pass the command-line flags instead."
        )
    return messages


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.NOTSET if level == "notset" else getattr(logging, level.upper()))


def _entry(module: str, attr: str) -> Callable[[list[str]], int]:
    try:
        fn: Callable[[list[str]], int] = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"{module}.{attr} is not available in this build: {exc}") from None
    return fn


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    for words, (module, attr) in SUBCOMMANDS.items():
        if tuple(args_list[: len(words)]) == words:
            return int(_entry(module, attr)(args_list[len(words) :]) or 0)
    if args_list and args_list[0] in GROUP_HELP:
        return run_group(args_list[0], args_list[1:])
    parser = build_parser()
    legacy = legacy_defaults(parser, os.environ)
    args = parser.parse_args(args_list)
    setup_logging(args.log_level)
    for message in legacy:
        log.warning("%s", message)
    if args.conformance:
        conf = ["--mode", args.mode, "--http-listen", args.http_listen, "--http-port", str(args.http_port)]
        conf += ["--server-version", __version__]
        return int(_entry("protocol.testing.conformance", "main")(conf) or 0)
    args.http_token = args.http_token or os.environ.get("CONTREE_MCP_HTTP_TOKEN") or None
    if args.http_tokens_file is not None:
        try:
            args.http_tokens = load_tokens(args.http_tokens_file)
        except TokensFileError as exc:
            log.error("%s", exc)
            return 2
    if (
        args.mode == "http"
        and not is_loopback(args.http_listen)
        and not (args.http_token or args.http_tokens)
    ):
        log.error(
            "refusing to listen on %s without --http-token (or CONTREE_MCP_HTTP_TOKEN)", args.http_listen
        )
        return 2
    try:
        limit_settings(args)
    except LimitConfigError as exc:
        log.error("%s", exc)
        return 2
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0


def backend_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags `contree.config.resolve_backend_config` reads (None = not given)."""
    names = ("backend", "token", "url", "profile", "project", "auth_type", "home")
    return {name: getattr(args, name) for name in names}


def allowed_roots(args: argparse.Namespace) -> list[Path]:
    return [p.resolve() for p in args.allowed_root or [Path.cwd()]]


async def open_backend(args: argparse.Namespace) -> tuple[Backend, Literal["local", "contree"], Path]:
    """(backend, kind, cache_dir). Makes no network call: the remote client connects lazily."""
    config = resolve_backend_config(backend_flags(args), dict(os.environ))
    # Local: the home's engine service (started on demand), shared by every session. It re-checks local
    # image sources against our allowed roots when it opens them, after import_image's own check: a
    # symlink swapped in between cannot lead the import out of them.
    backend = await open_configured_backend(
        config,
        user_agent=f"contree-mcp/{__version__}",
        import_roots=[str(p) for p in allowed_roots(args)],
        client_name=f"contree-mcp {args.mode}",
        engine_options=engine_arguments(args.output_quota, limit_settings(args)),
    )
    log.info("%s", config.describe())
    if config.kind == "local":
        return backend, "local", config.home / "mcp"
    return backend, "contree", config.config_home / "mcp"


async def serve(args: argparse.Namespace) -> int:
    from contree.service.starter import EngineStartError
    from protocol.server import Server
    from tools.app import build_registry, build_state
    from tools.worker_threads import WorkerThreads

    # a worker stuck in a syscall must not keep the server alive once it was told to stop
    asyncio.get_running_loop().set_default_executor(WorkerThreads())
    try:
        backend, kind, cache_dir = await open_backend(args)
    except EngineStartError as exc:
        log.error("%s", exc)  # one line, no traceback
        if args.mode == "stdio":
            from tools.engine_error import answer_with_error

            await asyncio.to_thread(answer_with_error, str(exc))
        return 1
    roots = allowed_roots(args)
    state = build_state(
        backend,
        kind,
        cache_dir=cache_dir,
        allowed_roots=roots,
        files_db=args.cache_files,
        general_db=args.cache_general,
        read_max_bytes=args.read_max_bytes,
        http_mode=args.mode == "http",
        http_port=args.http_port,
        prune_days=args.cache_prune_days,
        scoped_operations=args.mode == "http" and bool(args.http_tokens),
    )
    if kind == "local":
        # the guidance names this engine's images (with per-client scoping: only the shared ones)
        await state.read_catalog()
    registry = build_registry(state)
    server = Server(registry)
    stopping = _stop_on_signals()
    try:
        if args.mode == "stdio":
            from protocol.stdio import serve_stdio

            await serve_stdio(server, idle=lambda: _load_http_client(state))
        else:
            await serve_http(server, registry, state, args)
    except asyncio.CancelledError:
        if not stopping.is_set():
            raise
        log.info("stopping on signal")
    finally:
        # Also on SIGTERM: sessions close and the backend detaches (the engine service keeps the work).
        await server.close()
        await state.close()
    return 0


def _load_http_client(state: Any) -> None:
    """The backend's HTTP client (aiohttp, ~110 ms to import), which the start-up did without, loads in
    a worker thread once the session is first idle (after the handshake and the client's first lists),
    so that neither those answers nor the agent's first tool call wait for it."""
    from contree.client import load_http_client

    state.spawn_background(asyncio.to_thread(load_http_client), "load-http-client")


def _stop_on_signals() -> asyncio.Event:
    """SIGTERM/SIGHUP cancel the serving task so that the server shuts down cleanly (SIGINT already does)."""
    stopping = asyncio.Event()
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if stopping.is_set():  # a second signal must not interrupt the clean-up
            return
        stopping.set()
        if task is not None:
            task.cancel()

    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, stop)
    return stopping


async def serve_http(
    server: Server, registry: Registry, state: ServerState, args: argparse.Namespace
) -> None:
    from protocol.http_app import serve_http as serve
    from protocol.http_guard import HttpSettings
    from tools.site.docs_site import docs_routes

    settings = HttpSettings(
        listen=args.http_listen, port=args.http_port, auth_token=args.http_token, auth_tokens=args.http_tokens
    )
    routes = docs_routes(
        registry,
        state,
        listen=args.http_listen,
        port=args.http_port,
        token=bool(args.http_token or args.http_tokens),
    )
    log.info("serving MCP at http://%s:%d/mcp (docs at /)", args.http_listen, args.http_port)
    await serve(server, settings, extra_routes=routes)
