"""`Changes`: a broadcast wake-up for whoever follows a changing thing (an event log, the operation
list, a sandbox's idle lease)."""

from __future__ import annotations

import asyncio


class Changes:
    """`wait()` returns at the first `notify()` after it began; every waiter wakes.

    The first waiter makes the Event, so a follower may be built outside a running loop."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def notify(self) -> None:
        event, self._event = self._event, None
        if event is not None:
            event.set()

    async def wait(self) -> None:
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()
