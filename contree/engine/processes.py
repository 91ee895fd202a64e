"""The processes of one instance: spid 1 (the sandbox's init) and those exec'd into it (spid ≥ 2).

`Processes` records every process's streams into the run's event log (`StreamRecorder`: events up to
`truncate_output_at`, everything into the output spill), feeds stdin without ever stalling the run on a
child that does not read, reaps exec'd processes at their exit or the run's deadline, and writes the
`spawn` and `exit` events. The payloads are the API's Structs (`spawn_event`, `exit_event`,
`init_event`, `network_event`); `result_from_fold` turns a process's folded events back into its
`api.InstanceResult`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal as signals
import time
import uuid as uuidlib
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from msgspec import UNSET

from contree import api
from contree.engine import spawn
from contree.engine.eventlog import EventLog, FoldedProcess, StreamRecorder, mask_env, now_iso
from contree.engine.runtime.handles import ExecdProcess, ProcessExit, RunningSandbox, SandboxExit
from contree.engine.runtime.netns import NetworkInfo
from contree.engine.spawn import ProcessPlan
from contree.errors import BackendError, BadRequest, Conflict, NotFound, TooEarly

log = logging.getLogger(__name__)

READ_BYTES = 65536
PUMP_GRACE = 5.0  # seconds to drain pipes after the process exited (grandchildren may hold them)
STDIN_WRITE_LIMIT = 30.0  # seconds a write_stdin call waits for a child that does not read
CREATED_PATIENCE = 2.0  # seconds an exec waits for the runtime to record the container (then 425)


@dataclass(eq=False)
class Process:
    """One process of the instance. `handle` is the sandbox itself for spid 1 (its init), else the
    process exec'd into it."""

    spid: int
    handle: RunningSandbox | ExecdProcess
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


class Processes:
    """Every process of one running sandbox, recorded in the run's event log."""

    def __init__(self, sandbox: RunningSandbox, events: EventLog, *, deadline: float,
                 image_env: dict[str, str], main_cwd: str) -> None:
        self.sandbox = sandbox
        self.events = events
        self.deadline = deadline  # time.monotonic() at which every process is killed
        self.image_env = image_env  # what a `shell` exec starts from (the image's ENV)
        self.main_cwd = main_cwd  # an exec's default cwd
        self.table: dict[int, Process] = {}
        self.next_spid = 2
        self._background: set[asyncio.Task[None]] = set()

    @property
    def sandbox_id(self) -> str:
        return self.sandbox.sandbox_id

    def register(self, spid: int, handle: RunningSandbox | ExecdProcess, pid: int, plan: ProcessPlan,
                 truncate_at: int, timeout: int | None = None) -> Process:
        """Record the `spawn` of a process and start pumping its output into the log. `timeout`: the
        process's own (seconds, 0 = none), else what is left of the instance's."""
        if timeout is None:
            timeout = max(1, int(self.deadline - time.monotonic() + 0.5))
        self.events.append("spawn", spawn_event(plan, pid, timeout, truncate_at), spid)
        events = self.events
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
        self.table[spid] = proc
        return proc

    def background(self, coro: Coroutine[Any, Any, None]) -> None:
        """Initial stdin goes in the background: a child that never reads must not stall the run."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def feed_stdin(self, proc: Process, data: bytes, *, close: bool) -> None:
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

    async def main_exited(self, main: Process, info: SandboxExit) -> None:
        """spid 1 ended: drain its pipes and record its `exit`."""
        await _drain(main)
        self.events.append("exit", exit_event(main, info), 1)
        main.exited.set()

    async def stop_execd(self) -> None:
        """spid 1 is gone: end every exec'd process and record their exits."""
        for proc in list(self.table.values()):
            if proc.exited.is_set() or isinstance(proc.handle, RunningSandbox):
                continue
            proc.handle.signal(signals.SIGKILL)
            await self._reap(proc, proc.handle)

    async def _reap(self, proc: Process, handle: ExecdProcess) -> None:
        if proc.exited.is_set():
            return
        info = await handle.wait()
        await _drain(proc)
        if proc.exited.is_set():
            return
        proc.exited.set()
        self.events.append("exit", exit_event(proc, info), proc.spid)

    async def _watch(self, proc: Process, handle: ExecdProcess) -> None:
        try:
            remaining = max(0.0, self.deadline - time.monotonic())
            try:
                await asyncio.wait_for(asyncio.shield(handle.wait()), remaining)
            except TimeoutError:
                proc.timed_out = True
                handle.signal(signals.SIGKILL)
            await self._reap(proc, handle)
        except Exception:
            log.exception("subprocess %d of %s", proc.spid, self.sandbox_id)

    def cancel(self) -> None:
        """Stop feeding and pumping (the run is being torn down)."""
        for task in list(self._background):
            task.cancel()
        for proc in self.table.values():
            for task in proc.pumps:
                task.cancel()

    # ------------------------------------------------------------------ the API's subprocesses

    async def exec(self, spec: api.ExecSpec) -> int:
        """Start the process `spec` asks for in the running sandbox; returns its spid."""
        main = self.table.get(1)
        if main is None or main.exited.is_set():
            raise Conflict(f"operation {self.sandbox_id} is not running")
        plan = spawn.plan_for(spec, self.image_env, self.main_cwd)
        stdin_data, keep_open = spawn.initial_stdin(spec.stdin)
        # `crun exec` fails until `crun run` has recorded the container: 425 if that takes too long.
        if not await self.sandbox.wait_created(CREATED_PATIENCE):
            raise TooEarly(f"operation {self.sandbox_id} is still starting", retry_after=1.0)
        spid = self.next_spid
        self.next_spid += 1
        try:
            handle = await self.sandbox.exec(
                argv=plan.argv,
                env=[f"{k}={v}" for k, v in plan.env.items()],
                cwd=plan.cwd,
                uid=plan.uid,
                gid=plan.gid,
                stdin=bool(stdin_data) or keep_open,
            )
        except RuntimeError as exc:
            raise Conflict(str(exc)) from None
        proc = self.register(spid, handle, handle.host_pid or handle.pid, plan, spec.truncate_output_at)
        self.background(self.feed_stdin(proc, stdin_data, close=not keep_open))
        self.background(self._watch(proc, handle))
        return spid

    def get(self, spid: int) -> Process:
        proc = self.table.get(spid)
        if proc is None:
            raise NotFound(f"operation {self.sandbox_id} has no process {spid}")
        return proc

    async def kill(self, spid: int, sig: str | int | None) -> None:
        number = parse_signal(sig)
        proc = self.get(spid)
        if proc.exited.is_set():
            raise Conflict(f"process {spid} already exited")
        if isinstance(proc.handle, RunningSandbox):
            await proc.handle.kill(number)
        else:
            proc.handle.signal(number)

    async def write_stdin(self, spid: int, data: bytes, *, close: bool) -> None:
        proc = self.get(spid)
        if not proc.stdin_open or proc.exited.is_set():
            raise Conflict(f"stdin of process {spid} is closed")
        # Shielded: on timeout the write goes on (a half-cancelled write would corrupt the stream).
        write = asyncio.shield(self.feed_stdin(proc, data, close=close))
        try:
            await asyncio.wait_for(write, STDIN_WRITE_LIMIT)
        except TimeoutError:
            raise BackendError(
                f"process {spid} did not read the chunk within {STDIN_WRITE_LIMIT:.0f} s; "
                "it may or may not have been written",
                status=504,
            ) from None


async def _pump(reader: asyncio.StreamReader | None, recorder: StreamRecorder) -> None:
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


# ---------------------------------------------------------------------- event payloads


def init_event(*, started_at: float | None, runtime_path: str, init_pid: int, hostname: str, kernel: str,
               machine: str) -> api.EventDataInit:
    return api.EventDataInit(started_at=now_iso(started_at), runtime_path=runtime_path, verbose=False,
                             init_pid=init_pid, hostname=hostname, kernel=kernel, machine=machine,
                             boot_id=str(uuidlib.uuid4()))


def spawn_event(plan: ProcessPlan, pid: int, timeout: int, truncate_at: int) -> api.EventDataSpawn:
    return api.EventDataSpawn(pid=pid, command=plan.command, args=plan.args, shell=plan.shell, cwd=plan.cwd,
                              uid=plan.uid, gid=plan.gid, timeout=timeout, truncate_at=truncate_at,
                              env=mask_env(plan.env))


def network_event(info: NetworkInfo) -> api.EventDataNetwork:
    """The `network` event payload from the runtime's NetworkInfo."""
    interfaces = [api.NetworkInterface(name=i.name, rx_bytes=i.rx_bytes, tx_bytes=i.tx_bytes,
                                       rx_packets=i.rx_packets, tx_packets=i.tx_packets)
                  for i in info.interfaces]
    configured = info.configured
    return api.EventDataNetwork(
        interfaces=interfaces,
        configured=api.NetworkConfigured(ip4=configured.ip4 or None, ip4_gw=configured.gw or None,
                                         nameserver=configured.nameserver or None),
        error=info.error or UNSET,
    )


def exit_event(proc: Process, info: SandboxExit | ProcessExit) -> api.EventDataExit:
    """The `exit` event payload from what the runtime reported (the runtime's exec helper reports no
    rusage; a long-lived sandbox's init does)."""
    code = -1 if info.exit_code is None else int(info.exit_code)
    sig = -1 if info.signal is None or info.signal <= 0 else int(info.signal)
    if sig > 0:
        code = -1
    usage = info if isinstance(info, SandboxExit) else info.usage
    resources = api.EventResources()
    if usage is not None:
        resources = api.EventResources(
            user_time_us=int(usage.user_time * 1e6),
            sys_time_us=int(usage.system_time * 1e6),
            max_rss_kb=int(usage.max_rss_kb),
            minor_faults=int(usage.minor_faults),
            major_faults=int(usage.major_faults),
            voluntary_ctx_switches=int(usage.voluntary_switches),
            involuntary_ctx_switches=int(usage.involuntary_switches),
            block_input_ops=int(usage.inblock),
            block_output_ops=int(usage.oublock),
        )
    oom_killed = isinstance(info, SandboxExit) and info.oom_killed
    return api.EventDataExit(
        pid=proc.pid,
        code=code,
        signal=sig,
        core_dump=info.core_dump,
        timed_out=proc.timed_out,
        duration_ms=int((time.monotonic() - proc.started) * 1000),
        resources=resources,
        # an extension: absent unless true, as in the cloud's events
        oom_killed=True if oom_killed else UNSET,
    )


# ---------------------------------------------------------------------- results


def result_from_exit(proc: Process, info: SandboxExit) -> api.InstanceResult:
    folded = FoldedProcess(
        spawned=True,
        pid=proc.pid,
        stdout=bytes(proc.stdout.captured),
        stderr=bytes(proc.stderr.captured),
        stdout_truncated=proc.stdout.truncated,
        stderr_truncated=proc.stderr.truncated,
        exit=exit_event(proc, info),
    )
    return result_from_fold(folded)


def result_from_fold(folded: FoldedProcess) -> api.InstanceResult:
    """`InstanceResult` of one process from its events (running processes get -1 and zero resources)."""
    state = api.ProcessState(pid=max(folded.pid, 0))
    resources = api.InstanceResources()
    ex = folded.exit
    if ex is not None:
        state.exit_code = ex.code
        state.signal = ex.signal
        state.timed_out = ex.timed_out
        state.core_dump = ex.core_dump
        state.oom_killed = ex.oom_killed is True
        r = ex.resources
        seconds = ex.duration_ms / 1000
        resources = api.InstanceResources(
            block_input=r.block_input_ops,
            block_output=r.block_output_ops,
            elapsed_time=seconds,
            involuntary_switches=r.involuntary_ctx_switches,
            max_rss=r.max_rss_kb,
            monotonic_time=seconds,
            page_faults=r.minor_faults,
            page_faults_io=r.major_faults,
            shared_memory=r.shared_memory,
            signals=r.signals_received,
            swaps=r.swaps,
            system_cpu_time=r.sys_time_us / 1e6,
            unshared_memory=r.unshared_memory,
            user_cpu_time=r.user_time_us / 1e6,
            voluntary_switches=r.voluntary_ctx_switches,
        )
    return api.InstanceResult(
        resources=resources,
        state=state,
        stdout=api.encode_stream(folded.stdout, folded.stdout_truncated),
        stderr=api.encode_stream(folded.stderr, folded.stderr_truncated),
    )
