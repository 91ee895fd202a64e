"""Server-Sent Events for the HTTP transports: framing, numbered streams with a bounded replay buffer, and
serving a stream to one HTTP response at a time (keepalives, `Last-Event-ID` resumption, SEP-1699 polling).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Mapping

from aiohttp import web

from protocol.http_guard import HttpSettings

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",  # nginx would otherwise hold events back
}


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
