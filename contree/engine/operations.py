"""The operation queue: asyncio tasks gated by per-kind concurrency limits, with cooperative cancel.

A job waits in its kind's semaphore while PENDING. Cancelling a waiting job cancels its task outright (nothing
ran yet); cancelling a started job sets `job.cancelled` and the runner, which owns the sandbox, kills it and
records CANCELLED itself, so cleanup never runs inside a cancelled coroutine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Job:
    """One queued operation."""

    def __init__(self, op_uuid: str, kind: str) -> None:
        self.op_uuid = op_uuid
        self.kind = kind
        self.started = False
        self.cancelled = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


Runner = Callable[[Job], Awaitable[None]]
OnDropped = Callable[[Job], None]


class OperationQueue:
    """Runs jobs with at most `limits[kind]` of each kind at a time."""

    def __init__(self, limits: dict[str, int]) -> None:
        for kind, limit in limits.items():
            if limit < 1:
                raise ValueError(f"concurrency limit for {kind} must be >= 1, got {limit}")
        self.limits = dict(limits)
        self._sems = {kind: asyncio.Semaphore(limit) for kind, limit in limits.items()}
        self._jobs: dict[str, Job] = {}
        self._closing = False

    def submit(self, op_uuid: str, kind: str, runner: Runner, on_dropped: OnDropped) -> Job:
        """Queue `runner(job)`; `on_dropped(job)` runs if the job is cancelled before it started."""
        if self._closing:
            raise RuntimeError("the operation queue is closed")
        job = Job(op_uuid, kind)
        self._jobs[op_uuid] = job
        job.task = asyncio.create_task(self._run(job, runner, on_dropped), name=f"op-{op_uuid}")
        return job

    async def _run(self, job: Job, runner: Runner, on_dropped: OnDropped) -> None:
        try:
            try:
                await self._sems[job.kind].acquire()
            except asyncio.CancelledError:
                on_dropped(job)
                return
            try:
                job.started = True
                await runner(job)
            finally:
                self._sems[job.kind].release()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("operation %s crashed", job.op_uuid)
        finally:
            self._jobs.pop(job.op_uuid, None)

    def get(self, op_uuid: str) -> Job | None:
        return self._jobs.get(op_uuid)

    def cancel(self, op_uuid: str) -> bool:
        """Request cancellation; False when the job is not queued or running here."""
        job = self._jobs.get(op_uuid)
        if job is None:
            return False
        job.cancelled.set()
        if not job.started and job.task is not None:
            job.task.cancel()
        return True

    def running(self, kind: str | None = None) -> int:
        return sum(1 for j in self._jobs.values() if j.started and (kind is None or j.kind == kind))

    def pending(self, kind: str | None = None) -> int:
        return sum(1 for j in self._jobs.values() if not j.started and (kind is None or j.kind == kind))

    async def close(self, *, grace: float = 10.0) -> None:
        """Cancel everything and wait (bounded) for runners to clean up."""
        self._closing = True
        jobs = list(self._jobs.values())
        for job in jobs:
            self.cancel(job.op_uuid)
        tasks = [j.task for j in jobs if j.task is not None]
        if tasks:
            _done, still = await asyncio.wait(tasks, timeout=grace)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=grace)

    async def drain(self) -> None:
        """Wait until every submitted job has finished (tests and benchmarks)."""
        while self._jobs:
            tasks = [j.task for j in self._jobs.values() if j.task is not None]
            await asyncio.wait(tasks)
