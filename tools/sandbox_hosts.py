"""Where the sandbox tools keep long-lived sandboxes: the embedded engine, or the Contree cloud.

* `EngineSandboxes`: the engine's `/v1/sandboxes` extension (`contree.sandbox_api.SandboxHost`): the
  engine keeps each sandbox alive, reaps it after its idle TTL, forwards ports, snapshots it live.
* `CloudSandboxes`: a backend without the extension (the Contree cloud). A sandbox is an instance whose
  main process waits on its open stdin (`cat`), bounded by the cloud's own `instance_max_timeout`;
  processes go through the Contree API's subprocess endpoints. Timeouts of processes and the idle TTL
  are enforced by this server while it runs. What the cloud cannot do (ports, live snapshots) is an
  error naming the missing capability.

`sandbox_hosts(state)` picks one from `whoami` (the engine announces `sandbox_max_ttl_seconds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal as signals
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from contree import api
from contree.backend import Backend
from contree.engine.keepalive import IdleLease
from contree.errors import BackendError, Conflict, NotFound
from contree.sandbox_api import (
    PortForward,
    SandboxHost,
    SandboxInfo,
    SandboxRequest,
    SandboxSnapshot,
    StopSandboxRequest,
    process_exited,
)
from contree.timeparse import isoformat
from protocol.errors import ToolError
from tools.state import ServerState

log = logging.getLogger(__name__)

CLOUD_MARKER = "# contree-mcp sandbox"
CLOUD_MAIN = f"cat >/dev/null {CLOUD_MARKER}"  # waits on its stdin: closing it ends the sandbox
START_PATIENCE = 120.0
REAP_EVERY = 15.0  # seconds between checks for idle cloud sandboxes


class MissingCapability(ToolError):
    pass


class EngineSandboxes:
    """The embedded engine (in this process or through its REST API)."""

    kind = "engine"

    def __init__(self, backend: SandboxHost, api_backend: Backend) -> None:
        self.backend = backend
        self.api = api_backend  # the same object: its Contree API side (processes)

    async def start(self, request: SandboxRequest, *, max_ttl: int | None) -> SandboxInfo:
        return await self.backend.start_sandbox(request)

    async def get(self, sandbox_id: str) -> SandboxInfo:
        return await self.backend.get_sandbox(sandbox_id)

    async def list(self) -> list[SandboxInfo]:
        return await self.backend.list_sandboxes()

    async def exec(self, sandbox_id: str, spec: api.ExecSpec) -> int:
        spid: int = await self._checked(sandbox_id, self.api.create_subprocess(sandbox_id, spec))
        return spid

    async def wait(self, sandbox_id: str, spid: int, seconds: float) -> api.InstanceResult:
        return await self.backend.wait_subprocess(sandbox_id, spid, seconds)

    async def write_stdin(self, sandbox_id: str, spid: int, chunk: api.ClosableStreamRepr) -> None:
        await self._checked(sandbox_id, self.api.write_stdin(sandbox_id, spid, chunk))

    async def kill(self, sandbox_id: str, spid: int, sig: str) -> None:
        await self._checked(sandbox_id, self.api.kill_subprocess(sandbox_id, spid, sig))

    def timed_out(self, sandbox_id: str, spid: int) -> bool:
        return False  # the engine says so itself

    async def expose(self, sandbox_id: str, port: int) -> PortForward:
        return await self.backend.expose_port(sandbox_id, port)

    async def snapshot(self, sandbox_id: str) -> SandboxSnapshot:
        return await self.backend.snapshot_sandbox(sandbox_id)

    async def stop(self, sandbox_id: str, commit: bool) -> SandboxInfo:
        return await self.backend.stop_sandbox(sandbox_id, StopSandboxRequest(commit=commit))

    async def _checked(self, sandbox_id: str, call: Awaitable[Any]) -> Any:
        """A call on a sandbox's processes; a sandbox that stopped says why (not 'operation … SUCCESS')."""
        try:
            return await call
        except (Conflict, BackendError) as exc:
            if exc.status not in (409, 410):
                raise
            try:
                info = await self.backend.get_sandbox(sandbox_id)
            except BackendError:
                raise exc from None
            if info.state == "stopped":
                raise Conflict(stopped_text(info)) from None
            raise


@dataclass
class _CloudSandbox:
    info: SandboxInfo
    lease: IdleLease
    deadline: float  # wall clock: the instance's own timeout
    principal: str | None = None
    timed_out: set[int] = field(default_factory=set)
    timers: dict[int, asyncio.Task[None]] = field(default_factory=dict)


class CloudSandboxes:
    """A backend with only the Contree API (see the module docstring)."""

    kind = "cloud"

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.backend = state.backend
        self.known: dict[str, _CloudSandbox] = {}
        self._reaping = False

    async def start(self, request: SandboxRequest, *, max_ttl: int | None) -> SandboxInfo:
        me = await self.backend.whoami()
        max_timeout = me.limits.get("instance_max_timeout") or 3600
        spawn = api.InstanceSpawnRequest(
            command=CLOUD_MAIN, shell=True, image=request.image, env=request.env, cwd=request.cwd,
            files=request.files, hostname=request.hostname,
            networking=api.InstanceNetworking(enabled=request.networking),
            resources_limits=request.resources_limits, disposable=False,
            stdin=api.ClosableStreamRepr(value="", close=False), timeout=max_timeout,
            truncate_output_at=api.DEFAULT_TRUNCATE_OUTPUT_AT)
        spawned = await self.backend.spawn(spawn)
        sandbox_id = spawned.uuid
        loop = asyncio.get_running_loop()
        end = loop.time() + START_PATIENCE
        op = await self.backend.get_operation(sandbox_id)
        while op.status != "EXECUTING" and op.status not in api.TERMINAL_STATUSES and loop.time() < end:
            await asyncio.sleep(0.5)
            op = await self.backend.get_operation(sandbox_id)
        if op.status != "EXECUTING":
            with contextlib.suppress(BackendError):
                await self.backend.cancel_operation(sandbox_id)
            raise ToolError(f"sandbox {sandbox_id} could not start: {op.error or op.status}")
        now = time.time()
        info = SandboxInfo(uuid=sandbox_id, image=op.image_uuid or spawned.image, state="running",
                           status="EXECUTING", created_at=op.created_at or isoformat(now),
                           ttl_seconds=request.ttl_seconds, networking=request.networking)
        self.known[sandbox_id] = _CloudSandbox(info=info, lease=IdleLease(request.ttl_seconds),
                                               deadline=now + max_timeout)
        self._start_reaper()
        return self._view(self.known[sandbox_id])

    def _view(self, box: _CloudSandbox) -> SandboxInfo:
        info = box.info
        if info.state != "running":
            return info
        idle_end = time.time() + box.lease.remaining()
        return msgspec.structs.replace(
            info, expires_at=isoformat(min(idle_end, box.deadline)),
            idle_seconds=round(box.lease.idle_for(), 3), busy=box.lease.busy,
            last_active_at=isoformat(time.time() - box.lease.idle_for()))

    async def _refresh(self, sandbox_id: str) -> SandboxInfo:
        op = await self.backend.get_operation(sandbox_id)
        box = self.known.get(sandbox_id)
        if box is None:
            try:
                meta = op.instance_metadata()
            except msgspec.ValidationError:
                meta = None
            if meta is None or CLOUD_MARKER not in meta.command:
                raise NotFound(f"sandbox {sandbox_id} not found (operation {sandbox_id} is not a sandbox)")
            running = op.status == "EXECUTING"
            return SandboxInfo(uuid=sandbox_id, image=op.image_uuid or "",
                               state="running" if running else "stopped", status=op.status,
                               created_at=op.created_at, ttl_seconds=0,
                               stop_reason=None if running else "stopped", error=op.error,
                               result_image=op.result_image_uuid)
        if op.status in api.TERMINAL_STATUSES and box.info.state != "stopped":
            reason = box.info.stop_reason or ("exited" if op.status == "SUCCESS" else "cancelled")
            box.info = msgspec.structs.replace(
                box.info, state="stopped", status=op.status, stop_reason=reason,
                error=op.error, result_image=op.result_image_uuid)
        return self._view(box)

    async def get(self, sandbox_id: str) -> SandboxInfo:
        return await self._refresh(sandbox_id)

    async def list(self) -> list[SandboxInfo]:
        out = []
        for sandbox_id in list(self.known):
            info = await self._refresh(sandbox_id)
            if info.state == "stopped":
                self.known.pop(sandbox_id, None)
            else:
                out.append(info)
        return out

    async def _live(self, sandbox_id: str) -> _CloudSandbox | None:
        info = await self._refresh(sandbox_id)
        if info.state != "running":
            raise Conflict(stopped_text(info))
        box = self.known.get(sandbox_id)
        if box is not None:
            box.lease.touch()
        return box

    async def exec(self, sandbox_id: str, spec: api.ExecSpec) -> int:
        box = await self._live(sandbox_id)
        limit = spec.timeout
        spid = await self.backend.create_subprocess(sandbox_id, msgspec.structs.replace(spec, timeout=None))
        if box is not None:
            box.info.commands += 1
            if limit is not None:  # the cloud has no per-process timeout: this server enforces it
                token = box.lease.begin(time.monotonic() + limit)
                box.timers[spid] = asyncio.get_running_loop().create_task(
                    self._time_limit(box, sandbox_id, spid, limit, token))
        return spid

    async def _time_limit(
        self, box: _CloudSandbox, sandbox_id: str, spid: int, limit: int, token: int
    ) -> None:
        try:
            result = await wait_process(self.backend, sandbox_id, spid, limit)
            if not process_exited(result):
                box.timed_out.add(spid)
                await self.backend.kill_subprocess(sandbox_id, spid, int(signals.SIGKILL))
        except BackendError as exc:
            log.debug("time limit of %s/%d: %s", sandbox_id, spid, exc)
        finally:
            box.lease.end(token)
            box.timers.pop(spid, None)

    async def wait(self, sandbox_id: str, spid: int, seconds: float) -> api.InstanceResult:
        return await wait_process(self.backend, sandbox_id, spid, seconds)

    def timed_out(self, sandbox_id: str, spid: int) -> bool:
        box = self.known.get(sandbox_id)
        return box is not None and spid in box.timed_out

    async def write_stdin(self, sandbox_id: str, spid: int, chunk: api.ClosableStreamRepr) -> None:
        await self._live(sandbox_id)
        await self.backend.write_stdin(sandbox_id, spid, chunk)

    async def kill(self, sandbox_id: str, spid: int, sig: str) -> None:
        await self._live(sandbox_id)
        await self.backend.kill_subprocess(sandbox_id, spid, sig)

    async def expose(self, sandbox_id: str, port: int) -> PortForward:
        raise MissingCapability(
            "expose_port needs port forwarding, which the Contree cloud backend does not offer: its "
            "sandboxes are not reachable from this machine. Test the server from another exec in the "
            "sandbox instead (e.g. wget -qO- http://127.0.0.1:<port>/), or use the embedded engine "
            "(--backend local).")

    async def snapshot(self, sandbox_id: str) -> SandboxSnapshot:
        raise MissingCapability(
            "snapshot_sandbox needs live snapshots, which the Contree cloud backend does not offer. "
            "stop_sandbox(commit=true) keeps the sandbox's filesystem as an image (it stops the sandbox), "
            "or use the embedded engine (--backend local).")

    async def stop(self, sandbox_id: str, commit: bool) -> SandboxInfo:
        info = await self._refresh(sandbox_id)
        if info.state != "running":
            raise Conflict(stopped_text(info))
        box = self.known.get(sandbox_id)
        if box is not None:
            box.info = msgspec.structs.replace(box.info, stop_reason="stopped", state="stopping")
            for timer in box.timers.values():
                timer.cancel()
        if commit:  # the main process ends when its stdin closes: SUCCESS with the result image
            await self.backend.write_stdin(sandbox_id, 1, api.ClosableStreamRepr(value="", close=True))
        else:
            await self.backend.cancel_operation(sandbox_id)
        loop = asyncio.get_running_loop()
        end = loop.time() + START_PATIENCE
        while loop.time() < end:
            info = await self._refresh(sandbox_id)
            if info.state == "stopped":
                self.known.pop(sandbox_id, None)
                return info
            await asyncio.sleep(0.5)
        raise ToolError(f"sandbox {sandbox_id} did not stop within {START_PATIENCE:.0f} s")

    def _start_reaper(self) -> None:
        if not self._reaping:
            self._reaping = True
            self.state.spawn_background(self._reap(), "cloud-sandbox-reaper")

    async def _reap(self) -> None:
        """Cancel cloud sandboxes idle beyond their TTL (while this server runs; the cloud's own
        instance timeout bounds them otherwise)."""
        try:
            await self._reap_idle()
        finally:
            self._reaping = False

    async def _reap_idle(self) -> None:
        while self.known:
            await asyncio.sleep(REAP_EVERY)
            for sandbox_id, box in list(self.known.items()):
                if box.lease.expired() and box.info.state == "running":
                    box.info = msgspec.structs.replace(box.info, stop_reason="idle")
                    try:
                        await self.backend.cancel_operation(sandbox_id)
                    except BackendError as exc:
                        log.debug("reaping %s: %s", sandbox_id, exc)
                    self.known.pop(sandbox_id, None)


async def wait_process(backend: Backend, sandbox_id: str, spid: int, seconds: float) -> api.InstanceResult:
    """A subprocess's result once it exited or after `seconds`: the engine's long poll when the backend
    has one, else polling `get_subprocess`."""
    if isinstance(backend, SandboxHost):
        return await backend.wait_subprocess(sandbox_id, spid, seconds)
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while True:
        result = await backend.get_subprocess(sandbox_id, spid)
        if process_exited(result) or loop.time() >= end:
            return result
        await asyncio.sleep(min(0.5, max(0.0, end - loop.time())))


def stopped_text(info: SandboxInfo) -> str:
    reason = info.stop_reason or "stopped"
    why = {
        "idle": f"it was idle for its ttl_seconds={info.ttl_seconds} (no exec, stdin or port traffic)",
        "stopped": "stop_sandbox stopped it",
        "cancelled": "its operation was cancelled",
        "exited": "its main process ended",
        "engine_restart": "the engine restarted",
        "failed": f"it failed ({info.error})" if info.error else "it failed",
    }.get(reason, reason)
    result = f"; its filesystem is image {info.result_image}" if info.result_image else ""
    return (f"sandbox {info.uuid} has stopped: {why}{result}. Start a new one with start_sandbox "
            "(from a snapshot_sandbox image to keep its files).")


class SandboxHosts:
    """Decides once per server whether the backend keeps sandboxes itself (the engine) or not."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._host: EngineSandboxes | CloudSandboxes | None = None
        self.max_ttl: int | None = None

    async def get(self) -> EngineSandboxes | CloudSandboxes:
        if self._host is None:
            max_ttl = (await self.state.backend.whoami()).limits.get("sandbox_max_ttl_seconds")
            backend = self.state.backend
            if max_ttl is not None and isinstance(backend, SandboxHost):
                self._host, self.max_ttl = EngineSandboxes(backend, self.state.backend), max_ttl
            else:
                self._host = CloudSandboxes(self.state)
        return self._host
