"""The long-lived sandboxes of one `LocalEngine` (`SandboxHost`): start, list, ports, snapshot, stop.

Each sandbox is an instance operation (`SandboxRun`) queued under its own kind, `sandbox`, so sandboxes
never take the slots of `run`s (`EngineLimits.sandbox_max_count` bounds them instead, and a start beyond
it is refused at once rather than queued). Everything else about an instance holds: the operation is
listed, read and cancelled like any other, and its processes are the Contree API's subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid as uuidlib
from pathlib import Path
from typing import Protocol

from contree import api
from contree.engine import spawn
from contree.engine.instance_run import InstanceRun
from contree.engine.operations import Job
from contree.engine.oplog import OpRecord
from contree.engine.parts import EngineLimits, EngineParts
from contree.engine.runtime.sandbox_init import INIT_PATH, InitUnavailable, binary_for
from contree.engine.sandbox_run import SandboxRun, ended_info
from contree.errors import BackendError, BadRequest, Conflict, NotFound, RateLimited, Unprocessable
from contree.sandbox_api import (
    MAX_WAIT,
    PortForward,
    SandboxInfo,
    SandboxRequest,
    SandboxSnapshot,
    StopSandboxRequest,
)

log = logging.getLogger(__name__)

START_PATIENCE = 120.0  # seconds a start waits for the sandbox to run (image mount, network, init)


class SandboxEngine(Protocol):
    """What the manager uses of its engine (`LocalEngine`): the parts, and how it runs an instance."""

    home: Path
    limits: EngineLimits
    _runs: dict[str, InstanceRun]

    def parts(self) -> EngineParts: ...

    async def _resolve_source(self, source: str) -> str: ...

    async def _run_instance(self, job: Job) -> None: ...

    def _dropped(self, job: Job) -> None: ...

    async def get_subprocess(self, operation_id: str, spid: int) -> api.InstanceResult: ...


class SandboxManager:
    def __init__(self, engine: SandboxEngine) -> None:
        self.engine = engine
        self.runs: dict[str, SandboxRun] = {}
        self._binary: Path | None = None
        self._binary_lock = asyncio.Lock()

    @property
    def max_count(self) -> int:
        return self.engine.limits.sandbox_max_count

    @property
    def max_ttl(self) -> int:
        return self.engine.limits.sandbox_max_ttl

    async def init_binary(self) -> Path:
        async with self._binary_lock:
            if self._binary is None:
                try:
                    self._binary = await asyncio.to_thread(binary_for, self.engine.home)
                except InitUnavailable as exc:
                    raise BackendError(str(exc), status=501) from None
            return self._binary

    # ------------------------------------------------------------------ start

    async def start(self, request: SandboxRequest) -> SandboxInfo:
        engine = self.engine
        parts = engine.parts()
        oplog, queue = parts.oplog, parts.queue
        if request.ttl_seconds > self.max_ttl:
            raise BadRequest(f"ttl_seconds must be at most {self.max_ttl} "
                             "(whoami limits.sandbox_max_ttl_seconds)")
        if len(self.runs) >= self.max_count:
            raise RateLimited(f"{len(self.runs)} sandboxes are running, the most this engine keeps "
                              f"(whoami limits.sandbox_max_count); stop one with stop_sandbox first")
        spawn_request = api.InstanceSpawnRequest(
            command=INIT_PATH, image=request.image, env=request.env, cwd=request.cwd, files=request.files,
            hostname=request.hostname, networking=api.InstanceNetworking(enabled=request.networking),
            resources_limits=request.resources_limits, disposable=True)
        spawn.validate_request(spawn_request)
        binary = await self.init_binary()
        image_uuid = await engine._resolve_source(request.image)
        for path, entry in (request.files or {}).items():
            if await asyncio.to_thread(parts.blobs.path_for, entry.uuid) is None:
                raise NotFound(f"files[{path!r}]: file {entry.uuid} not found (upload it first)")
        limits = parts.sandbox_limits.for_request(request.resources_limits)
        meta = api.metadata_from(api.OperationInstanceMetadata.from_request(spawn_request, image=image_uuid))
        meta["sandbox"] = {"ttl_seconds": request.ttl_seconds, "networking": request.networking}
        record = oplog.create("instance", image_uuid=image_uuid, metadata=meta)
        run = SandboxRun(parts, record=record, request=spawn_request, settings=request,
                         image_uuid=image_uuid, limits=limits,
                         init_binary=binary)
        engine._runs[record.uuid] = run
        self.runs[record.uuid] = run
        queue.submit(record.uuid, "sandbox", self._execute, self._dropped)
        try:
            await asyncio.wait_for(run.ready.wait(), START_PATIENCE)
        except TimeoutError:
            queue.cancel(record.uuid)
            raise Unprocessable(
                f"sandbox {record.uuid} did not start within {START_PATIENCE:.0f} s") from None
        if run.state != "running":
            await run.ended.wait()
            failed = oplog.get(record.uuid)
            raise Unprocessable(f"sandbox {record.uuid} could not start: {failed.error or failed.status}")
        return run.info()

    async def _execute(self, job: Job) -> None:
        try:
            await self.engine._run_instance(job)
        finally:
            self.runs.pop(job.op_uuid, None)

    def _dropped(self, job: Job) -> None:
        run = self.runs.pop(job.op_uuid, None)
        self.engine._dropped(job)
        if run is not None:
            run.channel.close()
            run.ready.set()
            run.ended.set()

    # ------------------------------------------------------------------ lookups

    def _record(self, sandbox_id: str) -> OpRecord:
        oplog = self.engine.parts().oplog
        try:
            record = oplog.get(_check_uuid(sandbox_id))
        except NotFound:
            raise NotFound(f"sandbox {sandbox_id} not found") from None
        if record.kind != "instance" or "sandbox" not in record.metadata:
            raise NotFound(f"sandbox {sandbox_id} not found (operation {sandbox_id} is not a sandbox)")
        return record

    def live(self, sandbox_id: str) -> SandboxRun:
        """The running sandbox, or an error that says why it is not running."""
        run = self.runs.get(sandbox_id)
        if run is not None and run.state == "running":
            return run
        if run is not None:
            raise Conflict(f"sandbox {sandbox_id} is {run.state}")
        raise Conflict(self.ended_text(self._record(sandbox_id)) or f"sandbox {sandbox_id} has stopped")

    @staticmethod
    def ended_text(record: OpRecord) -> str | None:
        """Why a sandbox that ended is not running (None: the record is not a sandbox's)."""
        if "sandbox" not in record.metadata:
            return None
        return f"sandbox {record.uuid} has stopped ({describe_stop(ended_info(record))})"

    def list(self) -> list[SandboxInfo]:
        return [run.info() for run in sorted(self.runs.values(), key=lambda r: r.record.created_at)]

    def get(self, sandbox_id: str) -> SandboxInfo:
        run = self.runs.get(sandbox_id)
        if run is not None:
            return run.info()
        return ended_info(self._record(sandbox_id))

    # ------------------------------------------------------------------ actions

    async def expose(self, sandbox_id: str, port: int) -> tuple[PortForward, bool]:
        run = self.live(sandbox_id)
        run.lease.touch()
        return await run.ports.expose(port)

    async def close_port(self, sandbox_id: str, port: int) -> None:
        await self.live(sandbox_id).ports.close(port)

    async def snapshot(self, sandbox_id: str) -> SandboxSnapshot:
        return await self.live(sandbox_id).snapshot_live()

    async def stop(self, sandbox_id: str, request: StopSandboxRequest) -> SandboxInfo:
        run = self.runs.get(sandbox_id)
        if run is None:
            info = ended_info(self._record(sandbox_id))
            raise Conflict(f"sandbox {sandbox_id} has already stopped ({describe_stop(info)})")
        if run.state == "starting":
            await run.ready.wait()
        run.stop(commit=request.commit, grace=request.grace_seconds)
        await run.ended.wait()
        return ended_info(self._record(sandbox_id))

    async def wait_subprocess(self, operation_id: str, spid: int, wait: float) -> api.InstanceResult:
        """`get_subprocess`, once the process exited or after `wait` seconds (any instance)."""
        if not 0 <= wait <= MAX_WAIT:
            raise BadRequest(f"wait must be between 0 and {MAX_WAIT} seconds")
        run = self.engine._runs.get(_check_uuid(operation_id, "operation"))
        processes = run.processes if run is not None else None
        if processes is not None and wait > 0:
            proc = processes.table.get(spid)
            if proc is not None and not proc.exited.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(proc.exited.wait()), wait)
        return await self.engine.get_subprocess(operation_id, spid)

    # ------------------------------------------------------------------ service

    def blocker(self) -> str | None:
        """Why the engine service must not exit for idleness (see contree.service.idle)."""
        running = len(self.runs)
        return f"{running} sandboxes running" if running else None


def describe_stop(info: SandboxInfo) -> str:
    reason = info.stop_reason or "stopped"
    text = {
        "idle": f"idle for ttl_seconds={info.ttl_seconds} with no exec, stdin or port traffic",
        "stopped": "stop_sandbox",
        "cancelled": "cancel_operation",
        "exited": "its init was killed",
        "engine_restart": "the engine restarted",
        "failed": f"it failed: {info.error}" if info.error else "it failed",
    }.get(reason, reason)
    return f"{text}; start a new sandbox with start_sandbox"


def _check_uuid(value: str, what: str = "sandbox") -> str:
    try:
        uuidlib.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise BadRequest(f"invalid {what} id {value!r}: expected a UUID") from None
    return value
