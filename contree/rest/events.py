"""Serving an operation's event log as SSE: keepalives, resumable ids, in-band errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from aiohttp import web

from contree import api
from contree.errors import BackendError
from contree.rest import sse

log = logging.getLogger("contree.rest")

# How long to wait for the first event before committing to 200: long enough for a backend to raise
# 404/425/410 (they come first), short enough that a follow on a quiet operation gets its headers.
FIRST_EVENT_WAIT = 0.5


async def _next(iterator: AsyncIterator[api.OperationEvent]) -> api.OperationEvent:
    return await anext(iterator)


async def _after(
    first: asyncio.Task[api.OperationEvent], iterator: AsyncIterator[api.OperationEvent]
) -> AsyncGenerator[api.OperationEvent, None]:
    """The first event (already asked for), then the rest of the iterator."""
    try:
        yield await first
    except StopAsyncIteration:
        return
    async for event in iterator:
        yield event


async def stream_events(
    request: web.Request,
    iterator: AsyncIterator[api.OperationEvent],
    *,
    keepalive: float,
    record: Callable[[], Awaitable[bytes]] | None = None,
) -> web.StreamResponse:
    """`record`: the frame written with `completion` (the last event of an operation), when asked for.

    Once the first event is there the iterator is consumed in this task, without a task per event:
    events that are already logged (a run's `exit`, `shutdown` and `completion` come together) are
    written in one step, before the engine goes on with the sandbox's teardown. Keepalives come from a
    side task; when one finds the client gone, it ends this stream (a quiet follower would otherwise wait
    for the operation's next event)."""
    first = asyncio.create_task(_next(iterator))
    events = _after(first, iterator)
    response = web.StreamResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.content_type = "text/event-stream"
    ticker: asyncio.Task[None] | None = None
    watch = _ClientWatch(asyncio.current_task())
    try:
        done, _ = await asyncio.wait({first}, timeout=FIRST_EVENT_WAIT)
        if done:
            exc = first.exception()
            if exc is not None and not isinstance(exc, StopAsyncIteration):
                # Errors before the first event keep their own status (404, 410, 425, …).
                raise exc
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        wrote = [loop.time()]
        ticker = loop.create_task(_keepalives(response, keepalive, wrote))
        ticker.add_done_callback(watch.ticker_done)
        try:
            async for event in events:
                frame = sse.event_frame(event)
                if event.type == "completion" and record is not None:
                    frame += await _record_frame(record, request)  # one write: the client wakes once
                await response.write(frame)
                wrote[0] = loop.time()
        except BackendError as exc:
            await response.write(sse.error_frames(exc.message))
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("event stream of %s failed", request.path)
            await response.write(sse.error_frames(f"internal error: {type(exc).__name__}"))
        ticker.cancel()
        await response.write_eof()
        return response
    except ConnectionResetError:
        # The client stopped reading (a follower leaves once it has seen `completion`): nothing to report.
        return response
    except asyncio.CancelledError:
        if not watch.ended:
            raise
        if watch.task is not None:
            watch.task.uncancel()  # our own cancellation: the client is gone
        return response
    finally:
        watch.streaming = False
        if ticker is not None:
            ticker.cancel()
        if not first.done():
            first.cancel()
            with contextlib.suppress(BaseException):
                await first
        with contextlib.suppress(Exception):
            await events.aclose()
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


async def _record_frame(record: Callable[[], Awaitable[bytes]], request: web.Request) -> bytes:
    try:
        return await record()
    except Exception as exc:  # the client reads the record itself when it is not there
        log.debug("record after the event stream of %s: %s", request.path, exc)
        return b""


async def _keepalives(response: web.StreamResponse, every: float, wrote: list[float]) -> None:
    """A keepalive comment whenever nothing was written for `every` seconds; returns once the client is
    gone (a write failed), else runs until cancelled."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ConnectionResetError, RuntimeError):
        while True:
            await asyncio.sleep(max(0.0, wrote[0] + every - loop.time()))
            if loop.time() - wrote[0] >= every:
                await response.write(sse.KEEPALIVE)
                wrote[0] = loop.time()


class _ClientWatch:
    """Ends a stream whose keepalive found the client gone: aiohttp leaves the handler of a closed
    connection running, and a quiet follower would wait for the operation's next event."""

    def __init__(self, task: asyncio.Task[object] | None) -> None:
        self.task = task
        self.streaming = True  # False once the stream cleans up: never cancel that
        self.ended = False

    def ticker_done(self, ticker: asyncio.Task[None]) -> None:
        if self.streaming and self.task is not None and not ticker.cancelled() and ticker.exception() is None:
            self.ended = True
            self.task.cancel()
