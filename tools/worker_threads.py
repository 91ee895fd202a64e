"""The server's default executor: worker threads that never keep the process alive.

`asyncio.to_thread` work (SQLite, host file reads, the engine's blocking calls) runs here. A worker can be
stuck in a syscall nothing interrupts (a read from a hung network filesystem, an open that waits). When the
server is told to stop (stdin EOF, SIGTERM) its tasks are cancelled and the engine cleans up; after that,
such a worker must not hold the exit. The standard ThreadPoolExecutor joins its workers at interpreter exit
and in `asyncio.run`'s shutdown, without a bound; these workers are daemon threads and `shutdown` waits for
them `grace` seconds at most.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
_Item = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class WorkerThreads(ThreadPoolExecutor):
    """A ThreadPoolExecutor only by type (asyncio takes no other default executor): its own daemon
    workers replace the base class's, which would be joined at exit."""

    def __init__(self, max_workers: int | None = None, *, grace: float = 2.0, name: str = "worker") -> None:
        super().__init__(max_workers, thread_name_prefix=name)  # starts nothing
        self._max = max_workers or min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default
        self._grace = grace
        self._name = name
        self._jobs: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._idle_workers = threading.Semaphore(0)
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._jobs.put((future, fn, args, kwargs))
            if not self._idle_workers.acquire(blocking=False) and len(self._workers) < self._max:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}_{len(self._workers)}", daemon=True
                )
                thread.start()
                self._workers.append(thread)
        return future

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            del item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                    del exc
                else:
                    future.set_result(result)
                    del result
            del future
            self._idle_workers.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._workers)
        if cancel_futures:
            while True:
                try:
                    item = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in threads:
            self._jobs.put(None)
        if not wait:
            return
        deadline = time.monotonic() + self._grace
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            log.warning("not waiting for %d worker thread(s) stuck in a blocking call", len(stuck))
