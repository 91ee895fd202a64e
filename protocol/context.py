"""RequestContext: what a handler may do while serving one request (progress, log, cancel, ask)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from protocol.messages import LogParams, ProgressParams, RequestId, encode_notification

if TYPE_CHECKING:
    from protocol.server import ServerSession, Sink

LEVELS: dict[str, int] = {
    "debug": 0,
    "info": 1,
    "notice": 2,
    "warning": 3,
    "error": 4,
    "critical": 5,
    "alert": 6,
    "emergency": 7,
}


class RequestContext:
    """One per request; the only door from a handler back to the client (no globals)."""

    __slots__ = ("_cancelled", "_last_progress", "_session", "_sink", "done", "progress_token", "request_id")

    def __init__(
        self,
        session: ServerSession,
        request_id: RequestId | None,
        progress_token: RequestId | None,
        sink: Sink,
    ) -> None:
        self._session = session
        self._sink = sink
        self.request_id = request_id
        self.progress_token = progress_token
        self._cancelled: asyncio.Event | None = None
        self._last_progress: float | None = None
        # Set once the response went out: nothing related to the request may follow it.
        self.done = False

    @property
    def cancelled(self) -> asyncio.Event:
        if self._cancelled is None:
            self._cancelled = asyncio.Event()
        return self._cancelled

    @property
    def session_id(self) -> str | None:
        return self._session.session_id

    @property
    def principal(self) -> str | None:
        return self._session.principal

    @property
    def protocol_version(self) -> str:
        return self._session.protocol_version or ""

    @property
    def client_capabilities(self) -> dict[str, Any]:
        return self._session.core.client_capabilities

    @property
    def client_info(self) -> dict[str, Any]:
        return self._session.core.client_info

    async def progress(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        """notifications/progress; dropped without a token, after the response, or if not increasing."""
        if self.progress_token is None or self.done:
            return
        if self._last_progress is not None and progress <= self._last_progress:
            return
        self._last_progress = progress
        if message is not None and not self._session.core.has_progress_message():
            message = None
        await self._send(
            encode_notification(
                "notifications/progress", ProgressParams(self.progress_token, progress, total, message)
            )
        )

    async def log(self, level: str, data: Any, logger: str | None = None) -> None:
        """notifications/message at `level`, if the client asked for that level (quiet until setLevel)."""
        if self.done or not self._session.core.log_enabled(level):
            return
        await self._send(encode_notification("notifications/message", LogParams(level, data, logger)))

    async def request(
        self,
        method: str,
        params: dict[str, Any],
        timeout: float = 60,  # noqa: ASYNC109 (the contract names it so)
    ) -> dict[str, Any]:
        """A server→client request (sampling/elicitation/roots) sent on this request's stream."""
        return await self._session.client_request(method, params, timeout, self._sink)

    async def close_stream(self, retry_ms: int = 100) -> bool:
        """SSE polling (SEP-1699): ask the transport to end this request's stream now; the client resumes
        with GET + Last-Event-ID and gets the rest. False when the transport cannot (stdio, JSON replies).
        A transport opts in by giving its sink an async `close_stream(retry_ms)` method."""
        closer = getattr(self._sink, "close_stream", None)
        if closer is None or self.done:
            return False
        await closer(retry_ms)
        return True

    async def notify_resource_updated(self, uri: str) -> None:
        await self._session.server.resource_updated(uri)

    async def _send(self, data: bytes) -> None:
        try:
            await self._sink(data)
        except Exception:
            # A vanished stream is not a cancellation: the work goes on (MCP-PROTOCOL.md §4.3).
            pass
