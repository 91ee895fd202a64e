"""The life of one instance operation: its snapshot, its sandbox, spid 1, the commit, the teardown.

`InstanceRun.execute()` is the queue's runner. Its steps: plan spid 1 (`spawn.plan_for`); stage the
sandbox (bundle, cgroup, network) while the snapshot is prepared (`snapshots.prepare`); launch; supervise
until spid 1 exits, the deadline, a cancel or a full layer; record the result; commit the snapshot into
the result image (unless disposable); finish the operation (`OperationLog.finish`); tear down. It owns
every resource it creates (snapshot, sandbox, layer pins) and releases them in `finally`, whatever
happened: exit, timeout, cancel or a failure to start. Processes exec'd into the running sandbox
(spid ≥ 2) are `Processes`'.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from typing import Any

import msgspec

from contree import api
from contree.engine import spawn
from contree.engine.eventlog import EventLog
from contree.engine.operations import Job
from contree.engine.oplog import ASSIGNED, CANCELLED, EXECUTING, FAILED, SUCCESS, OpRecord
from contree.engine.parts import EngineParts
from contree.engine.processes import Process, Processes, init_event, network_event, result_from_exit
from contree.engine.runtime.handles import RunningSandbox, SandboxExit, SandboxSpec, StagedSandbox
from contree.engine.runtime.limits import SandboxLimits
from contree.engine.snapshots import find_executable
from contree.engine.spawn import SpawnFailed
from contree.engine.storage import upperfs
from contree.engine.storage.store import ImageRecord
from contree.engine.storage.upperfs import LayerTooLarge
from contree.errors import Conflict

log = logging.getLogger(__name__)

# The kernel refuses writes beyond max_layer_bytes (upperfs); this only ends a run that ran into the
# limit early instead of at its timeout (it fails either way). statvfs: microseconds per check.
LAYER_POLL = 0.25

Outcome = tuple[api.TerminalStatus, str | None]


class InstanceRun:
    """One instance operation from ASSIGNED to its `completion` event and the sandbox teardown."""

    MAIN_FROM_IMAGE = True  # spid 1's executable is the image's (a long-lived sandbox brings its own)

    def __init__(
        self,
        parts: EngineParts,
        *,
        record: OpRecord,
        request: api.InstanceSpawnRequest,
        image_uuid: str,
        timeout: int,
        limits: SandboxLimits | None = None,
    ) -> None:
        self.parts = parts
        self.limits = limits or SandboxLimits()
        self.record = record
        self.request = request
        self.image_uuid = image_uuid
        self.timeout = timeout
        self.deadline = 0.0
        self.layer_error: str | None = None
        asked = request.resources_limits
        self.max_layer_bytes, layer_limit = upperfs.limit_for(
            asked.max_layer_bytes if asked is not None else api.DEFAULT_MAX_LAYER_BYTES,
            self.limits.memory_bytes, parts.layer_cap)
        self.snapshot = parts.snapshots.snapshot(record.uuid, self.max_layer_bytes, layer_limit)
        self.processes: Processes | None = None  # once the sandbox runs: exec, kill and stdin need it

    @property
    def started(self) -> bool:
        return self.processes is not None

    # ------------------------------------------------------------------ main flow

    async def execute(self, job: Job) -> None:
        store = self.parts.store
        image = store.get(self.image_uuid)
        with store.pinned(image.layers):
            try:
                await self._run(job, image)
                # The start of the teardown (cgroup rmdir, unbind, bundle removal) is synchronous and
                # takes ~1 ms; yield once so followers of the event log see `completion` before it.
                await asyncio.sleep(0)
            finally:
                # The outcome is recorded and announced first; tearing the sandbox down (runtime state,
                # cgroup, netns, scratch dirs) happens after, off the caller's latency. A crash in
                # between leaves only what start-up recovery removes anyway.
                await self._release()

    async def _run(self, job: Job, image: ImageRecord) -> None:
        """Everything up to the `completion` event."""
        oplog = self.parts.oplog
        record = self.record
        reason: api.ShutdownReason = "job_complete"
        outcome: Outcome = (FAILED, "engine error: the run ended before it was finished")
        try:
            try:
                plan = spawn.plan_for(self.request, spawn.env_dict(image.config.env), image.config.cwd or "/")
                staged = await self._prepare_and_stage(image, plan)
                oplog.transition(record, EXECUTING, save=False)  # saved while the runtime starts
                self.deadline = time.monotonic() + self.timeout
                processes, main = await self._start_main(plan, staged, image)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise SpawnFailed(spawn.spawn_error(exc)) from exc
            waiter = asyncio.create_task(processes.sandbox.wait())
            reason = await self._supervise(job, processes, waiter, main)
            info = await waiter
            await processes.main_exited(main, info)
            await processes.stop_execd()
            if self.layer_error is None:
                self.layer_error = self.parts.snapshots.full(self.snapshot)
            result = result_from_exit(main, info)
            result.limits = self._applied_limits()
            self._account(info)
            record.metadata["result"] = msgspec.to_builtins(result)
            if job.cancelled.is_set() and reason == "signal":
                outcome = (CANCELLED, "cancelled")
            elif self.layer_error is not None:
                outcome = (FAILED, self.layer_error)
            else:
                await self._commit(image, plan)
                outcome = (SUCCESS, None)
        except SpawnFailed as exc:
            reason = "spawn_failed"
            outcome = (FAILED, str(exc))
            message = api.encode_event_stream(f"{exc}\n".encode())
            oplog.open_log(record.uuid).append("stderr", message, 0)
        except LayerTooLarge as exc:
            outcome = (FAILED, exc.message)
        except asyncio.CancelledError:
            outcome = (CANCELLED, "cancelled")
            raise
        except Exception as exc:
            log.exception("instance %s failed", record.uuid)
            outcome = (FAILED, f"engine error: {type(exc).__name__}: {exc}")
        finally:
            status, error = outcome
            oplog.finish(record, status, error=error, reason=reason)

    # ------------------------------------------------------------------ preparation

    async def _prepare_and_stage(self, image: ImageRecord, plan: spawn.ProcessPlan) -> StagedSandbox:
        """Prepare the snapshot while the runtime stages the sandbox (bundle, cgroup, network).

        The staging goes first, up to its first real wait (the network setup's `ip` processes); the
        snapshot is prepared meanwhile. That runs inline when nothing is injected: ~0.5 ms of syscalls,
        cheaper than a thread hop, and a worker thread would contend with the staging for the GIL.
        Injected files (any size) are copied in a worker thread.
        """
        runtime = self.parts.runtime
        self.parts.oplog.transition(self.record, ASSIGNED, save=False)  # in memory only
        stage = asyncio.ensure_future(runtime.stage(self._sandbox_spec(plan)))
        loop = asyncio.get_running_loop()
        mount: asyncio.Future[None] = loop.create_future()
        cancelled = False
        try:
            await asyncio.sleep(0)  # let the staging start
        except asyncio.CancelledError:
            cancelled = True
            mount.set_result(None)  # nothing was mounted
        else:
            if self.request.files:
                mount = loop.run_in_executor(None, self._prepare, image, plan)
            else:
                try:
                    self._prepare(image, plan)
                    mount.set_result(None)
                except Exception as exc:
                    mount.set_exception(exc)
        both: set[asyncio.Future[Any]] = {mount, stage}
        while not (mount.done() and stage.done()):
            try:
                await asyncio.wait(both)
            except asyncio.CancelledError:
                # Settle both first: the mount thread cannot be interrupted, and a staged cgroup or
                # netns must not be left behind.
                cancelled = True
        failure = mount.exception() or stage.exception()
        if cancelled or failure is not None:
            if stage.exception() is None:
                await runtime.abort(stage.result())
            if cancelled:
                raise asyncio.CancelledError
            if failure is not None:
                raise failure
        return stage.result()

    def _sandbox_spec(self, plan: spawn.ProcessPlan) -> SandboxSpec:
        request = self.request
        stdin_data, keep_open = spawn.initial_stdin(request.stdin)
        return SandboxSpec(
            sandbox_id=self.record.uuid,
            rootfs=self.snapshot.rootfs,
            argv=plan.argv,
            env=[f"{k}={v}" for k, v in plan.env.items()],
            cwd=plan.cwd,
            uid=plan.uid,
            gid=plan.gid,
            hostname=request.hostname,
            networking=request.networking.enabled if request.networking is not None else True,
            stdin=bool(stdin_data) or keep_open,
            memory_bytes=self.limits.memory_bytes,
            cpu_quota=self.limits.cpus,
            pids_limit=self.limits.pids,
        )

    def _prepare(self, image: ImageRecord, plan: spawn.ProcessPlan) -> None:
        """The snapshot, with the request's files and cwd; spid 1's program must be in it."""
        request = self.request
        self.parts.snapshots.prepare(self.snapshot, image, files=request.files or {}, cwd=plan.cwd,
                                     uid=request.uid, gid=request.gid)
        path = plan.env.get("PATH", spawn.DEFAULT_PATH)
        if self.MAIN_FROM_IMAGE and not find_executable(self.snapshot.rootfs, plan.argv[0], path, plan.cwd):
            what = "shell" if plan.shell else "executable"
            raise SpawnFailed(f"{what} {plan.argv[0]!r} not found in the image (or not executable)")

    # ------------------------------------------------------------------ running

    async def _start_main(
        self, plan: spawn.ProcessPlan, staged: StagedSandbox, image: ImageRecord
    ) -> tuple[Processes, Process]:
        parts = self.parts
        request = self.request
        record = self.record
        sandbox = await parts.runtime.launch(staged)
        events = parts.oplog.open_log(record.uuid)
        processes = self.processes = self._make_processes(sandbox, events, image, plan)
        parts.watchdog.deadline(sandbox.sandbox_id, self.deadline)  # ends it even if this process cannot
        # While the runtime starts the sandbox (milliseconds this process would otherwise idle):
        parts.oplog.save(record)
        uname = platform.uname()
        events.append("init", init_event(
            started_at=record.started_at, runtime_path=str(self.snapshot.path), init_pid=sandbox.pid,
            hostname=request.hostname, kernel=f"{uname.release} {uname.version}", machine=uname.machine), 0)
        if staged.spec.networking:
            events.append("network", network_event(sandbox.network), 0)
        stdin_data, keep_open = spawn.initial_stdin(request.stdin)
        main = processes.register(1, sandbox, sandbox.pid, plan, request.truncate_output_at)
        processes.background(processes.feed_stdin(main, stdin_data, close=not keep_open))
        return processes, main

    def _make_processes(self, sandbox: RunningSandbox, events: EventLog, image: ImageRecord,
                        plan: spawn.ProcessPlan) -> Processes:
        return Processes(sandbox, events, deadline=self.deadline, image_env=spawn.env_dict(image.config.env),
                         main_cwd=plan.cwd)

    async def _supervise(
        self, job: Job, processes: Processes, waiter: asyncio.Task[SandboxExit], main: Process
    ) -> api.ShutdownReason:
        """Wait for spid 1 to exit, the deadline, a cancel or an oversized layer; returns the reason."""
        cancel = asyncio.create_task(job.cancelled.wait())
        oversize = asyncio.create_task(self._watch_layer_full())
        try:
            remaining = max(0.0, self.deadline - time.monotonic())
            done, _ = await asyncio.wait(
                {waiter, cancel, oversize}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if waiter in done:
                return "job_complete"
            await processes.sandbox.kill()
            if cancel in done:
                return "signal"
            if oversize in done:
                self.layer_error = oversize.result()
                return "signal"
            main.timed_out = True
            return "timeout"
        finally:
            cancel.cancel()
            oversize.cancel()

    async def _watch_layer_full(self) -> str:
        """Return the layer error once the run's upper filesystem is full (see LAYER_POLL)."""
        while True:
            await asyncio.sleep(LAYER_POLL)
            error = self.parts.snapshots.full(self.snapshot)
            if error is not None:
                return error

    def _applied_limits(self) -> api.InstanceLimits:
        lim = self.limits
        return api.InstanceLimits(memory_bytes=lim.memory_bytes, cpus=lim.cpus, pids=lim.pids,
                                  max_layer_bytes=self.max_layer_bytes)

    def _account(self, info: SandboxExit) -> None:
        record = self.record
        record.consumed_cpu = round(float(info.user_time + info.system_time), 6)
        if info.cpu_usage_ns:
            record.consumed_cpu = round(info.cpu_usage_ns / 1e9, 6)
        record.consumed_memory = int(info.max_rss_kb)
        if info.memory_peak_bytes:
            record.consumed_memory = max(record.consumed_memory, int(info.memory_peak_bytes) // 1024)

    async def _commit(self, image: ImageRecord, plan: spawn.ProcessPlan) -> None:
        """The snapshot becomes the result image (or the input image is reused when nothing changed)."""
        request = self.request
        record = self.record
        if request.disposable:
            record.result_image_uuid = None
            record.image_size = None
            return
        config = image.config
        if request.preserve_env:
            env = spawn.preserved_env(spawn.env_dict(config.env), request.env)
            config = msgspec.structs.replace(config, env=[f"{k}={v}" for k, v in env.items()])
        if request.preserve_cwd:
            config = msgspec.structs.replace(config, cwd=plan.cwd)
        # One thread hop for unmount + commit: both are on the latency path.
        snapshots = self.parts.snapshots
        child = await asyncio.to_thread(snapshots.commit, self.snapshot, image, record.uuid, config)
        if child is None:
            record.result_image_uuid = image.uuid
            record.image_size = 0
        else:
            record.result_image_uuid = child.uuid
            record.image_size = child.size

    async def _release(self) -> None:
        processes = self.processes
        if processes is not None:
            processes.cancel()
            try:
                await processes.sandbox.cleanup()
            except Exception:
                log.exception("sandbox cleanup of %s failed", self.record.uuid)
            self.parts.watchdog.done(processes.sandbox_id)
        await asyncio.to_thread(self.parts.snapshots.release, self.snapshot)

    # ------------------------------------------------------------------ the API's subprocesses

    def _running(self) -> Processes:
        if self.processes is None:
            raise Conflict(f"operation {self.record.uuid} is not running")
        return self.processes

    async def exec(self, spec: api.ExecSpec) -> int:
        return await self._running().exec(spec)

    async def kill(self, spid: int, sig: str | int | None) -> None:
        await self._running().kill(spid, sig)

    async def write_stdin(self, spid: int, data: bytes, *, close: bool) -> None:
        await self._running().write_stdin(spid, data, close=close)
