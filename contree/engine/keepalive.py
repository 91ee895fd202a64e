"""When an idle long-lived sandbox ends: `ttl` seconds after its last activity.

Activity is what someone does with the sandbox: an exec, a stdin write, a signal, a snapshot, traffic
through one of its exposed ports. A process started in the foreground (an exec with a timeout) keeps the
sandbox busy until it ends, so a build longer than the TTL is never cut short; background processes (a
dev server nobody talks to) do not. Reading a process's status or output is not activity.

Pure bookkeeping on a monotonic clock (injectable for tests); the sandbox's supervisor sleeps until
`expires_at()` and asks `expired()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from contree.engine.changes import Changes


class IdleLease:
    def __init__(self, ttl: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        self.ttl = float(ttl)
        self._clock = clock
        self.last_active = clock()
        self._busy: dict[int, float] = {}  # token -> the foreground process's own deadline
        self._next = 1
        self._changes = Changes()

    def touch(self) -> None:
        self.last_active = self._clock()
        self._changes.notify()

    def begin(self, deadline: float) -> int:
        """A foreground process started (it ends by `deadline` at the latest); returns its token."""
        token = self._next
        self._next += 1
        self._busy[token] = deadline
        self.touch()
        return token

    def end(self, token: int) -> None:
        """That process ended: the idle time counts from now."""
        if self._busy.pop(token, None) is not None:
            self.touch()

    @property
    def busy(self) -> bool:
        return bool(self._busy)

    def expires_at(self) -> float:
        """When the sandbox ends if nothing happens (clock time); while busy, the latest a foreground
        process can end plus the TTL (an estimate: it is never reaped while busy)."""
        latest = max([self.last_active, *self._busy.values()])
        return latest + self.ttl

    def remaining(self) -> float:
        return max(0.0, self.expires_at() - self._clock())

    def expired(self) -> bool:
        return not self._busy and self._clock() >= self.expires_at()

    def idle_for(self) -> float:
        return 0.0 if self._busy else max(0.0, self._clock() - self.last_active)

    async def changed(self) -> None:
        """Returns at the next touch/begin/end (a supervisor's wake-up to recompute its sleep)."""
        await self._changes.wait()
