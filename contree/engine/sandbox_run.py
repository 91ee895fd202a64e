"""The life of one long-lived sandbox: an instance operation whose main process is `contree-init`.

`SandboxRun` is an `InstanceRun` (same preparation, limits, event log, output spill, teardown and
commit) with four differences:

* spid 1 is the engine's init (`sandbox_init`), so the sandbox runs until it is stopped, cancelled or
  idle for `ttl_seconds` (`keepalive.IdleLease`) instead of until a command ends or a timeout;
* processes (spid ≥ 2) are started by that init: a message and a fork instead of a `crun exec`, each
  with a timeout of its own when it runs in the foreground (`ExecSpec.timeout`);
* ports are forwarded to the host's loopback (`portfwd`), and the filesystem can be snapshotted while
  the sandbox runs (its cgroup frozen for the copy);
* `stop()` ends it gracefully (SIGTERM to every process, SIGKILL after a grace period) and may commit
  its filesystem as a new image, like a `disposable=false` run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal as signals
import time
from pathlib import Path

import msgspec

from contree import api
from contree.engine import spawn
from contree.engine.eventlog import EventLog
from contree.engine.instance_run import InstanceRun
from contree.engine.keepalive import IdleLease
from contree.engine.operations import Job
from contree.engine.oplog import EXECUTING, OpRecord
from contree.engine.parts import EngineParts
from contree.engine.processes import Process, Processes, spawn_event
from contree.engine.runtime.cgroups import CgroupManager
from contree.engine.runtime.handles import RunningSandbox, SandboxExit, SandboxSpec, StagedSandbox
from contree.engine.runtime.limits import SandboxLimits
from contree.engine.runtime.portfwd import PortForwards
from contree.engine.runtime.sandbox_init import (
    INIT_PATH,
    FailedToStart,
    InitChannel,
    InitGone,
    InitProcess,
    bind_mount,
)
from contree.engine.spawn import SpawnFailed
from contree.engine.storage import upperfs
from contree.engine.storage.layertree import remove_tree
from contree.engine.storage.store import ImageRecord
from contree.errors import Conflict
from contree.sandbox_api import SandboxInfo, SandboxRequest, SandboxSnapshot, SandboxState
from contree.timeparse import isoformat

log = logging.getLogger(__name__)

WATCHDOG_SLACK = 120.0  # seconds the watchdog's deadline stays ahead of the idle expiry
MAX_COMMANDS = 100  # commands remembered (the first ones) for the lineage of a sandbox's images
COMMAND_CHARS = 200
FREEZE_TIMEOUT = 5.0


class SandboxRun(InstanceRun):
    MAIN_FROM_IMAGE = False

    def __init__(
        self,
        parts: EngineParts,
        *,
        record: OpRecord,
        request: api.InstanceSpawnRequest,
        settings: SandboxRequest,
        image_uuid: str,
        limits: SandboxLimits | None,
        init_binary: Path,
    ) -> None:
        super().__init__(parts, record=record, request=request, image_uuid=image_uuid,
                         timeout=settings.ttl_seconds, limits=limits)
        self.settings = settings
        self.init_binary = init_binary
        self.lease = IdleLease(settings.ttl_seconds)
        self.channel = InitChannel()
        self.ports = PortForwards(lambda: self.channel.pidfd, self.lease.touch)
        self.state: SandboxState = "starting"
        self.stop_reason: str | None = None
        self.ready = asyncio.Event()  # running, or ended without ever running
        self.ended = asyncio.Event()
        self.commands: list[str] = []
        self.started_commands = 0
        self.snapshots: list[str] = []
        self.snapshot_commands: dict[str, int] = {}  # image -> processes started before it was taken
        self._stop_request: tuple[bool, float] | None = None  # (commit, grace)
        self._stop_wake = asyncio.Event()
        self._lock = asyncio.Lock()  # a snapshot and the stop never overlap
        self._watchdog_deadline = 0.0

    # ------------------------------------------------------------------ life

    async def execute(self, job: Job) -> None:
        try:
            await super().execute(job)
        finally:
            self.state = "stopped"
            await self._close_ports()
            self.channel.close()
            self.ready.set()
            self.ended.set()

    def _sandbox_spec(self, plan: spawn.ProcessPlan) -> SandboxSpec:
        spec = super()._sandbox_spec(plan)
        return msgspec.structs.replace(spec, argv=[INIT_PATH], stdin=False,
                                       pass_fds=[self.channel.child_fd()],
                                       extra_mounts=[bind_mount(self.init_binary)])

    def _make_processes(self, sandbox: RunningSandbox, events: EventLog, image: ImageRecord,
                        plan: spawn.ProcessPlan) -> Processes:
        return SandboxProcesses(self, sandbox, events, deadline=self.deadline,
                                image_env=spawn.env_dict(image.config.env), main_cwd=plan.cwd)

    async def _start_main(
        self, plan: spawn.ProcessPlan, staged: StagedSandbox, image: ImageRecord
    ) -> tuple[Processes, Process]:
        try:
            started = await super()._start_main(plan, staged, image)
        finally:
            self.channel.child_spawned()  # the runtime has its copy (or failed): ours would keep it open
        try:
            await self.channel.hello()
        except InitGone as exc:
            raise SpawnFailed(f"the sandbox's init did not start: {exc}") from None
        self.state = "running"
        self.lease.touch()
        self.ready.set()
        return started

    async def _supervise(
        self, job: Job, processes: Processes, waiter: asyncio.Task[SandboxExit], main: Process
    ) -> api.ShutdownReason:
        """Until spid 1 ends, a cancel, an oversized layer, a stop request or the idle TTL."""
        cancel = asyncio.create_task(job.cancelled.wait())
        oversize = asyncio.create_task(self._watch_layer_full())
        try:
            while True:
                self._tell_watchdog(processes.sandbox_id)
                changed = asyncio.create_task(self.lease.changed())
                stop = asyncio.create_task(self._stop_wake.wait())
                try:
                    done, _ = await asyncio.wait({waiter, cancel, oversize, changed, stop},
                                                 timeout=self.lease.remaining() + 0.05,
                                                 return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                    stop.cancel()
                if waiter in done:
                    self.stop_reason = self.stop_reason or "exited"
                    return "job_complete"
                if cancel in done:
                    self.stop_reason = "cancelled"
                    await self._close_ports()
                    await processes.sandbox.kill()
                    return "signal"
                if oversize in done:
                    self.layer_error = oversize.result()
                    self.stop_reason = "failed"
                    await self._close_ports()
                    await processes.sandbox.kill()
                    return "signal"
                if self._stop_request is not None:
                    commit, grace = self._stop_request
                    self.stop_reason = "stopped"
                    if commit:
                        self.request = msgspec.structs.replace(self.request, disposable=False)
                    await self._wind_down(processes, grace)
                    return "stopped"
                if self.lease.expired():
                    self.stop_reason = "idle"
                    await self._wind_down(processes, 2.0)
                    return "idle_timeout"
        finally:
            cancel.cancel()
            oversize.cancel()
            self._record_sandbox()

    async def _wind_down(self, processes: Processes, grace: float) -> None:
        """SIGTERM to every process, SIGKILL to what still runs after `grace` seconds."""
        self.state = "stopping"
        await self._close_ports()
        self.channel.signal_all(signals.SIGTERM)
        running = [p.exited.wait() for p in processes.table.values()
                   if p.spid != 1 and not p.exited.is_set()]
        if running and grace > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*running), grace)
        await processes.sandbox.kill()

    async def _close_ports(self) -> None:
        try:
            await self.ports.close_all()
        except Exception:
            log.exception("closing the ports of sandbox %s", self.record.uuid)

    def _tell_watchdog(self, sandbox_id: str) -> None:
        """The watchdog kills what outlives its deadline if this process cannot: keep it ahead."""
        wanted = time.monotonic() + self.lease.remaining() + WATCHDOG_SLACK
        if wanted > self._watchdog_deadline + WATCHDOG_SLACK / 4:
            self._watchdog_deadline = wanted
            self.deadline = wanted
            self.parts.watchdog.deadline(sandbox_id, wanted)

    def stop(self, *, commit: bool, grace: float) -> None:
        if self._stop_request is None:
            self._stop_request = (commit, grace)
        self._stop_wake.set()

    # ------------------------------------------------------------------ processes

    def running_processes(self) -> SandboxProcesses:
        processes = self.processes
        main = processes.table.get(1) if processes is not None else None
        if self.state != "running" or main is None or main.exited.is_set():
            raise Conflict(f"sandbox {self.record.uuid} is {self.state}, not running")
        assert isinstance(processes, SandboxProcesses)
        return processes

    async def exec(self, spec: api.ExecSpec) -> int:
        return await self.running_processes().exec(spec)

    def remember(self, spec: api.ExecSpec) -> None:
        """A command started in the sandbox, for the lineage of the images taken from it."""
        self.started_commands += 1
        text = " ".join([spec.command, *spec.args]) if spec.args else spec.command
        if len(text) > COMMAND_CHARS:
            text = text[: COMMAND_CHARS - 1] + "…"
        if len(self.commands) < MAX_COMMANDS:  # the first ones: what a lineage entry shows
            self.commands.append(text)

    async def kill(self, spid: int, sig: str | int | None) -> None:
        self.lease.touch()
        await super().kill(spid, sig)

    async def write_stdin(self, spid: int, data: bytes, *, close: bool) -> None:
        self.lease.touch()
        await super().write_stdin(spid, data, close=close)

    async def wait_process(self, spid: int, wait: float) -> None:
        """Return once process `spid` exited (its exit recorded) or after `wait` seconds."""
        proc = self.processes.table.get(spid) if self.processes is not None else None
        if proc is None or proc.exited.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.exited.wait()), wait)

    # ------------------------------------------------------------------ snapshots

    async def snapshot_live(self) -> SandboxSnapshot:
        """The sandbox's filesystem now, as a child image of the one it started from. The sandbox's
        processes are frozen (its cgroup, else SIGSTOP) only while its writable layer is copied."""
        async with self._lock:
            if self.state != "running":
                raise Conflict(f"sandbox {self.record.uuid} is {self.state}, not running")
            self.lease.touch()
            parts = self.parts
            store = parts.store
            image = store.get(self.image_uuid)
            staging = await asyncio.to_thread(store.staging_dir, "snapshot")
            layer = staging / "layer"
            started = time.perf_counter()
            try:
                frozen_with = await self._freeze()
                paused = time.perf_counter()
                try:
                    await asyncio.to_thread(upperfs.copy_layer, self.snapshot.upper, layer,
                                            self.max_layer_bytes)
                finally:
                    await self._thaw(frozen_with)
                resumed = time.perf_counter()
                idmap = parts.snapshots.idmap

                def commit() -> ImageRecord | None:
                    if idmap is not None:
                        idmap.shift_out(layer)  # layers hold container ids, never the host range
                    return store.commit_upper(layer, image, self.record.uuid, self.max_layer_bytes)

                child = await asyncio.to_thread(commit)
            finally:
                await asyncio.to_thread(remove_tree, staging)
            done = time.perf_counter()
            result = child or image
            if child is not None:
                self.snapshots.append(child.uuid)
                self.snapshot_commands[child.uuid] = self.started_commands
                self._record_sandbox()
                parts.oplog.save(self.record)
            return SandboxSnapshot(
                image=result.to_api(), sandbox_id=self.record.uuid, parent=image.uuid,
                unchanged=child is None, bytes=child.size if child is not None else 0,
                pause_ms=round((resumed - paused) * 1000, 3), copy_ms=round((resumed - paused) * 1000, 3),
                total_ms=round((done - started) * 1000, 3), frozen_with=frozen_with,
                commands=self.started_commands)

    async def _freeze(self) -> str:
        cgroups = self.parts.runtime.cgroups
        if isinstance(cgroups, CgroupManager) and await asyncio.to_thread(
                cgroups.freeze, self.record.uuid, FREEZE_TIMEOUT):
            return "cgroup freezer"
        # No freezer (rootless without a delegated cgroup): stop every process but the init, which
        # writes nothing. A process in the middle of a write finishes that write first.
        self.channel.signal_all(signals.SIGSTOP)
        await asyncio.sleep(0.01)
        return "SIGSTOP"

    async def _thaw(self, frozen_with: str) -> None:
        if frozen_with == "SIGSTOP":
            self.channel.signal_all(signals.SIGCONT)
            return
        cgroups = self.parts.runtime.cgroups
        assert isinstance(cgroups, CgroupManager)
        await asyncio.to_thread(cgroups.thaw, self.record.uuid)

    # ------------------------------------------------------------------ reporting

    def _record_sandbox(self) -> None:
        """What the operation record keeps of the sandbox (read back once it ended)."""
        self.record.metadata["sandbox"] = {
            "ttl_seconds": self.settings.ttl_seconds,
            "networking": self.settings.networking,
            "commands": list(self.commands),
            "started_commands": self.started_commands,
            "snapshots": list(self.snapshots),
            "snapshot_commands": dict(self.snapshot_commands),
            "stop_reason": self.stop_reason,
        }

    def info(self) -> SandboxInfo:
        record = self.record
        now = time.monotonic()
        running = self.state in ("running", "stopping")
        expires = None
        if self.state == "running":
            expires = isoformat(time.time() + self.lease.expires_at() - now)
        table = self.processes.table if self.processes is not None else {}
        return SandboxInfo(
            uuid=record.uuid,
            image=self.image_uuid,
            state=self.state,
            status=record.status if record.status else EXECUTING,
            created_at=isoformat(record.created_at),
            started_at=isoformat(record.started_at) if record.started_at else None,
            ttl_seconds=self.settings.ttl_seconds,
            networking=self.settings.networking,
            expires_at=expires,
            last_active_at=isoformat(time.time() - (now - self.lease.last_active)) if running else None,
            idle_seconds=round(self.lease.idle_for(), 3) if running else None,
            busy=self.lease.busy,
            processes_running=sum(1 for p in table.values() if p.spid != 1 and not p.exited.is_set()),
            ports=self.ports.list(),
            commands=self.started_commands,
            snapshots=list(self.snapshots),
            stop_reason=self.stop_reason,
        )


class SandboxProcesses(Processes):
    """A sandbox's processes: started by its init (a message and a fork instead of a `crun exec`), each
    with a timeout of its own in the foreground (`ExecSpec.timeout`), keeping the sandbox busy meanwhile."""

    def __init__(self, run: SandboxRun, sandbox: RunningSandbox, events: EventLog, *, deadline: float,
                 image_env: dict[str, str], main_cwd: str) -> None:
        super().__init__(sandbox, events, deadline=deadline, image_env=image_env, main_cwd=main_cwd)
        self.run = run

    async def exec(self, spec: api.ExecSpec) -> int:
        run = self.run
        env: dict[str, str | None] = {**(run.request.env or {}), **(spec.env or {})}
        plan = spawn.plan_for(msgspec.structs.replace(spec, env=env), self.image_env, self.main_cwd)
        stdin_data, keep_open = spawn.initial_stdin(spec.stdin)
        spid = self.next_spid
        self.next_spid += 1
        timeout = spec.timeout
        lease = run.lease
        token = lease.begin(time.monotonic() + timeout) if timeout is not None else None
        run.remember(spec)
        try:
            handle = await run.channel.spawn(
                plan.argv, [f"{k}={v}" for k, v in plan.env.items()], plan.cwd, plan.uid, plan.gid,
                stdin=bool(stdin_data) or keep_open)
        except FailedToStart as exc:
            if token is not None:
                lease.end(token)
            self._record_failed_start(spid, plan, spec.truncate_output_at, str(exc))
            return spid
        except InitGone:
            if token is not None:
                lease.end(token)
            raise Conflict(f"sandbox {run.record.uuid} has stopped") from None
        proc = self.register(spid, handle, handle.pid, plan, spec.truncate_output_at, timeout=timeout or 0)
        self.background(self.feed_stdin(proc, stdin_data, close=not keep_open))
        self.background(self._watch_process(proc, handle, timeout, token))
        return spid

    def _record_failed_start(self, spid: int, plan: spawn.ProcessPlan, truncate_at: int, why: str) -> None:
        """A process that could not start is recorded like one that exited 127 saying why (as a shell
        reports a missing command), so its result reads like any other."""
        events = self.events
        events.append("spawn", spawn_event(plan, 0, 1, truncate_at), spid)
        events.append("stderr", api.encode_event_stream(f"{why}\n".encode()), spid)
        events.append("exit", api.EventDataExit(pid=0, code=127, signal=-1, timed_out=False, duration_ms=0),
                      spid)

    async def _watch_process(self, proc: Process, handle: InitProcess, limit: int | None,
                             token: int | None) -> None:
        try:
            try:
                await asyncio.wait_for(asyncio.shield(handle.wait()), limit)
            except TimeoutError:
                proc.timed_out = True
                handle.signal(signals.SIGKILL)
            await self._reap(proc, handle)
        except Exception:
            log.exception("process %d of sandbox %s", proc.spid, self.sandbox_id)
        finally:
            if token is not None:
                self.run.lease.end(token)


def ended_info(record: OpRecord) -> SandboxInfo:
    """A sandbox that is no longer in this engine, from its operation record."""
    meta = record.metadata
    sandbox = meta.get("sandbox") or {}
    reason = sandbox.get("stop_reason")
    if reason is None and record.terminal:
        reason = "engine_restart" if "interrupted" in (record.error or "") else "failed"
    return SandboxInfo(
        uuid=record.uuid,
        image=record.image_uuid or str(meta.get("image") or ""),
        state="stopped" if record.terminal else "starting",
        status=record.status,
        created_at=isoformat(record.created_at),
        started_at=isoformat(record.started_at) if record.started_at else None,
        ttl_seconds=int(sandbox.get("ttl_seconds") or 0),
        networking=bool(sandbox.get("networking", True)),
        commands=int(sandbox.get("started_commands") or 0),
        snapshots=list(sandbox.get("snapshots") or []),
        stop_reason=reason if record.terminal else None,
        error=record.error,
        result_image=record.result_image_uuid if record.status == "SUCCESS" else None,
    )

