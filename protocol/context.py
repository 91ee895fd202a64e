"""RequestContext: what a handler may do while serving one request (progress, log, ask, become a task).

It holds no protocol rule and no asyncio: every call goes to the shell (`protocol.server.ServerSession`,
through the `Host` protocol below), which asks the sans-IO core what may be sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from protocol.types import RequestId

if TYPE_CHECKING:
    from protocol.events import Call


class Host(Protocol):
    """What the shell offers a RequestContext (implemented by `ServerSession`)."""

    @property
    def session_id(self) -> str | None: ...
    @property
    def principal(self) -> str | None: ...

    def client_capabilities(self, call: Call) -> dict[str, Any]: ...
    def client_info(self, call: Call) -> dict[str, Any]: ...
    async def send_progress(
        self, call: Call, progress: float, total: float | None, message: str | None
    ) -> None: ...
    async def send_log(self, call: Call, level: str, data: Any, logger: str | None) -> None: ...
    async def ask(
        self,
        call: Call,
        requests: dict[str, tuple[str, dict[str, Any]]],
        timeout: float,  # noqa: ASYNC109
    ) -> dict[str, dict[str, Any]]: ...
    async def close_stream(self, call: Call, retry_ms: int) -> bool: ...
    async def become_task(self, call: Call, status: str | None) -> bool: ...
    def is_task(self, call: Call) -> bool: ...
    def cancel_requested(self, call: Call) -> bool: ...
    async def resource_updated(self, uri: str) -> None: ...


_SHORT = {"elicitation/create": "elicit", "sampling/createMessage": "sample", "roots/list": "roots"}


class RequestContext:
    """One per request; the only door from a handler back to the client (no globals)."""

    __slots__ = ("_asked", "_host", "call")

    def __init__(self, host: Host, call: Call) -> None:
        self._host = host
        self.call = call
        self._asked = 0  # default input-request keys are numbered in the order the handler asks

    @property
    def request_id(self) -> RequestId:
        return self.call.id

    @property
    def progress_token(self) -> RequestId | None:
        return self.call.progress_token

    @property
    def session_id(self) -> str | None:
        return self._host.session_id

    @property
    def principal(self) -> str | None:
        return self._host.principal

    @property
    def protocol_version(self) -> str:
        return self.call.version

    @property
    def stateless(self) -> bool:
        """True for a 2026-07-28 request (per-request metadata, input-required results, tasks)."""
        return self.call.modern

    @property
    def client_capabilities(self) -> dict[str, Any]:
        return self._host.client_capabilities(self.call)

    @property
    def client_info(self) -> dict[str, Any]:
        return self._host.client_info(self.call)

    @property
    def is_task(self) -> bool:
        """True once this call runs as a task (its caller polls tasks/get instead of waiting)."""
        return self._host.is_task(self.call)

    @property
    def cancel_requested(self) -> bool:
        """True when the client asked to stop this request (notifications/cancelled, tasks/cancel), as
        opposed to the handler being cancelled because its session closed or its stream dropped: work
        the request started should then be stopped too, not merely left behind."""
        return self._host.cancel_requested(self.call)

    async def progress(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        """notifications/progress (a task's statusMessage once the call became a task); dropped without a
        token, after the response, or when not increasing."""
        await self._host.send_progress(self.call, progress, total, message)

    async def log(self, level: str, data: Any, logger: str | None = None) -> None:
        """notifications/message at `level`, if the client asked for that level (quiet otherwise)."""
        await self._host.send_log(self.call, level, data, logger)

    async def request(
        self,
        method: str,
        params: dict[str, Any],
        timeout: float = 60,  # noqa: ASYNC109 (the contract names it so)
        *,
        key: str | None = None,
    ) -> dict[str, Any]:
        """Ask the client (sampling/createMessage, elicitation/create, roots/list) and return its answer.

        Handshake era: a server→client request on this request's stream. 2026-07-28: the call ends with an
        input_required result naming `key` and is retried with the answer, so the handler runs again and
        this call returns the answer (a handler must ask the same questions in the same order). In a task:
        the task waits in input_required until tasks/update brings the answer."""
        if key is None:
            self._asked += 1
            key = f"{_SHORT.get(method, 'input')}-{self._asked}"
        answers = await self._host.ask(self.call, {key: (method, params)}, timeout)
        return answers[key]

    async def request_many(
        self,
        requests: dict[str, tuple[str, dict[str, Any]]],
        timeout: float = 60,  # noqa: ASYNC109
    ) -> dict[str, dict[str, Any]]:
        """Several client requests at once (key → (method, params)); answers by key."""
        return await self._host.ask(self.call, requests, timeout)

    async def run_as_task(self, status: str | None = None) -> bool:
        """Answer the request now with a task (2026-07-28, when the client declared the Tasks extension and
        the tool supports tasks) and keep running; False when the call cannot become a task."""
        return await self._host.become_task(self.call, status)

    async def close_stream(self, retry_ms: int = 100) -> bool:
        """SSE polling (SEP-1699): ask the transport to end this request's stream now; the client resumes
        with GET + Last-Event-ID and gets the rest. False when the transport cannot (stdio, JSON replies)."""
        return await self._host.close_stream(self.call, retry_ms)

    async def notify_resource_updated(self, uri: str) -> None:
        await self._host.resource_updated(uri)
