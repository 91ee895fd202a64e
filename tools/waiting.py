"""Following an operation to its end: the event stream first (reconnecting with the last event id),
status polling as the fallback. Every wait has a deadline; nothing here cancels an operation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from contree import api
from contree.backend import Backend, RecordFollower
from contree.errors import BackendError, Gone, TooEarly, Unavailable

log = logging.getLogger(__name__)

EventHook = Callable[[api.OperationEvent], Awaitable[None]]
POLL_INTERVAL = 0.5


async def poll_until_terminal(backend: Backend, operation_id: str, deadline: float) -> api.OperationResponse:
    """Poll the status until terminal or `deadline` (loop time); returns the last record seen."""
    loop = asyncio.get_running_loop()
    while True:
        op = await backend.get_operation(operation_id)
        if op.status in api.TERMINAL_STATUSES or loop.time() >= deadline:
            return op
        await asyncio.sleep(min(POLL_INTERVAL, max(0.0, deadline - loop.time())))


async def follow_until_terminal(
    backend: Backend, operation_id: str, deadline: float, on_event: EventHook | None = None
) -> api.OperationResponse:
    """Stream events (for progress) until `completion`, then read the final record.

    Returns the last operation record seen, terminal unless the deadline passed first. Stream errors
    (425/410/5xx, dropped connections) resume from the last event id; a backend without an event log
    for this operation kind is polled instead. A backend whose stream ends with the record (the engine
    service's `follow_to_end`) saves the request for it.
    """
    loop = asyncio.get_running_loop()
    follower = backend if isinstance(backend, RecordFollower) else None
    last_id: int | None = None
    failures = 0
    while loop.time() < deadline and failures < 5:
        completed = False
        record: api.OperationResponse | None = None
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                stream = (
                    follower.follow_to_end(operation_id, since=last_id)
                    if follower is not None
                    else backend.events(operation_id, follow=True, since=last_id)
                )
                async for event in stream:
                    if isinstance(event, api.OperationResponse):
                        record = event
                        break
                    last_id = event.id
                    if on_event is not None:
                        await on_event(event)
                    if event.type == "completion":
                        completed = True
                        if follower is None:
                            break  # else the record follows
        except TimeoutError:
            break
        except (TooEarly, Gone, Unavailable) as exc:
            failures += 1
            await asyncio.sleep(min(exc.retry_after or POLL_INTERVAL, 5.0))
            continue
        except (BackendError, NotImplementedError, OSError) as exc:
            # includes 404: CANCELLED operations drop their event log; get_operation below tells the truth
            log.debug("event stream of %s unavailable (%s); polling", operation_id, exc)
            failures += 1
        if record is not None and record.status in api.TERMINAL_STATUSES:
            return record
        op = await backend.get_operation(operation_id)
        if op.status in api.TERMINAL_STATUSES:
            return op
        if completed:  # completion seen but the record lags: poll briefly
            return await poll_until_terminal(backend, operation_id, deadline)
        if failures >= 2:
            break
        await asyncio.sleep(POLL_INTERVAL)
    return await poll_until_terminal(backend, operation_id, deadline)


class OutputTail:
    """The last few output lines of a run, for progress messages."""

    def __init__(self, keep: int = 3, width: int = 200) -> None:
        self.keep = keep
        self.width = width
        self.lines: list[str] = []
        self._partial = ""

    def feed(self, text: str) -> None:
        text = self._partial + text
        parts = text.split("\n")
        self._partial = parts.pop()[-self.width :]
        for line in parts:
            if line.strip():
                self.lines.append(line[: self.width])
        del self.lines[: -self.keep]

    def render(self) -> str:
        lines = [*self.lines, self._partial] if self._partial.strip() else list(self.lines)
        return "\n".join(lines[-self.keep :])
