"""Streamable HTTP at `/mcp`, both eras, on aiohttp.web.

Handshake era (2025-03-26 … 2025-11-25): `initialize` mints an `Mcp-Session-Id`; later POSTs, the GET
stream and DELETE name it; SSE events are numbered and replayable (`Last-Event-ID`, SEP-1699 polling); a
client disconnect is not a cancellation. Stateless era (2026-07-28): every POST stands alone (a
per-request core session checks its headers and `_meta`); a disconnect cancels the request; GET/DELETE
are 405; `subscriptions/listen` keeps its POST stream open for notifications.

The transport moves bytes and picks JSON or SSE per answer; the protocol rules are the core's.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

from aiohttp import web

from protocol import versions
from protocol.errors import REQUEST_REJECTED, SESSION_NOT_FOUND
from protocol.events import Batch, Dispatch, Event, Listen, expects_reply, runs_handlers
from protocol.headers import METHOD, NAME, PARAM_PREFIX, PROTOCOL_VERSION, HttpHeaders
from protocol.http_guard import Guard, HttpSettings, accepts, error_response
from protocol.server import Server, ServerSession
from protocol.sse import EventStream, serve_stream, sse_event
from protocol.types import Outgoing, Reply

__all__ = ["HttpSession", "StreamableHttp"]

log = logging.getLogger("protocol.http")

MCP_PATH = "/mcp"
SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"
LAST_EVENT_HEADER = "Last-Event-ID"


def stateless_headers(request: web.Request) -> HttpHeaders:
    """The request headers the 2026-07-28 rules compare with the body."""
    params: dict[str, str] = {}
    for name, value in request.headers.items():
        lower = name.lower()
        if lower.startswith(PARAM_PREFIX):
            params[lower[len(PARAM_PREFIX) :]] = value
    h = request.headers
    return HttpHeaders(h.get(PROTOCOL_VERSION), h.get(METHOD), h.get(NAME), params)


def is_modern_header(version: str | None) -> bool:
    return version is not None and version.strip() not in versions.SUPPORTED


# ---------------------------------------------------------------- HTTP sessions


class HttpSession:
    """The HTTP side of one handshake-era MCP session: its streams, its GET stream and its running work."""

    def __init__(self, session: ServerSession, settings: HttpSettings) -> None:
        self.session = session
        self.settings = settings
        self.streams: dict[str, EventStream] = {}
        self._finished: collections.deque[str] = collections.deque()
        self._next_stream = 0
        self.get_stream: EventStream | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.last_seen = time.monotonic()
        self.closed = False

    @property
    def id(self) -> str:
        return self.session.session_id

    def new_stream(self) -> EventStream:
        self._next_stream += 1
        settings = self.settings
        stream = EventStream(
            str(self._next_stream), settings.replay_events, settings.write_timeout, settings.replay_bytes
        )
        self.streams[stream.id] = stream
        return stream

    def stream_finished(self, stream: EventStream) -> None:
        stream.finish()
        self._finished.append(stream.id)
        while len(self._finished) > self.settings.streams_per_session:
            self.streams.pop(self._finished.popleft(), None)

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def busy(self) -> bool:
        return bool(self.tasks) or any(s.live for s in self.streams.values())

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for stream in self.streams.values():
            stream.end()
        self.session.set_default_sink(None)
        await self.session.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


class _PostSink:
    """Where one POST's messages go: a JSON answer until something other than a response must go out,
    then an SSE stream. A listen stream stays open until its graceful end (a Reply) or the client goes."""

    def __init__(self, hs: HttpSession, *, json_only: bool) -> None:
        self.hs = hs
        self.json_only = json_only
        self.replies: list[Reply] = []
        self.stream: EventStream | None = None
        self.decided = asyncio.Event()  # an SSE stream opened, or the dispatch is over
        self.done = False
        self.listening = False

    def open(self) -> None:
        if self.stream is not None or self.json_only or self.done:
            return
        stream = self.stream = self.hs.new_stream()
        for reply in self.replies:
            stream.append(reply.data)
        self.replies.clear()
        self.decided.set()

    async def __call__(self, message: Outgoing) -> None:
        if self.stream is None:
            if type(message) is Reply and not self.listening:
                self.replies.append(message)
                return
            if self.json_only:
                # Nowhere else to go: the GET stream (or the session buffer until one opens).
                await self.hs.session.send_unrelated(message)
                return
            self.open()
        assert self.stream is not None
        await self.stream.push(message.data)
        if self.listening and type(message) is Reply:
            self.finish()  # the listen request's response: the subscription ended gracefully

    async def close_stream(self, retry_ms: int) -> None:
        """RequestContext.close_stream hook (SEP-1699)."""
        self.open()
        if self.stream is not None:
            await self.stream.interrupt(retry_ms)

    def finish(self) -> None:
        self.done = True
        if self.stream is not None:
            self.hs.stream_finished(self.stream)
        self.decided.set()


class StreamableHttp:
    """The `/mcp` endpoint: POST, GET and DELETE over the sessions of one `Server`."""

    def __init__(self, server: Server, settings: HttpSettings, guard: Guard) -> None:
        self.server = server
        self.settings = settings
        self.guard = guard
        self.sessions: dict[str, HttpSession] = {}
        self._closing: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ helpers

    def _lookup(self, request: web.Request, principal: str | None) -> HttpSession | web.Response:
        sid = request.headers.get(SESSION_HEADER)
        if not sid:
            return error_response(400, REQUEST_REJECTED, f"Bad Request: {SESSION_HEADER} header is required")
        hs = self.sessions.get(sid)
        # Another principal's session does not exist for this caller.
        if hs is None or hs.closed or hs.session.principal != principal:
            return error_response(404, SESSION_NOT_FOUND, "Session not found")
        # A supported version other than the session's is tolerated: conformance 0.1.16
        # (server-sse-multiple-streams) sends 2025-03-26 on a 2025-11-25 session and expects 200.
        version = request.headers.get(VERSION_HEADER)
        if version is not None and version not in versions.SUPPORTED:
            return error_response(
                400, REQUEST_REJECTED, f"Bad Request: unsupported {VERSION_HEADER}: {version[:64]}"
            )
        hs.last_seen = time.monotonic()
        return hs

    def _headers(self, hs: HttpSession | None) -> dict[str, str]:
        return {} if hs is None else {SESSION_HEADER: hs.id}

    def _json(self, hs: HttpSession | None, replies: list[Reply]) -> web.Response:
        if not replies:
            return web.Response(status=202, headers=self._headers(hs))
        if len(replies) == 1:
            body, status = replies[0].data, replies[0].status
        else:
            body, status = b"[" + b",".join(r.data for r in replies) + b"]", 200
        headers = {"Content-Type": "application/json"}
        if hs is not None:
            headers[SESSION_HEADER] = hs.id
        return web.Response(body=body, status=status, headers=headers)

    def _evict_idle(self) -> bool:
        idle = [hs for hs in self.sessions.values() if not hs.busy()]
        if not idle:
            return False
        victim = min(idle, key=lambda hs: hs.last_seen)
        self.sessions.pop(victim.id, None)
        task = asyncio.get_running_loop().create_task(victim.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return True

    # ------------------------------------------------------------ POST

    async def post(self, request: web.Request) -> web.StreamResponse:
        principal = self.guard.check(request)
        if isinstance(principal, web.Response):
            return principal
        accept = request.headers.get("Accept", "")
        if not (accepts(accept, "application/json") and accepts(accept, "text/event-stream")):
            return error_response(
                406,
                REQUEST_REJECTED,
                "Not Acceptable: Accept must list application/json and text/event-stream",
            )
        if request.content_type != "application/json":
            return error_response(415, REQUEST_REJECTED, "Unsupported Media Type: use application/json")
        body = await request.read()
        # 2026-07-28 ignores Mcp-Session-Id: a stateless request never joins a handshake session.
        headers = request.headers
        if SESSION_HEADER not in headers or is_modern_header(headers.get(VERSION_HEADER)):
            return await self._sessionless(request, body, principal)
        hs = self._lookup(request, principal)
        if isinstance(hs, web.Response):
            return hs
        return await self._answer(request, hs.session, hs.session.receive(body), hs=hs)

    async def _sessionless(
        self, request: web.Request, body: bytes, principal: str | None
    ) -> web.StreamResponse:
        """A POST without a session: `initialize` (a new session), a stateless request, or a 400."""
        session = self.server.create_session(transport="http", principal=principal, http=True, register=False)
        keep = False
        try:
            events = session.receive(body, stateless_headers(request))
            if session.protocol_version is not None:  # initialize succeeded: a handshake session
                if len(self.sessions) >= self.settings.max_sessions and not self._evict_idle():
                    return error_response(
                        503, REQUEST_REJECTED, "Too many sessions", headers={"Retry-After": "5"}
                    )
                self.server.register(session)
                hs = HttpSession(session, self.settings)
                replies = await _collect(session, events)
                keep = True
                self.sessions[hs.id] = hs
                return self._json(hs, replies)
            if any(type(e) is Listen for e in events):
                self.server.register(session)  # list changes and resource updates must find its stream
            return await self._answer(request, session, events, hs=None)
        finally:
            if not keep:
                await session.close()

    async def _answer(
        self, request: web.Request, session: ServerSession, events: list[Event], *, hs: HttpSession | None
    ) -> web.StreamResponse:
        """The HTTP answer to one POST's events; `hs` is the handshake session (None: a stateless POST)."""
        shown = hs
        stateless = hs is None
        if not expects_reply(events):
            await session.run(events, _discard)
            return web.Response(status=202, headers=self._headers(shown))
        if not runs_handlers(events):
            # ping, lists, setLevel, discover, tasks/*…: answered inline, only responses come out.
            return self._json(shown, await _collect(session, events))
        if hs is None:
            hs = HttpSession(session, self.settings)  # the streams and work of this one request
        sink = _PostSink(hs, json_only=self.settings.json_response and not stateless)
        listen = any(type(e) is Listen for e in events)
        if listen:
            sink.listening = True
            sink.open()
        elif not self.settings.json_response and _has_progress_token(events):
            sink.open()
        # Handshake era: the work belongs to the session (a disconnect is not a cancellation). Stateless:
        # it belongs to this POST, and the client closing the stream cancels it.
        work = hs.spawn(self._dispatch(session, events, sink, keep_open=listen))
        timer = asyncio.get_running_loop().call_later(self.settings.sse_after, sink.open)
        try:
            try:
                await sink.decided.wait()
            finally:
                timer.cancel()
            stream = sink.stream
            if stream is None:
                return self._json(shown, sink.replies)
            head = b""
            poll_after = None
            if not stateless:
                head = sse_event(f"{stream.id}:0", b"", event=None)  # priming event: resumable from here
                head = b"retry: %d\n" % self.settings.retry_ms + head
                poll_after = self.settings.poll_after
            return await serve_stream(
                request,
                stream,
                after=0,
                head=head,
                settings=self.settings,
                headers=self._headers(shown),
                poll_after=poll_after,
            )
        finally:
            if stateless:
                if listen:
                    for e in events:
                        if type(e) is Listen:
                            await session.end_listen(e.id)
                if not work.done():
                    work.cancel()  # the client went away: 2026-07-28 treats that as cancellation
                    await asyncio.gather(work, return_exceptions=True)

    async def _dispatch(
        self, session: ServerSession, events: list[Event], sink: _PostSink, *, keep_open: bool
    ) -> None:
        try:
            await session.run(events, sink)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("dispatch failed")
        finally:
            if not keep_open:
                sink.finish()
        if keep_open:
            await asyncio.Event().wait()  # the listen stream lives until the client or the server ends it

    # ------------------------------------------------------------ GET

    async def get(self, request: web.Request) -> web.StreamResponse:
        principal = self.guard.check(request)
        if isinstance(principal, web.Response):
            return principal
        if is_modern_header(request.headers.get(VERSION_HEADER)):
            return web.Response(status=405, headers={"Allow": "POST"})
        if not accepts(request.headers.get("Accept", ""), "text/event-stream"):
            return error_response(406, REQUEST_REJECTED, "Not Acceptable: Accept must list text/event-stream")
        hs = self._lookup(request, principal)
        if isinstance(hs, web.Response):
            return hs
        last = request.headers.get(LAST_EVENT_HEADER)
        if last:
            return await self._resume(request, hs, last)
        stream = hs.new_stream()
        previous, hs.get_stream = hs.get_stream, stream
        if previous is not None:
            previous.end()  # one standalone stream per session: the newest connection wins
            hs.streams.pop(previous.id, None)
        return await self._serve_get(request, hs, stream, after=0, head=b": stream open\n\n")

    async def _serve_get(
        self, request: web.Request, hs: HttpSession, stream: EventStream, *, after: int, head: bytes
    ) -> web.StreamResponse:
        hs.session.set_default_sink(_stream_sink(stream))
        try:
            return await serve_stream(
                request, stream, after=after, head=head, settings=self.settings, headers=self._headers(hs)
            )
        finally:
            if hs.get_stream is stream and not stream.live:
                # Unrelated messages wait in the session's bounded buffer until a GET stream returns.
                hs.session.set_default_sink(None)

    async def _resume(self, request: web.Request, hs: HttpSession, last: str) -> web.StreamResponse:
        stream_id, _, seq_text = last.strip().rpartition(":")
        stream = hs.streams.get(stream_id)
        if stream is None or not seq_text.isdigit():
            # 400, not 404: the session is alive, only that stream's events are gone.
            return error_response(400, REQUEST_REJECTED, "Unknown Last-Event-ID (the stream is gone)")
        after = int(seq_text)
        if stream is hs.get_stream:
            return await self._serve_get(request, hs, stream, after=after, head=b": resumed\n\n")
        return await serve_stream(
            request,
            stream,
            after=after,
            head=b": resumed\n\n",
            settings=self.settings,
            headers=self._headers(hs),
            poll_after=self.settings.poll_after,
        )

    # ------------------------------------------------------------ DELETE

    async def delete(self, request: web.Request) -> web.Response:
        principal = self.guard.check(request)
        if isinstance(principal, web.Response):
            return principal
        if is_modern_header(request.headers.get(VERSION_HEADER)):
            return web.Response(status=405, headers={"Allow": "POST"})
        hs = self._lookup(request, principal)
        if isinstance(hs, web.Response):
            return hs
        self.sessions.pop(hs.id, None)
        await hs.close()
        return web.Response(status=204)

    async def other(self, request: web.Request) -> web.Response:
        return web.Response(status=405, headers={"Allow": "GET, POST, DELETE"})

    # ------------------------------------------------------------ lifetime

    async def reap(self) -> None:
        """Close sessions idle for longer than `session_idle_timeout` (no streams, no work)."""
        period = max(min(self.settings.session_idle_timeout / 4, 60.0), 0.05)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for hs in list(self.sessions.values()):
                if not hs.busy() and now - hs.last_seen > self.settings.session_idle_timeout:
                    self.sessions.pop(hs.id, None)
                    await hs.close()

    async def close(self) -> None:
        sessions, self.sessions = list(self.sessions.values()), {}
        for hs in sessions:
            await hs.close()


def _has_progress_token(events: list[Event]) -> bool:
    for e in events:
        if type(e) is Dispatch and e.call.progress_token is not None:
            return True
        if type(e) is Batch and _has_progress_token(list(e.events)):
            return True
    return False


def _stream_sink(stream: EventStream) -> Any:
    async def sink(message: Outgoing) -> None:
        await stream.push(message.data)

    return sink


async def _discard(message: Outgoing) -> None:
    return None


async def _collect(session: ServerSession, events: list[Event]) -> list[Reply]:
    """Run events that only answer (no handler): their replies, for one JSON body."""
    replies: list[Reply] = []

    async def sink(message: Outgoing) -> None:
        if type(message) is Reply:
            replies.append(message)
        else:  # nothing but replies is expected here; anything else belongs to the session's stream
            await session.send_unrelated(message)

    await session.run(events, sink)
    return replies
