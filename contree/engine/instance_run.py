"""The life of one instance operation: prepare the rootfs, run spid 1, stream events, commit, clean up.

`InstanceRun.execute()` is the queue's runner. It owns every resource it creates (overlay mount,
sandbox, layer pins) and releases them in `finally`, whatever happened: exit, timeout, cancel or a
failure to start. Subprocesses (spid ≥ 2) are exec'd into the running sandbox and recorded in the same
event log.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import platform
import posixpath
import signal as signals
import stat
import time
import uuid as uuidlib
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from contree import api
from contree.engine import spawn
from contree.engine.operations import Job
from contree.engine.oplog import (
    ASSIGNED,
    CANCELLED,
    EXECUTING,
    FAILED,
    SUCCESS,
    EventLog,
    FoldedProcess,
    OpRecord,
    StreamRecorder,
    completion_data,
    mask_env,
    now_iso,
)
from contree.engine.runtime.handles import SandboxSpec, StagedSandbox
from contree.engine.runtime.limits import SandboxLimits
from contree.engine.storage import upperfs
from contree.engine.storage.overlay import mount_overlay, unmount
from contree.engine.storage.store import ImageRecord, LayerTooLarge, remove_tree
from contree.errors import BackendError, BadRequest, Conflict, NotFound, TooEarly

if TYPE_CHECKING:
    from contree.engine.local import LocalEngine

log = logging.getLogger(__name__)

READ_BYTES = 65536
PUMP_GRACE = 5.0  # seconds to drain pipes after the process exited (grandchildren may hold them)
STDIN_WRITE_LIMIT = 30.0  # seconds a write_stdin call waits for a child that does not read
# The kernel refuses writes beyond max_layer_bytes (upperfs); this only ends a run that ran into the
# limit early instead of at its timeout (it fails either way). statvfs: microseconds per check.
LAYER_POLL = 0.25
SPARE_SCRATCH_DIRS = 2  # empty scratch dirs kept ready (Store.scratch_dir): runs waiting beyond that mkdir


class SpawnFailed(Exception):
    """The instance could not be started; the message is the operation's error."""


@dataclass
class Process:
    """One process of the instance (spid 1 = main, ≥ 2 = exec'd)."""

    spid: int
    handle: Any
    pid: int
    started: float
    stdout: StreamRecorder
    stderr: StreamRecorder
    stdin: StreamRecorder
    stdin_open: bool
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    timed_out: bool = False
    stdin_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class InstanceRun:
    """One instance operation from ASSIGNED to its `completion` event and the sandbox teardown."""

    def __init__(
        self,
        *,
        engine: LocalEngine,
        record: OpRecord,
        request: api.InstanceSpawnRequest,
        image_uuid: str,
        timeout: int,
        limits: SandboxLimits | None = None,
        layer_cap: int | None = None,
    ) -> None:
        self.engine = engine
        self.limits = limits or SandboxLimits()
        self.record = record
        self.request = request
        self.image_uuid = image_uuid
        self.timeout = timeout
        self.started = False
        self.sandbox: Any = None
        self.processes: dict[int, Process] = {}
        self.next_spid = 2
        self.deadline = 0.0
        self.events: EventLog | None = None
        self.main_cwd = "/"
        self._watchers: set[asyncio.Task[None]] = set()
        self._main_exit: asyncio.Task[Any] | None = None
        self.layer_error: str | None = None
        asked = request.resources_limits
        self.max_layer_bytes, self.layer_limit = upperfs.limit_for(
            asked.max_layer_bytes if asked is not None else api.DEFAULT_MAX_LAYER_BYTES,
            self.limits.memory_bytes, layer_cap)
        self.layer_budget = upperfs.LayerBudget.for_limit(self.max_layer_bytes)

    # ------------------------------------------------------------------ main flow

    async def execute(self, job: Job) -> None:
        engine = self.engine
        store, oplog = engine.store, engine.oplog
        assert store is not None and oplog is not None
        record = self.record
        sandbox_dir = store.sandboxes_dir / record.uuid
        image = store.get(self.image_uuid)
        with store.pinned(image.layers):
            mounted = True
            try:
                mounted = await self._run(job, image, sandbox_dir)
                # The start of the teardown (cgroup rmdir, unbind, bundle removal) is synchronous and
                # takes ~1 ms; yield once so followers of the event log see `completion` before it.
                await asyncio.sleep(0)
            finally:
                # The outcome is recorded and announced first; tearing the sandbox down (runtime state,
                # cgroup, netns, scratch dirs) happens after, off the caller's latency. A crash in
                # between leaves only what start-up recovery removes anyway.
                await self._release(sandbox_dir, mounted)

    async def _run(self, job: Job, image: ImageRecord, sandbox_dir: Path) -> bool:
        """Everything up to the `completion` event; returns whether the rootfs is still mounted."""
        oplog = self.engine.oplog
        assert oplog is not None
        record = self.record
        reason = "job_complete"
        mounted = False
        try:
            try:
                mounted = True
                plan = self._plan(image)
                self.main_cwd = plan.cwd
                staged = await self._prepare_and_stage(image, sandbox_dir, plan)
                record.status = EXECUTING
                record.started_at = time.time()
                self.deadline = time.monotonic() + self.timeout
                main = await self._start_main(plan, sandbox_dir, staged)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise SpawnFailed(_spawn_error(exc)) from exc
            self.started = True
            reason = await self._supervise(job, main)
            exit_data = await self._finish_process(main)
            await self._stop_sandbox()
            if self.layer_error is None:
                self.layer_error = self._layer_full(sandbox_dir)
            result = result_from_exit(main, exit_data)
            result.limits = self._applied_limits()
            self._account(exit_data)
            record.metadata["result"] = msgspec.to_builtins(result)
            if job.cancelled.is_set() and reason == "signal":
                record.status, record.error = CANCELLED, "cancelled"
            elif self.layer_error is not None:
                record.status, record.error = FAILED, self.layer_error
            else:
                mounted = self.request.disposable  # _commit unmounts before it takes the upper dir
                await self._commit(image, sandbox_dir, plan)
                record.status = SUCCESS
        except SpawnFailed as exc:
            reason = "spawn_failed"
            record.status, record.error = FAILED, str(exc)
            message = api.encode_event_stream(f"{exc}\n".encode())
            self._event_log().append("stderr", msgspec.to_builtins(message), 0)
        except LayerTooLarge as exc:
            record.status, record.error = FAILED, exc.message
        except asyncio.CancelledError:
            record.status, record.error = CANCELLED, "cancelled"
            raise
        except Exception as exc:
            log.exception("instance %s failed", record.uuid)
            record.status, record.error = FAILED, f"engine error: {type(exc).__name__}: {exc}"
        finally:
            if record.status != SUCCESS:
                record.result_image_uuid = None
                record.image_size = None
            record.finished_at = time.time()
            events = self._event_log()
            events.append("shutdown", {"stopped_at": now_iso(), "reason": reason}, 0)
            events.append("completion", completion_data(record))
            oplog.save(record)
            oplog.finish_log(record.uuid)
        return mounted

    # ------------------------------------------------------------------ preparation (thread)

    def _event_log(self) -> EventLog:
        """The run's event log, opened on first use."""
        if self.events is None:
            oplog = self.engine.oplog
            assert oplog is not None
            self.events = oplog.open_log(self.record.uuid)
        return self.events

    def _plan(self, image: ImageRecord) -> spawn.ProcessPlan:
        request = self.request
        return spawn.plan_process(
            command=request.command,
            args=list(request.args),
            shell=request.shell,
            env=request.env,
            cwd=request.cwd,
            uid=request.uid,
            gid=request.gid,
            image_env=_env_dict(image.config.env),
            image_cwd=image.config.cwd or "/",
        )

    async def _prepare_and_stage(
        self, image: ImageRecord, sandbox_dir: Path, plan: spawn.ProcessPlan
    ) -> StagedSandbox:
        """Mount the rootfs while the runtime stages the sandbox (bundle, cgroup, network).

        The staging goes first, up to its first real wait (the network setup's `ip` processes); the
        mount runs meanwhile. It runs inline when nothing is injected: ~0.5 ms of syscalls, cheaper than a
        thread hop, and a worker thread would contend with the staging for the GIL. Injected files
        (any size) are copied in a worker thread.
        """
        runtime = self.engine.runtime
        self.record.status = ASSIGNED  # in memory only: EXECUTING is persisted once the runtime started
        stage = asyncio.ensure_future(runtime.stage(self._sandbox_spec(plan, sandbox_dir)))
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
                mount = loop.run_in_executor(None, self._prepare, image, sandbox_dir, plan)
            else:
                try:
                    self._prepare(image, sandbox_dir, plan)
                    mount.set_result(None)
                except Exception as exc:
                    mount.set_exception(exc)
        while not (mount.done() and stage.done()):
            try:
                await asyncio.wait({mount, stage})
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
            assert failure is not None
            raise failure
        return stage.result()

    def _sandbox_spec(self, plan: spawn.ProcessPlan, sandbox_dir: Path) -> SandboxSpec:
        request = self.request
        return SandboxSpec(
            sandbox_id=self.record.uuid,
            rootfs=sandbox_dir / "rootfs",
            argv=plan.argv,
            env=[f"{k}={v}" for k, v in plan.env.items()],
            cwd=plan.cwd,
            uid=plan.uid,
            gid=plan.gid,
            hostname=request.hostname,
            networking=request.networking.enabled if request.networking is not None else True,
            stdin=any(self._stdin),
            memory_bytes=self.limits.memory_bytes,
            cpu_quota=self.limits.cpus,
            pids_limit=self.limits.pids,
        )

    @functools.cached_property
    def _stdin(self) -> tuple[bytes, bool]:
        """The initial stdin data (decoded once), and whether stdin stays open after it."""
        request = self.request
        data = api.decode_stream(request.stdin) if request.stdin is not None else b""
        return data, request.stdin is not None and not request.stdin.close

    def _prepare(self, image: ImageRecord, sandbox_dir: Path, plan: spawn.ProcessPlan) -> None:
        """Mount the overlay, inject files, create the cwd."""
        engine = self.engine
        store = engine.store
        assert store is not None
        request = self.request
        sandbox_dir = store.scratch_dir(sandbox_dir.name)
        upperfs.mount(sandbox_dir, self.layer_budget)  # over the scratch dir's own subdirs
        upper, work, rootfs = sandbox_dir / "upper", sandbox_dir / "work", sandbox_dir / "rootfs"
        idmap = engine.runtime.idmap if engine.runtime is not None else None
        if idmap is None:
            mount_overlay(store.layer_paths(image), upper, work, rootfs)
        else:
            with idmap.lowers(store.layer_paths(image)) as lowers:
                mount_overlay(lowers, upper, work, rootfs)
        upperfs.seal(sandbox_dir, self.layer_budget)
        blobs = engine._blobs()
        try:
            for path, entry in (request.files or {}).items():
                blob = blobs.path_for(entry.uuid)
                if blob is None:
                    raise NotFound(f"file {entry.uuid} for {path} not found")
                blobs.inject_file(
                    rootfs,
                    spawn.check_file_path(path),
                    blob,
                    mode=spawn.parse_mode(entry.mode),
                    uid=entry.uid,
                    gid=entry.gid,
                )
            _make_dirs(rootfs, plan.cwd, uid=request.uid, gid=request.gid)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise LayerTooLarge(f"the injected files and cwd do not fit in {self.layer_limit}") from None
        if not find_executable(rootfs, plan.argv[0], plan.env.get("PATH", spawn.DEFAULT_PATH), plan.cwd):
            what = "shell" if plan.shell else "executable"
            raise SpawnFailed(f"{what} {plan.argv[0]!r} not found in the image (or not executable)")
        if idmap is not None:
            idmap.shift_in(upper, rootfs)  # what was written above, as the sandbox's root sees it

    def _unmount(self, sandbox_dir: Path) -> None:
        unmount(sandbox_dir / "rootfs")

    # ------------------------------------------------------------------ running

    async def _start_main(self, plan: spawn.ProcessPlan, sandbox_dir: Path, staged: StagedSandbox) -> Process:
        engine = self.engine
        request = self.request
        networking = staged.spec.networking
        stdin_data, keep_open = self._stdin
        self.sandbox = await engine.runtime.launch(staged)
        sb = self.sandbox
        if engine.watchdog is not None:  # ends it at the deadline even if this process cannot
            engine.watchdog.deadline(sb.sandbox_id, self.deadline)
        # While the runtime starts the sandbox (milliseconds this process would otherwise idle):
        oplog = engine.oplog
        assert oplog is not None
        oplog.save(self.record)
        events = self._event_log()
        uname = platform.uname()
        events.append(
            "init",
            {
                "started_at": now_iso(self.record.started_at),
                "runtime_path": str(sandbox_dir),
                "verbose": False,
                "init_pid": _sandbox_pid(sb),
                "hostname": request.hostname,
                "kernel": f"{uname.release} {uname.version}",
                "machine": uname.machine,
                "boot_id": str(uuidlib.uuid4()),
            },
            0,
        )
        if networking:
            events.append("network", network_data(sb), 0)
        proc = self._register(1, sb, _sandbox_pid(sb), plan, request.truncate_output_at, keep_open)
        self._background(self._feed_stdin(proc, stdin_data, close=not keep_open))
        return proc

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Initial stdin goes in the background: a child that never reads must not stall the run."""
        task = asyncio.create_task(coro)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    def _register(
        self, spid: int, handle: Any, pid: int, plan: spawn.ProcessPlan, truncate_at: int, keep_open: bool
    ) -> Process:
        events = self.events
        assert events is not None
        events.append(
            "spawn",
            {
                "pid": pid,
                "command": plan.command,
                "args": plan.args,
                "shell": plan.shell,
                "cwd": plan.cwd,
                "uid": plan.uid,
                "gid": plan.gid,
                "timeout": max(1, int(self.deadline - time.monotonic() + 0.5)),
                "truncate_at": truncate_at,
                "env": mask_env(plan.env),
            },
            spid,
        )
        proc = Process(
            spid=spid,
            handle=handle,
            pid=pid,
            started=time.monotonic(),
            stdout=StreamRecorder(events, spid, "stdout", truncate_at),
            stderr=StreamRecorder(events, spid, "stderr", truncate_at),
            stdin=StreamRecorder(events, spid, "stdin", truncate_at),
            stdin_open=handle.stdin is not None,
        )
        proc.pumps = [
            asyncio.create_task(_pump(handle.stdout, proc.stdout)),
            asyncio.create_task(_pump(handle.stderr, proc.stderr)),
        ]
        self.processes[spid] = proc
        return proc

    async def _feed_stdin(self, proc: Process, data: bytes, *, close: bool) -> None:
        writer = proc.handle.stdin
        if writer is None:
            proc.stdin_open = False
            return
        async with proc.stdin_lock:
            if data:
                proc.stdin.feed(data)
                try:
                    writer.write(data)
                    await writer.drain()
                except (BrokenPipeError, ConnectionResetError):
                    close = True
            if close:
                proc.stdin_open = False
                proc.stdin.close()
                with contextlib.suppress(OSError):
                    writer.close()

    async def _supervise(self, job: Job, main: Process) -> str:
        """Wait for spid 1 to exit, the deadline, a cancel or an oversized layer; returns the reason."""
        waiter = asyncio.create_task(self.sandbox.wait())
        cancel = asyncio.create_task(job.cancelled.wait())
        oversize = asyncio.create_task(self._watch_layer_full())
        try:
            remaining = max(0.0, self.deadline - time.monotonic())
            done, _ = await asyncio.wait(
                {waiter, cancel, oversize}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if waiter in done:
                return "job_complete"
            await self.sandbox.kill()
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
            self._main_exit = waiter

    async def _watch_layer_full(self) -> str:
        """Return the layer error once the run's upper filesystem is full (see LAYER_POLL)."""
        store = self.engine.store
        assert store is not None
        sandbox_dir = store.sandboxes_dir / self.record.uuid
        while True:
            await asyncio.sleep(LAYER_POLL)
            error = self._layer_full(sandbox_dir)
            if error is not None:
                return error

    def _layer_full(self, sandbox_dir: Path) -> str | None:
        try:
            used = upperfs.usage(sandbox_dir, self.layer_budget)
        except OSError:
            return None
        return upperfs.over_limit(used, self.layer_budget, self.layer_limit)

    async def _finish_process(self, main: Process) -> Any:
        assert self._main_exit is not None
        exit_info = await self._main_exit
        await _drain(main)
        data = exit_data(main, exit_info)
        assert self.events is not None
        self.events.append("exit", data, 1)
        main.exited.set()
        return exit_info

    async def _stop_sandbox(self) -> None:
        """spid 1 is gone: end every exec'd process and record their exits."""
        for proc in list(self.processes.values()):
            if proc.spid == 1 or proc.exited.is_set():
                continue
            proc.handle.signal(signals.SIGKILL)
            await self._reap(proc)

    async def _reap(self, proc: Process) -> None:
        if proc.exited.is_set():
            return
        info = await proc.handle.wait()
        await _drain(proc)
        if proc.exited.is_set():
            return
        proc.exited.set()
        assert self.events is not None
        self.events.append("exit", exit_data(proc, info), proc.spid)

    def _applied_limits(self) -> api.InstanceLimits:
        lim = self.limits
        return api.InstanceLimits(memory_bytes=lim.memory_bytes, cpus=lim.cpus, pids=lim.pids,
                                  max_layer_bytes=self.max_layer_bytes)

    def _account(self, info: Any) -> None:
        record = self.record
        record.consumed_cpu = round(float(info.user_time + info.system_time), 6)
        if info.cpu_usage_ns:
            record.consumed_cpu = round(info.cpu_usage_ns / 1e9, 6)
        record.consumed_memory = int(info.max_rss_kb)
        if info.memory_peak_bytes:
            record.consumed_memory = max(record.consumed_memory, int(info.memory_peak_bytes) // 1024)

    async def _commit(self, image: ImageRecord, sandbox_dir: Path, plan: spawn.ProcessPlan) -> None:
        """Turn the upper dir into the result image (or reuse the input image when nothing changed)."""
        request = self.request
        record = self.record
        if request.disposable:
            record.result_image_uuid = None
            record.image_size = None
            return
        store = self.engine.store
        assert store is not None
        config = image.config
        if request.preserve_env:
            env = spawn.preserved_env(_env_dict(config.env), request.env)
            config = msgspec.structs.replace(config, env=[f"{k}={v}" for k, v in env.items()])
        if request.preserve_cwd:
            config = msgspec.structs.replace(config, cwd=plan.cwd)
        max_bytes = self.max_layer_bytes
        squash_depth = self.engine.limits.squash_depth
        upper = sandbox_dir / "upper"

        def commit() -> ImageRecord | None:
            self._unmount(sandbox_dir)  # one thread hop for unmount + commit: both are on the latency path
            idmap = self.engine.runtime.idmap if self.engine.runtime is not None else None
            if idmap is not None:
                idmap.shift_out(upper)  # layers hold container ids, never the host range
            # work/ stays behind with the rest of the sandbox dir; only upper/ becomes the layer.
            child = store.commit_upper(
                upper, image, record.uuid, max_bytes, config if config != image.config else None
            )
            if child is None and config != image.config:
                child = store.create_image_from_layer_dirs(
                    [], config=config, kind=0, source="run", operation_id=record.uuid, parent=image
                )
            if child is not None and child.depth > squash_depth:
                # Each run adds a layer and overlay takes at most 500: flatten now (a full copy, once
                # every `squash_depth` runs) so the next run on this image mounts one layer.
                try:
                    child = store.squash_if_deep(child, squash_depth) or child
                except OSError:
                    log.exception("squashing %s failed; it keeps %d layers", child.uuid, child.depth)
            return child

        child = await asyncio.to_thread(commit)
        if child is None:
            record.result_image_uuid = image.uuid
            record.image_size = 0
        else:
            record.result_image_uuid = child.uuid
            record.image_size = child.size

    async def _release(self, sandbox_dir: Path, mounted: bool) -> None:
        for task in list(self._watchers):
            task.cancel()
        sb = self.sandbox
        if sb is not None:
            for proc in self.processes.values():
                for task in proc.pumps:
                    task.cancel()
            try:
                await sb.cleanup()
            except Exception:
                log.exception("sandbox cleanup of %s failed", self.record.uuid)
            if self.engine.watchdog is not None:
                self.engine.watchdog.done(sb.sandbox_id)

        store = self.engine.store
        assert store is not None

        def cleanup_dirs() -> None:
            for point in (sandbox_dir / "rootfs", sandbox_dir):  # the overlay, then its upper's tmpfs
                with contextlib.suppress(OSError):
                    unmount(point)
            try:
                remove_tree(sandbox_dir)
            except OSError:
                log.exception("could not remove %s", sandbox_dir)
            with contextlib.suppress(OSError):
                store.make_spare_scratch(SPARE_SCRATCH_DIRS)  # for the next run, while nobody waits

        await asyncio.to_thread(cleanup_dirs)

    # ------------------------------------------------------------------ subprocesses

    async def exec(self, spec: api.ExecSpec) -> int:
        sb = self.sandbox
        main = self.processes.get(1)
        if sb is None or main is None or main.exited.is_set():
            raise Conflict(f"operation {self.record.uuid} is not running")
        store = self.engine.store
        assert store is not None
        image = store.get(self.image_uuid)
        plan = spawn.plan_process(
            command=spec.command,
            args=list(spec.args),
            shell=spec.shell,
            env=spec.env,
            cwd=spec.cwd,
            uid=spec.uid,
            gid=spec.gid,
            image_env=_env_dict(image.config.env),
            image_cwd=self.main_cwd,
        )
        stdin_data = api.decode_stream(spec.stdin) if spec.stdin is not None else b""
        keep_open = spec.stdin is not None and not spec.stdin.close
        await self._wait_created()
        spid = self.next_spid
        self.next_spid += 1
        try:
            handle = await sb.exec(
                argv=plan.argv,
                env=[f"{k}={v}" for k, v in plan.env.items()],
                cwd=plan.cwd,
                uid=plan.uid,
                gid=plan.gid,
                stdin=bool(stdin_data) or keep_open,
            )
        except RuntimeError as exc:
            raise Conflict(str(exc)) from None
        pid = handle.host_pid or handle._child.pid
        proc = self._register(spid, handle, int(pid), plan, spec.truncate_output_at, keep_open)
        self._background(self._feed_stdin(proc, stdin_data, close=not keep_open))
        self._background(self._watch(proc))
        return spid

    async def _wait_created(self, limit: float = 2.0) -> None:
        """`crun exec` fails until `crun run` has recorded the container; 425 if that takes too long."""
        state = Path(self.engine.runtime.root_dir) / self.record.uuid
        loop = asyncio.get_running_loop()
        end = loop.time() + limit
        while not ((state / "status").exists() or (state / "state.json").exists()):
            if loop.time() > end or self.processes[1].exited.is_set():
                raise TooEarly(f"operation {self.record.uuid} is still starting", retry_after=1.0)
            await asyncio.sleep(0.005)

    async def _watch(self, proc: Process) -> None:
        try:
            remaining = max(0.0, self.deadline - time.monotonic())
            try:
                await asyncio.wait_for(asyncio.shield(proc.handle.wait()), remaining)
            except TimeoutError:
                proc.timed_out = True
                proc.handle.signal(signals.SIGKILL)
            await self._reap(proc)
        except Exception:
            log.exception("subprocess %d of %s", proc.spid, self.record.uuid)

    def _process(self, spid: int) -> Process:
        proc = self.processes.get(spid)
        if proc is None:
            raise NotFound(f"operation {self.record.uuid} has no process {spid}")
        return proc

    async def kill(self, spid: int, sig: str | int | None) -> None:
        number = parse_signal(sig)
        proc = self._process(spid)
        if proc.exited.is_set():
            raise Conflict(f"process {spid} already exited")
        if spid == 1:
            await self.sandbox.kill(number)
        else:
            proc.handle.signal(number)

    async def write_stdin(self, spid: int, data: bytes, *, close: bool) -> None:
        proc = self._process(spid)
        if not proc.stdin_open or proc.exited.is_set():
            raise Conflict(f"stdin of process {spid} is closed")
        # Shielded: on timeout the write goes on (a half-cancelled write would corrupt the stream).
        write = asyncio.shield(self._feed_stdin(proc, data, close=close))
        try:
            await asyncio.wait_for(write, STDIN_WRITE_LIMIT)
        except TimeoutError:
            raise BackendError(
                f"process {spid} did not read the chunk within {STDIN_WRITE_LIMIT:.0f} s; "
                "it may or may not have been written",
                status=504,
            ) from None


# ---------------------------------------------------------------------- helpers


async def _pump(reader: Any, recorder: StreamRecorder) -> None:
    if reader is None:
        recorder.close()
        return
    try:
        while True:
            chunk = await reader.read(READ_BYTES)
            if not chunk:
                break
            recorder.feed(chunk)
    finally:
        recorder.close()


async def _drain(proc: Process) -> None:
    if not proc.pumps:
        return
    _done, pending = await asyncio.wait(proc.pumps, timeout=PUMP_GRACE)
    for task in pending:
        task.cancel()
    proc.stdout.close()
    proc.stderr.close()
    proc.stdin.close()


def _env_dict(env: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in env:
        key, sep, value = item.partition("=")
        if sep:
            out[key] = value
    return out


def _make_dirs(rootfs: Path, path: str, *, uid: int, gid: int) -> None:
    """mkdir -p `path` inside `rootfs` without ever following a symlink out of it."""
    from contree.oci.openat2 import RESOLVE_IN_ROOT, openat2

    parts = [p for p in path.split("/") if p and p != "."]
    fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            if part == "..":
                raise BadRequest(f"cwd {path!r} must not contain '..'")
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
                os.chown(part, uid, gid, dir_fd=fd, follow_symlinks=False)
            except FileExistsError:
                pass
            nxt = openat2(fd, part, os.O_RDONLY | os.O_DIRECTORY, RESOLVE_IN_ROOT)
            os.close(fd)
            fd = nxt
    except NotADirectoryError:
        raise SpawnFailed(f"cwd {path!r} is not a directory in the image") from None
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise SpawnFailed(f"cwd {path!r} is not a directory in the image") from None
        raise
    finally:
        os.close(fd)


def find_executable(rootfs: Path, command: str, path_env: str, cwd: str) -> bool:
    """Whether `command` names an executable file inside `rootfs` (as execvp would find it there).

    Every lookup resolves symlinks inside the image root, so `/bin/sh -> /bin/busybox` works and
    nothing can point the check at the host.
    """
    from contree.oci.openat2 import RESOLVE_IN_ROOT, openat2

    if "/" in command:
        candidates = [command if command.startswith("/") else posixpath.join(cwd, command)]
    else:
        candidates = [posixpath.join(d or ".", command) for d in path_env.split(":")]
    rootfd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for candidate in candidates:
            try:
                fd = openat2(rootfd, candidate.lstrip("/") or ".", os.O_PATH, RESOLVE_IN_ROOT)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
                return True
        return False
    finally:
        os.close(rootfd)


def _spawn_error(exc: BaseException) -> str:
    if isinstance(exc, BackendError):
        return f"spawn failed: {exc.message}"
    if isinstance(exc, SpawnFailed):
        return str(exc)
    return f"spawn failed: {exc}"


def parse_signal(sig: str | int | None) -> int:
    """`15`, `TERM`, `SIGTERM` → 15; None → SIGKILL."""
    if sig is None or sig == "":
        return int(signals.SIGKILL)
    if isinstance(sig, int) or (isinstance(sig, str) and sig.strip().isdigit()):
        number = int(sig)
        if number < 1 or number > 64:
            raise BadRequest(f"invalid signal {sig!r}")
        return number
    name = sig.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signals.Signals[name])
    except KeyError:
        raise BadRequest(f"unknown signal {sig!r}") from None


def network_data(sb: Any) -> dict[str, Any]:
    """The `network` event payload from the runtime's NetworkInfo."""
    info = sb.network
    interfaces = [msgspec.convert(msgspec.to_builtins(i), api.NetworkInterface) for i in info.interfaces]
    configured = {k: v for k, v in msgspec.to_builtins(info.configured).items() if v}
    data: dict[str, Any] = {"interfaces": msgspec.to_builtins(interfaces), "configured": configured}
    if info.error:
        data["error"] = info.error
    return data


def _sandbox_pid(sb: Any) -> int:
    pid = getattr(sb, "pid", None) or sb._child.pid
    return int(pid)


_EMPTY_RESOURCES = {
    "user_time_us": 0,
    "sys_time_us": 0,
    "max_rss_kb": 0,
    "shared_memory": 0,
    "unshared_memory": 0,
    "swaps": 0,
    "minor_faults": 0,
    "major_faults": 0,
    "voluntary_ctx_switches": 0,
    "involuntary_ctx_switches": 0,
    "block_input_ops": 0,
    "block_output_ops": 0,
    "ipc_msgs_sent": 0,
    "ipc_msgs_received": 0,
    "signals_received": 0,
}


def exit_data(proc: Process, info: Any) -> dict[str, Any]:
    """The `exit` event payload from whatever the runtime reported."""
    code = getattr(info, "exit_code", None)
    sig = getattr(info, "signal", None)
    code = -1 if code is None else int(code)
    sig = -1 if sig is None or sig <= 0 else int(sig)
    if sig > 0:
        code = -1
    resources = dict(_EMPTY_RESOURCES)
    if hasattr(info, "user_time"):  # SandboxExit (main process); exec'd processes report no rusage
        resources.update(
            user_time_us=int(info.user_time * 1e6),
            sys_time_us=int(info.system_time * 1e6),
            max_rss_kb=int(info.max_rss_kb),
            minor_faults=int(info.minor_faults),
            major_faults=int(info.major_faults),
            voluntary_ctx_switches=int(info.voluntary_switches),
            involuntary_ctx_switches=int(info.involuntary_switches),
            block_input_ops=int(info.inblock),
            block_output_ops=int(info.oublock),
        )
    data = {
        "pid": proc.pid,
        "code": code,
        "signal": sig,
        "core_dump": bool(getattr(info, "core_dump", False)),
        "timed_out": proc.timed_out,
        "duration_ms": int((time.monotonic() - proc.started) * 1000),
        "resources": resources,
    }
    if getattr(info, "oom_killed", False):
        data["oom_killed"] = True  # an extension: absent otherwise, as in the cloud's events
    return data


def result_from_exit(proc: Process, info: Any) -> api.InstanceResult:
    data = exit_data(proc, info)
    folded = FoldedProcess(
        spawned=True,
        pid=proc.pid,
        stdout=bytes(proc.stdout.captured),
        stderr=bytes(proc.stderr.captured),
        stdout_truncated=proc.stdout.truncated,
        stderr_truncated=proc.stderr.truncated,
        exit=data,
    )
    return result_from_fold(folded)


def result_from_fold(folded: FoldedProcess) -> api.InstanceResult:
    """`InstanceResult` of one process from its events (running processes get -1 and zero resources)."""
    state = api.ProcessState(pid=max(folded.pid, 0))
    resources = api.InstanceResources()
    ex = folded.exit
    if ex is not None:
        state.exit_code = int(ex.get("code", -1))
        state.signal = int(ex.get("signal", -1))
        state.timed_out = bool(ex.get("timed_out", False))
        state.core_dump = bool(ex.get("core_dump", False))
        state.oom_killed = bool(ex.get("oom_killed", False))
        r = ex.get("resources") or {}
        resources = api.InstanceResources(
            block_input=r.get("block_input_ops", 0),
            block_output=r.get("block_output_ops", 0),
            elapsed_time=ex.get("duration_ms", 0) / 1000,
            involuntary_switches=r.get("involuntary_ctx_switches", 0),
            max_rss=r.get("max_rss_kb", 0),
            monotonic_time=ex.get("duration_ms", 0) / 1000,
            page_faults=r.get("minor_faults", 0),
            page_faults_io=r.get("major_faults", 0),
            shared_memory=r.get("shared_memory", 0),
            signals=r.get("signals_received", 0),
            swaps=r.get("swaps", 0),
            system_cpu_time=r.get("sys_time_us", 0) / 1e6,
            unshared_memory=r.get("unshared_memory", 0),
            user_cpu_time=r.get("user_time_us", 0) / 1e6,
            voluntary_switches=r.get("voluntary_ctx_switches", 0),
        )
    return api.InstanceResult(
        resources=resources,
        state=state,
        stdout=api.encode_stream(folded.stdout, folded.stdout_truncated),
        stderr=api.encode_stream(folded.stderr, folded.stderr_truncated),
    )
