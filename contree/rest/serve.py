"""`contree-mcp serve-api`: the embedded engine as a self-hosted Contree REST API.

It is one more client of the home's engine service (attaching to it, or starting it), so a TCP API and
local MCP sessions share one engine; stopping serve-api stops only the TCP listener.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from contree.backend import Backend
from contree.config import engine_home
from contree.engine.runtime.limits import LimitConfigError, settings_from
from contree.engine.runtime.limits import add_arguments as add_limit_arguments
from contree.rest.app import build_app
from contree.rest.guard import RequestGuard, is_loopback
from contree.service.cli import engine_arguments
from contree.units import parse_size

log = logging.getLogger("contree.rest")

DEFAULT_LISTEN = "127.0.0.1:9453"
TOKEN_ENV = "CONTREE_SERVE_TOKEN"


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT` or `:PORT` (loopback)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"--listen must be HOST:PORT, not {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port_text)


class InsecureListener(ValueError):
    """A listener the token rule forbids (see `check_listener`)."""


def check_listener(host: str, token: str | None, *, insecure_no_token: bool = False) -> None:
    """Every TCP listener needs a token; only a loopback one may go without, and only when asked to."""
    if token and insecure_no_token:
        raise InsecureListener("--insecure-no-token and a token contradict each other; drop one")
    if token:
        return
    if not insecure_no_token:
        raise InsecureListener(
            f"refusing to listen on {host} without a token: pass --token T (or set {TOKEN_ENV}); "
            "on a loopback address, --insecure-no-token serves without one"
        )
    if not is_loopback(host):
        raise InsecureListener(
            f"refusing to listen on {host} without a token: --insecure-no-token is for loopback only"
        )


async def serve(
    backend: Backend,
    host: str,
    port: int,
    *,
    token: str | None,
    stop: asyncio.Event,
    keepalive: float = 15.0,
    insecure_no_token: bool = False,
    allowed_hosts: Sequence[str] = (),
    allowed_origins: Sequence[str] = (),
) -> None:
    """Serve until `stop` is set; prints the bound URL (port 0 picks a free one) on stdout."""
    check_listener(host, token, insecure_no_token=insecure_no_token)
    guard = RequestGuard(host, allowed_hosts, allowed_origins)
    app = build_app(backend, token=token, guard=guard, keepalive=keepalive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        print(f"Contree API listening on http://{shown}:{bound[1]}/v1", flush=True)
        if not token:
            log.warning("serving without a token (--insecure-no-token): every local user can use this API")
        await stop.wait()
    finally:
        await runner.cleanup()


async def _run(
    args: argparse.Namespace,
    host: str,
    port: int,
    token: str | None,
    home: Path,
    import_roots: tuple[str, ...],
    engine_options: list[str],
) -> int:
    from contree.service.client import ServiceBackend
    from contree.service.starter import EngineStartError

    # API clients must never make the engine read arbitrary host files as image archives: the service
    # checks every import of ours against these roots (none = local sources refused).
    engine = ServiceBackend(
        home, import_roots=import_roots, client_name="serve-api", engine_options=engine_options
    )
    try:
        status = await engine.connect()
    except EngineStartError as exc:
        await engine.close()
        print(f"contree-mcp serve-api: {exc}", file=sys.stderr)
        return 1
    log.info("engine service at %s (pid %d)", home, status.pid)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await serve(
            engine,
            host,
            port,
            token=token,
            stop=stop,
            insecure_no_token=args.insecure_no_token,
            allowed_hosts=args.allowed_host,
            allowed_origins=args.allowed_origin,
        )
    finally:
        await engine.close()  # detaches; the service exits once idle
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="contree-mcp serve-api",
        description="Serve the embedded engine as a Contree REST API at /v1 (a self-hosted Contree). It "
        "attaches to (or starts) the home's engine service, which local MCP sessions share.",
    )
    parser.add_argument(
        "--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT to bind (default {DEFAULT_LISTEN})"
    )
    parser.add_argument(
        "--home",
        default=None,
        help="engine state directory (default $CONTREE_ENGINE_HOME or $XDG_DATA_HOME/contree-mcp)",
    )
    parser.add_argument(
        "--token",
        default=None,
        help=f"bearer token clients must send (or ${TOKEN_ENV}); required on every listener unless "
        "--insecure-no-token",
    )
    parser.add_argument(
        "--insecure-no-token",
        action="store_true",
        help="serve a loopback address without a token: every local user (and process) can use the API",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="Host header value accepted besides loopback names and the listen address (e.g. behind a "
        "reverse proxy); repeatable, '*' = any",
    )
    parser.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="browser Origin (scheme://host[:port]) accepted besides loopback ones; repeatable",
    )
    parser.add_argument(
        "--import-root",
        action="append",
        default=[],
        metavar="PATH",
        help="directory local image sources (oci-archive:, docker-archive:, oci:) may be read from; "
        "repeatable (default: none, local sources are refused)",
    )
    parser.add_argument(
        "--output-quota",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="stdout+stderr bytes one run may store, e.g. 512M (default 1G); the rest is counted, not kept. "
        "An engine setting: applies when serve-api starts the home's engine service",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    add_limit_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="[%(levelname)s] %(message)s", stream=sys.stderr)
    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        print(f"contree-mcp serve-api: {exc}", file=sys.stderr)
        return 2
    token = args.token or os.environ.get(TOKEN_ENV) or None
    try:
        check_listener(host, token, insecure_no_token=args.insecure_no_token)
    except InsecureListener as exc:
        print(f"contree-mcp serve-api: {exc}", file=sys.stderr)
        return 2
    home = Path(args.home).expanduser() if args.home else engine_home(os.environ)
    try:
        resources = settings_from(args)
    except LimitConfigError as exc:
        print(f"contree-mcp serve-api: {exc}", file=sys.stderr)
        return 2
    engine_options = engine_arguments(args.output_quota, resources)
    try:
        import_roots = tuple(os.path.realpath(os.path.expanduser(root)) for root in args.import_root)
        return asyncio.run(_run(args, host, port, token, home, import_roots, engine_options))
    except KeyboardInterrupt:
        return 0
