"""When the engine service may exit on its own: nothing depends on it for `idle_exit` seconds.

A blocker is a callable naming why the service is busy right now (or None). The service checks the
attached clients and the engine's queued and running operations; `engine_blockers` is the one place
engine-side reasons are listed, so long-lived sandboxes (which outlive an operation) add theirs there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

Blocker = Callable[[], str | None]


def engine_blockers(engine: Any) -> list[Blocker]:
    """Reasons inside the engine that keep the service alive: operations queued or running, and
    long-lived sandboxes that are still up (they end by their idle TTL, not with their clients)."""

    def operations() -> str | None:
        queue = engine.queue
        if queue is None:
            return None
        running, pending = queue.running(), queue.pending()
        if not running and not pending:
            return None
        return f"{running} running and {pending} queued operations"

    def sandboxes() -> str | None:
        manager = getattr(engine, "sandboxes", None)
        return manager.blocker() if manager is not None else None

    return [operations, sandboxes]


class IdleClock:
    """Tracks since when no blocker has fired; `expired()` once that lasted `idle_exit` seconds."""

    def __init__(
        self, blockers: list[Blocker], idle_exit: float | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.blockers = blockers
        self.idle_exit = idle_exit
        self._clock = clock
        self._idle_since: float | None = clock()

    def reasons(self) -> list[str]:
        return [reason for reason in (blocker() for blocker in self.blockers) if reason]

    def check(self) -> list[str]:
        """Re-evaluate the blockers (call it periodically); returns the current reasons."""
        reasons = self.reasons()
        if reasons:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = self._clock()
        return reasons

    @property
    def idle_for(self) -> float | None:
        return None if self._idle_since is None else self._clock() - self._idle_since

    def expired(self) -> bool:
        idle_for = self.idle_for
        return self.idle_exit is not None and idle_for is not None and idle_for >= self.idle_exit
