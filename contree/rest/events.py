"""Serving an operation's event log as SSE: keepalives, resumable ids, in-band errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

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


async def stream_events(
    request: web.Request, iterator: AsyncIterator[api.OperationEvent], *, keepalive: float
) -> web.StreamResponse:
    first = asyncio.create_task(_next(iterator))
    pending: asyncio.Task[api.OperationEvent] | None = first
    response = web.StreamResponse(headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.content_type = "text/event-stream"
    try:
        done, _ = await asyncio.wait({first}, timeout=FIRST_EVENT_WAIT)
        if done:
            exc = first.exception()
            if exc is not None:
                pending = None
                if not isinstance(exc, StopAsyncIteration):
                    # Errors before the first event keep their own status (404, 410, 425, …).
                    raise exc
        await response.prepare(request)
        while pending is not None:
            done, _ = await asyncio.wait({pending}, timeout=keepalive)
            if not done:
                await response.write(sse.KEEPALIVE)
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                pending = None
                break
            except BackendError as exc:
                pending = None
                await response.write(sse.error_frames(exc.message))
                break
            except Exception as exc:
                pending = None
                log.exception("event stream of %s failed", request.path)
                await response.write(sse.error_frames(f"internal error: {type(exc).__name__}"))
                break
            await response.write(sse.event_frame(event))
            pending = asyncio.create_task(_next(iterator))
        await response.write_eof()
        return response
    except ConnectionResetError:
        # The client stopped reading (a follower leaves once it has seen `completion`): nothing to report.
        return response
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
