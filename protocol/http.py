"""Streamable HTTP at `/mcp` (MCP 2025-03-26 … 2025-11-25) on aiohttp.web; legacy SSE is mounted too.

The transport only moves bytes: every protocol rule lives in `protocol.session`, every handler task in
`protocol.server`. What lives here is HTTP: header checks (Host, Origin, bearer token, Accept,
Content-Type, Mcp-Session-Id, MCP-Protocol-Version), choosing a JSON or an SSE answer, numbered SSE
events with a bounded replay buffer per stream (`Last-Event-ID` resumption, SEP-1699 polling) and the
lifetime of HTTP sessions.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import ipaddress
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from yarl import URL

from protocol import versions
from protocol.errors import METHOD_NOT_FOUND
from protocol.messages import Request, encode_error
from protocol.server import Server, ServerSession
from protocol.session import ASYNC_METHODS, SYNC_METHODS

__all__ = [
    "EventStream",
    "Guard",
    "HttpConfigError",
    "HttpSettings",
    "build_app",
    "is_response",
    "serve_http",
]

log = logging.getLogger("protocol.http")

MCP_PATH = "/mcp"
SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"
LAST_EVENT_HEADER = "Last-Event-ID"
# Without the header a server cannot know better (MCP 2025-06-18, transports §protocol version header).
ASSUMED_VERSION = versions.V2025_03_26
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",  # nginx would otherwise hold events back
}
# Server error codes in the implementation-defined range, as the SDK servers use them.
BAD_REQUEST_CODE = -32000
SESSION_NOT_FOUND_CODE = -32001


class HttpConfigError(ValueError):
    """The settings would expose the server unsafely (e.g. beyond loopback without a token)."""


@dataclass(kw_only=True)
class HttpSettings:
    """How the HTTP transports listen and whom they answer."""

    listen: str = "127.0.0.1"
    port: int = 9452
    # Bearer token; mandatory when `listen` is not a loopback address.
    auth_token: str | None = None
    # More tokens, each mapped to the principal name its sessions are bound to.
    auth_tokens: Mapping[str, str] = field(default_factory=dict)
    # Host header names (`name` or `name:port`, `*` = any) accepted besides the loopback names. Empty: the
    # listen address when it is a specific one, any name when it is a wildcard (the token guards it).
    allowed_hosts: tuple[str, ...] = ()
    # Origins (`scheme://host[:port]`, `*` = any) accepted besides loopback and same-origin ones.
    allowed_origins: tuple[str, ...] = ()
    # Never answer a POST with SSE; notifications of a call then travel on the GET stream.
    json_response: bool = False
    # A call still running after this many seconds is switched to an SSE stream (priming event, keepalives).
    sse_after: float = 1.0
    # SEP-1699 polling: close a POST stream after this many seconds (the client resumes with GET).
    poll_after: float | None = None
    retry_ms: int = 1000
    keepalive: float = 15.0
    # A client that stops reading must not stall the session's work (or other sessions' notifications).
    write_timeout: float = 10.0
    replay_events: int = 512  # per stream
    replay_bytes: int = 8 * 1024 * 1024  # per stream; the newest event is always kept
    streams_per_session: int = 32  # finished POST streams kept for resumption
    max_sessions: int = 1000
    session_idle_timeout: float = 3600.0
    max_body: int = 64 * 1024 * 1024
    legacy_sse: bool = True

    def is_loopback(self) -> bool:
        return _is_loopback_name(self.listen)

    def tokens(self) -> dict[str, str]:
        """token → principal."""
        tokens = dict(self.auth_tokens)
        if self.auth_token:
            digest = hashlib.sha256(self.auth_token.encode()).hexdigest()[:16]
            tokens[self.auth_token] = f"token:{digest}"
        return tokens

    def validate(self) -> None:
        if not self.is_loopback() and not self.tokens():
            raise HttpConfigError(
                f"refusing to listen on {self.listen} without a bearer token: "
                "beyond loopback one is mandatory"
            )
        if any(not token for token in self.tokens()):
            raise HttpConfigError("an empty bearer token is not a token")


def _is_loopback_name(name: str) -> bool:
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_wildcard(name: str) -> bool:
    return name in ("", "0.0.0.0", "::", "[::]")


def _split_host(host: str) -> tuple[str, str | None]:
    """`name[:port]` / `[v6][:port]` → (lower-case name without brackets, port)."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return host, None
        rest = host[end + 1 :]
        return host[1:end], rest[1:] if rest.startswith(":") else None
    name, sep, port = host.rpartition(":")
    if not sep or ":" in name:
        return host, None
    return name, port


# ---------------------------------------------------------------- the guard (DNS rebinding, auth)


class Guard:
    """Host, Origin and bearer-token checks shared by every MCP route; each is checked on its own."""

    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        self._tokens = [(token.encode(), principal) for token, principal in settings.tokens().items()]
        hosts = {h.lower() for h in settings.allowed_hosts}
        if not hosts and not settings.is_loopback():
            hosts.add("*" if _is_wildcard(settings.listen) else settings.listen.lower())
        self._hosts = hosts
        self._origins = {o.rstrip("/").lower() for o in settings.allowed_origins}

    def host_allowed(self, host: str | None) -> bool:
        if not host:
            return False
        if "*" in self._hosts:
            return True
        name, port = _split_host(host)
        if name in LOOPBACK_NAMES or _is_loopback_name(name):
            return True
        return name in self._hosts or (port is not None and f"{name}:{port}" in self._hosts)

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if "*" in self._origins or origin in self._origins:
            return True
        try:
            url = URL(origin)
        except ValueError:
            return False
        if url.scheme not in ("http", "https") or not url.host:
            return False
        if _is_loopback_name(url.host):
            return True
        # Same origin: a page served by this very host (the docs site) may call it.
        return host is not None and url.raw_authority.lower() == host.strip().lower()

    def principal(self, authorization: str | None) -> tuple[bool, str | None]:
        """(authorized, principal). Every token is compared, in constant time each."""
        if not self._tokens:
            return True, None
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return False, None
        candidate = presented.strip().encode()
        found: str | None = None
        for token, principal in self._tokens:
            if hmac.compare_digest(candidate, token):
                found = principal
        return found is not None, found

    def check(self, request: web.Request) -> web.Response | str | None:
        """An error response, or the principal (None without auth)."""
        host = request.headers.get("Host")
        if not self.host_allowed(host):
            return error_response(403, BAD_REQUEST_CODE, "Forbidden: Host header not allowed")
        origin = request.headers.get("Origin")
        if origin is not None and not self.origin_allowed(origin, host):
            return error_response(403, BAD_REQUEST_CODE, "Forbidden: Origin not allowed")
        ok, principal = self.principal(request.headers.get("Authorization"))
        if not ok:
            given = "Authorization" in request.headers
            challenge = 'Bearer error="invalid_token"' if given else "Bearer"
            return error_response(
                401, BAD_REQUEST_CODE, "Unauthorized", headers={"WWW-Authenticate": challenge}
            )
        return principal


def error_response(
    status: int, code: int, message: str, *, headers: Mapping[str, str] | None = None
) -> web.Response:
    """An HTTP error carrying an id-less JSON-RPC error (never HTML)."""
    return web.Response(
        status=status,
        body=encode_error(None, code, message),
        content_type="application/json",
        headers=headers,
    )


# ---------------------------------------------------------------- SSE streams


def is_response(data: bytes) -> bool:
    """Whether an outgoing frame is a response (or a batch of them) rather than a request/notification.

    Frames come from our own encoders, so the first of `"result":` / `"error":` / `"method":` at the top
    level decides; an escaped string can never contain the bare `"method":` sequence."""
    if data[:1] == b"[":
        return True
    r = data.find(b'"result":')
    e = data.find(b'"error":')
    first = min(p for p in (r, e) if p >= 0) if r >= 0 or e >= 0 else -1
    return first >= 0 and data.find(b'"method":', 0, first) < 0


def sse_event(event_id: str | None, data: bytes, *, event: str | None = "message") -> bytes:
    parts: list[bytes] = []
    if event_id is not None:
        parts.append(b"id: " + event_id.encode())
    if event is not None:
        parts.append(b"event: " + event.encode())
    parts.extend(b"data: " + line for line in data.split(b"\n"))
    return b"\n".join(parts) + b"\n\n"


class _Writer:
    """A live HTTP response an EventStream writes to, with the event its handler waits on."""

    __slots__ = ("ended", "response", "transport")

    def __init__(self, response: web.StreamResponse, transport: asyncio.BaseTransport | None) -> None:
        self.response = response
        self.transport = transport
        self.ended = asyncio.Event()


class EventStream:
    """One SSE stream of a session: ids `<stream-id>:<seq>`, a bounded replay buffer, at most one writer.

    Events are buffered whether or not a client is connected, so a client that lost the connection (or was
    asked to poll) gets the rest with GET + Last-Event-ID."""

    def __init__(
        self, stream_id: str, limit: int, write_timeout: float = 10.0, limit_bytes: int = 8 << 20
    ) -> None:
        self.id = stream_id
        self.write_timeout = write_timeout
        self.seq = 0
        self.buffer: collections.deque[tuple[int, bytes]] = collections.deque()
        self._limit = limit
        self._limit_bytes = limit_bytes
        self._buffered = 0
        self.complete = False  # nothing more will be sent (a POST stream whose responses all went out)
        self._writer: _Writer | None = None
        self._attached = False
        self._early_interrupt: int | None = None  # asked to close before its first connection attached
        self._lock = asyncio.Lock()

    @property
    def live(self) -> bool:
        return self._writer is not None

    def append(self, data: bytes) -> bytes:
        self.seq += 1
        frame = sse_event(f"{self.id}:{self.seq}", data)
        buffer = self.buffer
        buffer.append((self.seq, frame))
        self._buffered += len(frame)
        while len(buffer) > 1 and (len(buffer) > self._limit or self._buffered > self._limit_bytes):
            self._buffered -= len(buffer.popleft()[1])
        return frame

    async def push(self, data: bytes) -> None:
        async with self._lock:
            frame = self.append(data)
            await self._write(frame)

    async def _write(self, frame: bytes) -> None:
        writer = self._writer
        if writer is None:
            return
        try:
            async with asyncio.timeout(self.write_timeout):
                await writer.response.write(frame)
        except TimeoutError:
            # The client stopped reading: drop the connection (a frame may be half-written); the events
            # stay buffered for a resumption.
            self._release(writer)
            if writer.transport is not None:
                writer.transport.abort()  # type: ignore[attr-defined]
        except (ConnectionError, RuntimeError):
            # A vanished client is not a cancellation: keep the events for its resumption.
            self._release(writer)
        except asyncio.CancelledError:
            self._release(writer)  # a half-written frame: this connection is done
            raise

    def _release(self, writer: _Writer) -> None:
        writer.ended.set()
        if self._writer is writer:
            self._writer = None

    async def attach(
        self,
        response: web.StreamResponse,
        after: int,
        head: bytes = b"",
        transport: asyncio.BaseTransport | None = None,
    ) -> _Writer:
        """Make `response` the stream's writer, replaying events after `after` (a newer writer wins)."""
        writer = _Writer(response, transport)
        async with self._lock:
            if self._writer is not None:
                self._release(self._writer)
            self._writer = writer
            self._attached = True
            if head:
                await self._write(head)
            for seq, frame in list(self.buffer):
                if seq > after:
                    await self._write(frame)
            if self.complete:
                self._release(writer)
            elif self._early_interrupt is not None:
                await self._write(b"retry: %d\n\n" % self._early_interrupt)
                self._early_interrupt = None
                self._release(writer)
        return writer

    async def interrupt(self, retry_ms: int) -> None:
        """SEP-1699: tell the client when to come back, then end the connection (events keep buffering)."""
        async with self._lock:
            writer = self._writer
            if writer is not None:
                await self._write(b"retry: %d\n\n" % retry_ms)
                self._release(writer)
            elif not self._attached:
                self._early_interrupt = retry_ms

    async def keepalive(self, writer: _Writer) -> None:
        async with self._lock:
            if self._writer is writer:
                await self._write(b": keepalive\n\n")

    def detach(self, writer: _Writer) -> None:
        self._release(writer)

    def finish(self) -> None:
        self.complete = True
        if self._writer is not None:
            self._release(self._writer)

    def end(self) -> None:
        """The session is over: release any writer."""
        self.finish()


async def serve_stream(
    request: web.Request,
    stream: EventStream,
    *,
    after: int,
    head: bytes,
    settings: HttpSettings,
    headers: Mapping[str, str] | None = None,
    poll_after: float | None = None,
) -> web.StreamResponse:
    """Answer `request` with `stream` after event `after`, until it completes, is interrupted or the
    client goes."""
    response = web.StreamResponse(status=200, headers={**SSE_HEADERS, **(headers or {})})
    await response.prepare(request)
    writer = await stream.attach(response, after, head, request.transport)
    deadline = None if poll_after is None else time.monotonic() + poll_after
    try:
        while not writer.ended.is_set():
            wait = settings.keepalive
            if deadline is not None:
                wait = min(wait, max(deadline - time.monotonic(), 0.0))
            try:
                await asyncio.wait_for(writer.ended.wait(), wait)
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    await stream.interrupt(settings.retry_ms)
                else:
                    await stream.keepalive(writer)
    finally:
        stream.detach(writer)
    try:
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        pass
    return response


# ---------------------------------------------------------------- HTTP sessions


class HttpSession:
    """The HTTP side of one MCP session: its streams, its GET stream and its running dispatches."""

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

    def spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

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
    """Dispatch sink of one POST: a JSON answer until something other than a response must go out."""

    def __init__(self, hs: HttpSession, *, json_only: bool) -> None:
        self.hs = hs
        self.json_only = json_only
        self.replies: list[bytes] = []
        self.stream: EventStream | None = None
        self.decided = asyncio.Event()  # an SSE stream opened, or the dispatch is over
        self.done = False

    def open(self) -> None:
        if self.stream is not None or self.json_only or self.done:
            return
        stream = self.stream = self.hs.new_stream()
        for reply in self.replies:
            stream.append(reply)
        self.replies.clear()
        self.decided.set()

    async def __call__(self, data: bytes) -> None:
        if self.stream is None:
            if is_response(data):
                self.replies.append(data)
                return
            if self.json_only:
                # Nowhere else to go: the GET stream (or the session buffer until one opens).
                await self.hs.session.send_unrelated(data)
                return
            self.open()
        assert self.stream is not None
        await self.stream.push(data)

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


def accepts(accept: str, wanted: str) -> bool:
    major = wanted.split("/", 1)[0]
    for item in accept.split(","):
        media = item.split(";", 1)[0].strip().lower()
        if media in (wanted, f"{major}/*", "*/*"):
            return True
    return False


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
            return error_response(400, BAD_REQUEST_CODE, f"Bad Request: {SESSION_HEADER} header is required")
        hs = self.sessions.get(sid)
        # Another principal's session does not exist for this caller.
        if hs is None or hs.closed or hs.session.principal != principal:
            return error_response(404, SESSION_NOT_FOUND_CODE, "Session not found")
        # A supported version other than the session's is tolerated: conformance 0.1.16
        # (server-sse-multiple-streams) sends 2025-03-26 on a 2025-11-25 session and expects 200.
        version = request.headers.get(VERSION_HEADER)
        if version is not None and version not in versions.SUPPORTED:
            return error_response(
                400, BAD_REQUEST_CODE, f"Bad Request: unsupported {VERSION_HEADER}: {version[:64]}"
            )
        hs.last_seen = time.monotonic()
        return hs

    def _headers(self, hs: HttpSession) -> dict[str, str]:
        return {SESSION_HEADER: hs.id}

    async def _json(self, hs: HttpSession, sink: _PostSink) -> web.Response:
        replies = sink.replies
        if not replies:
            return web.Response(status=202, headers=self._headers(hs))
        body = replies[0] if len(replies) == 1 else b"[" + b",".join(replies) + b"]"
        return web.Response(body=body, content_type="application/json", headers=self._headers(hs))

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
                BAD_REQUEST_CODE,
                "Not Acceptable: Accept must list application/json and text/event-stream",
            )
        if request.content_type != "application/json":
            return error_response(415, BAD_REQUEST_CODE, "Unsupported Media Type: use application/json")
        body = await request.read()
        if SESSION_HEADER not in request.headers:
            return await self._initialize(body, principal)
        hs = self._lookup(request, principal)
        if isinstance(hs, web.Response):
            return hs
        session = hs.session
        frame = session.parse(body)
        if not frame.messages and frame.error_reply is not None:
            return web.Response(status=400, body=frame.error_reply, content_type="application/json")
        if not frame.has_requests:
            await session.dispatch(frame, _discard)
            return web.Response(status=202, headers=self._headers(hs))
        sink = _PostSink(hs, json_only=self.settings.json_response)
        if not frame.has_async:
            # ping, lists, setLevel…: answered inline, nothing but responses can come out.
            await session.dispatch(frame, sink)
            sink.finish()
            return await self._json(hs, sink)
        if not self.settings.json_response and _has_progress_token(frame.messages):
            sink.open()
        hs.spawn(self._dispatch(session, frame, sink))
        timer = asyncio.get_running_loop().call_later(self.settings.sse_after, sink.open)
        try:
            await sink.decided.wait()
        finally:
            timer.cancel()
        stream = sink.stream
        if stream is None:
            return await self._json(hs, sink)
        head = sse_event(f"{stream.id}:0", b"", event=None)  # priming event: resumable from here
        head = b"retry: %d\n" % self.settings.retry_ms + head
        return await serve_stream(
            request,
            stream,
            after=0,
            head=head,
            settings=self.settings,
            headers=self._headers(hs),
            poll_after=self.settings.poll_after,
        )

    async def _dispatch(self, session: ServerSession, frame: Any, sink: _PostSink) -> None:
        try:
            await session.dispatch(frame, sink)
        except Exception:
            log.exception("dispatch failed")
        finally:
            sink.finish()

    async def _initialize(self, body: bytes, principal: str | None) -> web.Response:
        session = self.server.create_session(transport="http", principal=principal)
        keep = False
        try:
            frame = session.parse(body)
            if not frame.messages and frame.error_reply is not None:
                return web.Response(status=400, body=frame.error_reply, content_type="application/json")
            if not frame.is_initialize:
                return self._sessionless(session, frame)
            if len(self.sessions) >= self.settings.max_sessions and not self._evict_idle():
                return error_response(
                    503, BAD_REQUEST_CODE, "Too many sessions", headers={"Retry-After": "5"}
                )
            hs = HttpSession(session, self.settings)
            sink = _PostSink(hs, json_only=True)
            await session.dispatch(frame, sink)
            if session.protocol_version is None:  # initialize failed: no session to keep
                return await self._json_body(sink.replies, status=200)
            keep = True
            self.sessions[hs.id] = hs
            return await self._json(hs, sink)
        finally:
            if not keep:
                await session.close()

    def _sessionless(self, session: ServerSession, frame: Any) -> web.Response:
        """A request without a session that is not initialize: 400, with -32601 for unknown methods so
        `server/discover` probes (mcp 2.x) fall back to initialize at once."""
        for m in frame.messages:
            if type(m) is Request and m.method not in SYNC_METHODS and m.method not in ASYNC_METHODS:
                error = encode_error(m.id, METHOD_NOT_FOUND, f"Method not found: {m.method}")
                return web.Response(status=400, body=error, content_type="application/json")
        return error_response(400, BAD_REQUEST_CODE, f"Bad Request: {SESSION_HEADER} header is required")

    async def _json_body(self, replies: list[bytes], status: int) -> web.Response:
        body = replies[0] if len(replies) == 1 else b"[" + b",".join(replies) + b"]"
        return web.Response(status=status, body=body, content_type="application/json")

    # ------------------------------------------------------------ GET

    async def get(self, request: web.Request) -> web.StreamResponse:
        principal = self.guard.check(request)
        if isinstance(principal, web.Response):
            return principal
        if not accepts(request.headers.get("Accept", ""), "text/event-stream"):
            return error_response(406, BAD_REQUEST_CODE, "Not Acceptable: Accept must list text/event-stream")
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
        hs.session.set_default_sink(stream.push)
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
            return error_response(400, BAD_REQUEST_CODE, "Unknown Last-Event-ID (the stream is gone)")
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


def _has_progress_token(messages: Iterable[Any]) -> bool:
    for m in messages:
        params = getattr(m, "params", None)
        if getattr(m, "id", None) is not None and type(params) is dict:
            meta = params.get("_meta")
            if type(meta) is dict and meta.get("progressToken") is not None:
                return True
    return False


async def _discard(data: bytes) -> None:
    return None


# ---------------------------------------------------------------- the application


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
    if settings.legacy_sse:
        from protocol.sse_legacy import LegacySse

        legacy = LegacySse(server, settings, guard)
        legacy.mount(app)
    if extra_routes:
        app.router.add_routes(list(extra_routes))

    async def lifetime(app: web.Application) -> Any:
        reaper = asyncio.get_running_loop().create_task(mcp.reap())
        yield
        reaper.cancel()
        await mcp.close()
        if settings.legacy_sse:
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
    """Serve until cancelled. Client disconnects cancel only their request handlers, never the work."""
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
    """Blocking entry point (`python -m protocol.conformance --mode http`)."""
    try:
        asyncio.run(serve_http(server, settings))
    except KeyboardInterrupt:
        pass
    return 0
