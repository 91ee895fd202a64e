"""The aiohttp application for both HTTP transports: routes, lifetime, and serving it.

`/mcp` is Streamable HTTP (both protocol eras); `/sse` + `/messages` is legacy HTTP+SSE (2024-11-05);
callers add their own routes (the docs site).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable

from aiohttp import web
from yarl import URL

from protocol.http import MCP_PATH, StreamableHttp
from protocol.http_guard import Guard, HttpSettings
from protocol.server import Server
from protocol.sse_legacy import LegacySse

__all__ = ["STREAMABLE_KEY", "build_app", "run_http", "serve_http"]

log = logging.getLogger("protocol.http")

STREAMABLE_KEY = web.AppKey("streamable", StreamableHttp)


def build_app(
    server: Server,
    settings: HttpSettings | None = None,
    *,
    extra_routes: Iterable[web.AbstractRouteDef] | None = None,
) -> web.Application:
    """The aiohttp application: `/mcp` (Streamable HTTP), `/sse` + `/messages` (legacy), `extra_routes`.

    Raises HttpConfigError for unsafe settings (beyond loopback without a token)."""
    settings = settings or HttpSettings()
    settings.validate()
    guard = Guard(settings)
    mcp = StreamableHttp(server, settings, guard)
    app = web.Application(client_max_size=settings.max_body)
    app[STREAMABLE_KEY] = mcp

    async def redirect(request: web.Request) -> web.Response:
        target = URL(MCP_PATH).with_query(request.query_string) if request.query_string else URL(MCP_PATH)
        raise web.HTTPTemporaryRedirect(str(target))

    app.router.add_post(MCP_PATH, mcp.post)
    app.router.add_get(MCP_PATH, mcp.get, allow_head=False)
    app.router.add_delete(MCP_PATH, mcp.delete)
    app.router.add_route("*", MCP_PATH, mcp.other)
    app.router.add_route("*", MCP_PATH + "/", redirect)
    legacy = LegacySse(server, settings, guard) if settings.legacy_sse else None
    if legacy is not None:
        legacy.mount(app)
    if extra_routes:
        app.router.add_routes(list(extra_routes))

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        reaper = asyncio.get_running_loop().create_task(mcp.reap())
        yield
        reaper.cancel()
        await mcp.close()
        if legacy is not None:
            await legacy.close()

    app.cleanup_ctx.append(lifetime)
    return app


async def serve_http(
    server: Server,
    settings: HttpSettings | None = None,
    extra_routes: Iterable[web.AbstractRouteDef] | None = None,
    *,
    ready: asyncio.Event | None = None,
) -> None:
    """Serve until cancelled. Client disconnects cancel only their request handlers (handshake-era work
    runs on; a stateless request's work stops with its stream)."""
    settings = settings or HttpSettings()
    app = build_app(server, settings, extra_routes=extra_routes)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.listen, settings.port)
        await site.start()
        log.info("MCP over HTTP at http://%s:%d%s", settings.listen, settings.port, MCP_PATH)
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run_http(server: Server, settings: HttpSettings | None = None) -> int:
    """Blocking entry point (`python -m protocol.testing.conformance --mode http`)."""
    try:
        asyncio.run(serve_http(server, settings))
    except KeyboardInterrupt:
        pass
    return 0
