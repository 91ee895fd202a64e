"""Legacy HTTP+SSE transport (MCP 2024-11-05) for older clients: `GET /sse` + `POST /messages?session_id=`.

The session lives as long as its `GET /sse` connection: the first event names (with a relative URL, which
the Python SDK requires) where to POST; every answer and server message travels on that stream as
`event: message`. Same Host/Origin/bearer checks as Streamable HTTP (`protocol.http_guard.Guard`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from protocol.errors import REQUEST_REJECTED, SESSION_NOT_FOUND
from protocol.events import Event, runs_handlers
from protocol.http_guard import Guard, HttpSettings, accepts, error_response
from protocol.server import Server, ServerSession
from protocol.sse import SSE_HEADERS, sse_event
from protocol.types import Outgoing, Reply

log = logging.getLogger("protocol.sse_legacy")

SSE_PATH = "/sse"
MESSAGES_PATH = "/messages"


class _Connection:
    """One open `GET /sse`: a single writer for the stream, and the work its POSTs started."""

    def __init__(
        self,
        session: ServerSession,
        response: web.StreamResponse,
        transport: asyncio.BaseTransport | None,
        write_timeout: float,
    ) -> None:
        self.session = session
        self.response = response
        self.transport = transport
        self.write_timeout = write_timeout
        self.ended = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    async def write(self, frame: bytes) -> None:
        if self.ended.is_set():
            raise ConnectionResetError("the SSE stream is closed")
        async with self._lock:
            try:
                async with asyncio.timeout(self.write_timeout):
                    await self.response.write(frame)
            except TimeoutError:
                # The client stopped reading; it must not stall the session (nor anyone else).
                self.ended.set()
                if self.transport is not None:
                    self.transport.abort()  # type: ignore[attr-defined]
                raise ConnectionResetError("the SSE client stopped reading") from None
            except (ConnectionError, RuntimeError):
                self.ended.set()
                raise

    async def send(self, message: Outgoing) -> None:
        """The session's sink: one `message` event per JSON-RPC message."""
        await self.write(sse_event(None, message.data))

    def spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class LegacySse:
    def __init__(self, server: Server, settings: HttpSettings, guard: Guard) -> None:
        self.server = server
        self.settings = settings
        self.guard = guard
        self.connections: dict[str, _Connection] = {}

    def mount(self, app: web.Application) -> None:
        app.router.add_get(SSE_PATH, self.sse, allow_head=False)
        app.router.add_post(MESSAGES_PATH, self.messages)
        app.router.add_post(MESSAGES_PATH + "/", self.messages)

    async def sse(self, request: web.Request) -> web.StreamResponse:
        principal = self.guard.check(request)
        if isinstance(principal, web.Response):
            return principal
        if not accepts(request.headers.get("Accept", "text/event-stream"), "text/event-stream"):
            return error_response(406, REQUEST_REJECTED, "Not Acceptable: Accept must list text/event-stream")
        if len(self.connections) >= self.settings.max_sessions:
            return error_response(503, REQUEST_REJECTED, "Too many sessions", headers={"Retry-After": "5"})
        session = self.server.create_session(transport="sse", principal=principal)
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        conn = _Connection(session, response, request.transport, self.settings.write_timeout)
        self.connections[session.session_id] = conn
        try:
            await response.prepare(request)
            endpoint = f"{MESSAGES_PATH}?session_id={session.session_id}"
            await conn.write(b"event: endpoint\ndata: " + endpoint.encode() + b"\n\n")
            session.set_default_sink(conn.send)
            while not conn.ended.is_set():
                try:
                    await asyncio.wait_for(conn.ended.wait(), self.settings.keepalive)
                except TimeoutError:
                    try:
                        await conn.write(b": keepalive\n\n")
                    except (ConnectionError, RuntimeError):
                        break
        except (ConnectionError, RuntimeError):
            pass
        finally:
            # The stream was the session: without it nobody could receive an answer.
            self.connections.pop(session.session_id, None)
            conn.ended.set()
            session.set_default_sink(None)
            await session.close()
            for task in list(conn.tasks):
                task.cancel()
            if conn.tasks:
                await asyncio.gather(*conn.tasks, return_exceptions=True)
        try:
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return response

    async def messages(self, request: web.Request) -> web.Response:
        principal = self.guard.check(request)
        if isinstance(principal, web.Response):
            return principal
        session_id = request.query.get("session_id")
        if not session_id:
            return error_response(400, REQUEST_REJECTED, "Bad Request: session_id is required")
        conn = self.connections.get(session_id)
        if conn is None or conn.ended.is_set() or conn.session.principal != principal:
            return error_response(404, SESSION_NOT_FOUND, "Session not found")
        if request.content_type != "application/json":
            return error_response(415, REQUEST_REJECTED, "Unsupported Media Type: use application/json")
        body = await request.read()
        session = conn.session
        events = session.receive(body)
        if len(events) == 1 and type(events[0]) is Reply and events[0].status == 400:
            return web.Response(status=400, body=events[0].data, content_type="application/json")
        if runs_handlers(events):
            conn.spawn(self._dispatch(conn, events))
        else:
            # Quick methods and notifications (cancellation!) keep their arrival order.
            await self._dispatch(conn, events)
        return web.Response(status=202, text="Accepted")

    async def _dispatch(self, conn: _Connection, events: list[Event]) -> None:
        try:
            await conn.session.run(events, conn.send)
        except (ConnectionError, RuntimeError):
            pass  # the stream went away; the session closes with it
        except Exception:
            log.exception("dispatch failed")

    async def close(self) -> None:
        for conn in list(self.connections.values()):
            conn.ended.set()
