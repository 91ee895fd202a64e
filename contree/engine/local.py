"""`LocalEngine`: the embedded engine behind the `Backend` interface — the façade and nothing else.

It checks and translates requests and hands the work to the parts (`parts.EngineParts`: store, blobs,
operation log and queue, sandbox runtime, snapshotter, watchdog) and the runs (`InstanceRun`,
`ImportRun`). Everything runs on the caller's event loop; blocking filesystem work goes to threads.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec

from contree import api
from contree.backend import (
    MAX_OUTPUT_PAGE,
    DiskUsage,
    FileQuery,
    GrepQuery,
    ImageLineage,
    ImageQuery,
    OperationQuery,
    OutputPage,
)
from contree.engine import spawn
from contree.engine.eventlog import fold_process
from contree.engine.import_run import ImportRun
from contree.engine.instance_run import InstanceRun
from contree.engine.operations import Job, OperationQueue
from contree.engine.oplog import ASSIGNED, CANCELLED, EXECUTING, PENDING, OperationLog, OpRecord
from contree.engine.parts import EngineLimits, EngineParts
from contree.engine.processes import result_from_fold
from contree.engine.prune import disk_usage
from contree.engine.runtime.limits import LimitPolicy
from contree.engine.runtime.sandbox import RuntimeConfig, SandboxRuntime
from contree.engine.runtime.watchdog import Watchdog
from contree.engine.sandboxes import SandboxManager
from contree.engine.storage import inspect
from contree.engine.storage.blobs import BlobStore
from contree.engine.storage.home import prepare_home
from contree.engine.storage.store import ImageRecord, Store
from contree.errors import BadRequest, Conflict, Gone, NotFound, TooEarly
from contree.fsutil import try_lock
from contree.sandbox_api import (
    DEFAULT_TTL,
    PortForward,
    SandboxInfo,
    SandboxRequest,
    SandboxSnapshot,
    StopSandboxRequest,
)
from contree.timeparse import isoformat

__all__ = ["EngineLimits", "LocalEngine"]

LOCK_GRACE_S = 0.5


class LocalEngine:
    """One Contree namespace served by crun + overlayfs on this machine."""

    def __init__(
        self,
        home: Path,
        *,
        runtime_config: RuntimeConfig | None = None,
        limits: EngineLimits | None = None,
        import_roots: tuple[str, ...] | None = None,
    ) -> None:
        self.home = Path(home)
        self.limits = limits or EngineLimits()
        # Directories local image sources (oci-archive:, docker-archive:, oci:) must resolve into;
        # None = anything the engine can read. Front ends serving remote clients pass their roots.
        self.import_roots = import_roots
        self.runtime_config = runtime_config
        self._parts: EngineParts | None = None
        self._runs: dict[str, InstanceRun] = {}
        self.sandboxes = SandboxManager(self)  # long-lived sandboxes (sandbox_api.SandboxHost)
        self._lock_fd = -1
        self._token = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"contree-local:{self.home.resolve()}"))

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Take the home, then start the parts (`EngineParts.open`: recovery, store, log, runtime…)."""
        prepare_home(self.home)  # 0700, or refused/repaired before anything in it is used
        if self._lock_fd < 0:
            await self.lock_home()
        try:
            await self._open()
        except BaseException:
            await self.close()  # release the lock and whatever parts were started
            raise

    async def _open(self) -> None:
        self._parts = await EngineParts.open(self.home, self.limits, self.runtime_config)

    async def lock_home(self) -> None:
        """One engine per home: a second one would kill the first one's sandboxes as 'leftovers'.

        Right after an engine was killed, a child it was forking can still hold the lock's open file
        description until it execs (seen in test_crash: gone within milliseconds), so a lock that frees
        up within LOCK_GRACE_S is not taken for a live engine. `start()` takes the lock itself; the
        engine service takes it first (Conflict = another engine holds the home), so it knows it won
        before it binds the home's socket."""
        deadline = time.monotonic() + LOCK_GRACE_S
        while (fd := try_lock(self.home / "engine.lock")) < 0:
            if time.monotonic() >= deadline:
                raise Conflict(f"another engine is running on {self.home}")
            await asyncio.sleep(0.01)
        self._lock_fd = fd

    async def close(self) -> None:
        """Cancel running work, stop the runtime, close the databases. Safe to call twice."""
        parts, self._parts = self._parts, None
        if parts is not None:
            await parts.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    async def __aenter__(self) -> LocalEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def started(self) -> bool:
        return self._parts is not None

    def parts(self) -> EngineParts:
        if self._parts is None:
            raise RuntimeError("LocalEngine.start() was not awaited")
        return self._parts

    # The parts by name (tests, benchmarks, the engine service, sync's direct chunk store).

    @property
    def store(self) -> Store:
        return self.parts().store

    @property
    def oplog(self) -> OperationLog:
        return self.parts().oplog

    @property
    def blobs(self) -> BlobStore:
        return self.parts().blobs

    @property
    def runtime(self) -> SandboxRuntime:
        return self.parts().runtime

    @property
    def watchdog(self) -> Watchdog:
        return self.parts().watchdog

    @property
    def sandbox_limits(self) -> LimitPolicy:
        return self.parts().sandbox_limits

    @property
    def queue(self) -> OperationQueue | None:
        """The operation queue; None while the engine is not started (the engine service asks then)."""
        return self._parts.queue if self._parts is not None else None

    # ------------------------------------------------------------------ images and tags

    async def list_images(self, query: ImageQuery) -> list[api.Image]:
        store = self.parts().store
        return [r.to_api() for r in store.list(query)]

    async def get_image(self, image_uuid: str) -> api.Image:
        store = self.parts().store
        return store.get(_check_uuid(image_uuid, "image")).to_api()

    async def resolve_tag(self, tag: str) -> str:
        store = self.parts().store
        return store.resolve_tag(tag.removeprefix("tag:"))

    async def set_tag(self, image_uuid: str, tag: str) -> api.Image:
        store = self.parts().store
        return store.set_tag(_check_uuid(image_uuid, "image"), tag).to_api()

    async def delete_tag(self, image_uuid: str, tag: str | None = None) -> None:
        store = self.parts().store
        store.delete_tag(_check_uuid(image_uuid, "image"), tag)

    async def delete_image(self, image_uuid: str) -> int:
        """Delete an untagged image no operation uses and no other image descends from, with the layers
        only it used (beyond the API: the Contree cloud collects untagged images itself). Returns the
        bytes freed; Conflict names why an image must stay."""
        store, oplog = self.parts().store, self.parts().oplog
        pruned = await asyncio.to_thread(
            store.delete_image, _check_uuid(image_uuid, "image"), in_use=oplog.busy
        )
        return pruned.bytes

    async def disk_usage(self) -> DiskUsage:
        """What the engine home holds (beyond the API)."""
        store, oplog = self.parts().store, self.parts().oplog
        return await asyncio.to_thread(disk_usage, self.home, store, oplog.busy)

    async def image_lineage(self, image_uuid: str) -> ImageLineage:
        """Parent, children, ancestors (nearest first), root and depth of an image (`LineageReader`)."""
        store = self.parts().store
        chain = store.lineage(_check_uuid(image_uuid, "image"))
        children = store.children(image_uuid)
        return ImageLineage(
            uuid=image_uuid,
            parent=chain[1].to_api() if len(chain) > 1 else None,
            children=[c.to_api() for c in children],
            ancestors=[r.to_api() for r in chain[1:]],
            root=chain[-1].to_api(),
            depth=len(chain) - 1,
        )

    async def _resolve_source(self, source: str) -> str:
        store = self.parts().store
        if source.startswith("tag:"):
            return store.resolve_tag(source[4:])
        store.get(source)
        return source

    async def import_image(
        self, request: api.ImageImportRequest, *, local_roots: tuple[str, ...] | None = None
    ) -> str:
        """`local_roots`: where local sources may be read for this request, instead of the engine's own
        `import_roots` (the engine service passes the allowed roots of the MCP server that asked)."""
        oplog, queue = self.parts().oplog, self.parts().queue
        roots = self.import_roots if local_roots is None else local_roots
        if not request.registry.url:
            raise BadRequest("registry.url is required")
        if request.timeout < 1:
            raise BadRequest("timeout must be at least 1 second")
        meta = api.metadata_from(api.ImageImportMetadata.masked(request))
        record = oplog.create("image_import", image_uuid=None, metadata=meta)
        run = ImportRun(self.parts(), request=request, roots=roots)
        queue.submit(record.uuid, "image_import", run.execute, self._dropped)
        return record.uuid

    # ------------------------------------------------------------------ files

    async def upload_file(self, data: bytes | AsyncIterator[bytes]) -> api.FileResponse:
        return await self.parts().blobs.upload(data)

    async def get_file(self, sha256: str) -> api.File:
        return await asyncio.to_thread(self.parts().blobs.get, sha256)

    async def list_files(self, query: FileQuery) -> list[api.File]:
        return await asyncio.to_thread(self.parts().blobs.list, query)

    # ------------------------------------------------------------------ instances

    async def spawn(self, request: api.InstanceSpawnRequest) -> api.InstanceSpawnResponse:
        oplog, queue = self.parts().oplog, self.parts().queue
        spawn.validate_request(request)
        image_uuid = await self._resolve_source(request.image)
        for path, entry in (request.files or {}).items():
            if await asyncio.to_thread(self.parts().blobs.path_for, entry.uuid) is None:
                raise NotFound(f"files[{path!r}]: file {entry.uuid} not found (upload it first)")
        timeout = spawn.resolve_timeout(request.timeout, self.limits.instance_max_timeout)
        limits = self.parts().sandbox_limits.for_request(request.resources_limits)
        meta = api.metadata_from(api.OperationInstanceMetadata.from_request(request, image=image_uuid))
        record = oplog.create("instance", image_uuid=image_uuid, metadata=meta)
        run = InstanceRun(self.parts(), record=record, request=request, image_uuid=image_uuid,
                          timeout=timeout, limits=limits)
        self._runs[record.uuid] = run
        queue.submit(record.uuid, "instance", self._run_instance, self._dropped)
        return api.InstanceSpawnResponse.echo(request, uuid=record.uuid, image=image_uuid)

    async def _run_instance(self, job: Job) -> None:
        run = self._runs[job.op_uuid]
        try:
            await run.execute(job)
        finally:
            self._runs.pop(job.op_uuid, None)

    def _dropped(self, job: Job) -> None:
        """A job cancelled while still queued: CANCELLED without ever running."""
        oplog = self.parts().oplog
        self._runs.pop(job.op_uuid, None)
        record = oplog.get(job.op_uuid)
        if not record.terminal:
            oplog.finish(record, CANCELLED, error="cancelled before it started")

    # ------------------------------------------------------------------ operations

    async def list_operations(self, query: OperationQuery) -> list[api.OperationSummary]:
        oplog = self.parts().oplog
        records = oplog.query(status=query.status, kind=query.kind, since=query.since, until=query.until,
                              limit=query.limit, offset=query.offset)
        return [_summary(r) for r in records]

    async def get_operation(self, operation_id: str, *, inflight: bool = False) -> api.OperationResponse:
        oplog = self.parts().oplog
        record = oplog.get(_check_uuid(operation_id, "operation"))
        response = _response(record)
        if inflight and record.kind == "instance" and record.status in (ASSIGNED, EXECUTING):
            folded = fold_process(oplog.read_events(record.uuid), 1)
            if response.metadata is not None:
                response.metadata["result"] = msgspec.to_builtins(result_from_fold(folded))
        return response

    async def cancel_operation(self, operation_id: str) -> None:
        oplog, queue = self.parts().oplog, self.parts().queue
        record = oplog.get(_check_uuid(operation_id, "operation"))
        if record.terminal:
            raise Conflict(f"operation {operation_id} is already {record.status}")
        if not queue.cancel(record.uuid):
            raise Conflict(f"operation {operation_id} is not running in this engine")

    async def events(
        self, operation_id: str, *, follow: bool = False, spid: int | None = None, since: int | None = None
    ) -> AsyncIterator[api.OperationEvent]:
        oplog = self.parts().oplog
        _check_uuid(operation_id, "operation")
        if spid is not None and spid < 0:
            raise BadRequest("spid must be >= 0")
        async for event in oplog.events(operation_id, follow=follow, spid=spid, since=since):
            yield event

    async def read_output(
        self, operation_id: str, stream: str, *, spid: int = 1, offset: int = 0,
        limit: int = MAX_OUTPUT_PAGE, tail: bool = False,
    ) -> OutputPage:
        """A page of a process's whole stored stdout/stderr (beyond the API: the event log and
        `InstanceResult` keep only `truncate_output_at` bytes)."""
        oplog = self.parts().oplog
        _check_uuid(operation_id, "operation")
        return await asyncio.to_thread(
            oplog.read_output, operation_id, stream, spid=spid, offset=offset, limit=limit, tail=tail
        )

    # ------------------------------------------------------------------ subprocesses

    def _live_run(self, operation_id: str) -> InstanceRun:
        oplog = self.parts().oplog
        record = oplog.get(_check_uuid(operation_id, "operation"))
        if record.kind != "instance":
            raise Conflict(f"operation {operation_id} is not an instance")
        if record.terminal:
            raise Conflict(self.sandboxes.ended_text(record)
                           or f"operation {operation_id} is {record.status}, not running")
        run = self._runs.get(record.uuid)
        if run is None or not run.started:
            raise TooEarly(f"operation {operation_id} is not running yet", retry_after=1.0)
        return run

    async def create_subprocess(self, operation_id: str, spec: api.ExecSpec) -> int:
        spawn.validate_exec(spec)
        return await self._live_run(operation_id).exec(spec)

    async def get_subprocess(self, operation_id: str, spid: int) -> api.InstanceResult:
        oplog = self.parts().oplog
        record = oplog.get(_check_uuid(operation_id, "operation"))
        if spid < 1:
            raise BadRequest("spid must be >= 1")
        if record.status == CANCELLED:
            raise NotFound(f"operation {operation_id} was cancelled; its processes are gone")
        folded = fold_process(oplog.read_events(record.uuid), spid)
        if not folded.spawned:
            if record.status in (PENDING, ASSIGNED):
                raise TooEarly(f"operation {operation_id} has not started yet", retry_after=1.0)
            raise NotFound(f"operation {operation_id} has no process {spid}")
        return result_from_fold(folded)

    async def kill_subprocess(self, operation_id: str, spid: int, signal: str | int | None = None) -> None:
        await self._live_run(operation_id).kill(spid, signal)

    async def write_stdin(self, operation_id: str, spid: int, chunk: api.ClosableStreamRepr) -> None:
        oplog = self.parts().oplog
        record = oplog.get(_check_uuid(operation_id, "operation"))
        if record.terminal:
            raise Gone(self.sandboxes.ended_text(record)
                       or f"operation {operation_id} finished; there is no process to write to")
        try:
            data = api.decode_stream(chunk)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        await self._live_run(operation_id).write_stdin(spid, data, close=chunk.close)

    async def wait_subprocess(self, operation_id: str, spid: int, wait: float) -> api.InstanceResult:
        """`get_subprocess` once the process exited or `wait` seconds passed (beyond the API)."""
        return await self.sandboxes.wait_subprocess(operation_id, spid, wait)

    # ------------------------------------------------------------------ long-lived sandboxes

    async def start_sandbox(self, request: SandboxRequest) -> SandboxInfo:
        return await self.sandboxes.start(request)

    async def list_sandboxes(self) -> list[SandboxInfo]:
        return self.sandboxes.list()

    async def get_sandbox(self, sandbox_id: str) -> SandboxInfo:
        return self.sandboxes.get(sandbox_id)

    async def expose_port(self, sandbox_id: str, port: int) -> PortForward:
        return (await self.sandboxes.expose(sandbox_id, port))[0]

    async def close_port(self, sandbox_id: str, port: int) -> None:
        await self.sandboxes.close_port(sandbox_id, port)

    async def snapshot_sandbox(self, sandbox_id: str) -> SandboxSnapshot:
        return await self.sandboxes.snapshot(sandbox_id)

    async def stop_sandbox(self, sandbox_id: str, request: StopSandboxRequest) -> SandboxInfo:
        return await self.sandboxes.stop(sandbox_id, request)

    # ------------------------------------------------------------------ inspect

    def _image_for_inspect(self, image_uuid: str) -> ImageRecord:
        store = self.parts().store
        return store.get(_check_uuid(image_uuid, "image"))

    async def list_directory(self, image_uuid: str, path: str) -> api.DirectoryList:
        store = self.parts().store
        image = self._image_for_inspect(image_uuid)
        result: api.DirectoryList = await asyncio.to_thread(inspect.list_directory, store, image, path)
        return result

    async def list_directory_text(self, image_uuid: str, path: str) -> str:
        store = self.parts().store
        image = self._image_for_inspect(image_uuid)
        result: str = await asyncio.to_thread(inspect.list_directory_text, store, image, path)
        return result

    async def download(self, image_uuid: str, path: str) -> AsyncIterator[bytes]:
        store = self.parts().store
        image = self._image_for_inspect(image_uuid)
        async for chunk in inspect.read_file(store, image, path):
            yield chunk

    async def check_file(self, image_uuid: str, path: str) -> None:
        store = self.parts().store
        image = self._image_for_inspect(image_uuid)
        await asyncio.to_thread(inspect.check_file, store, image, path)

    async def archive(self, image_uuid: str, path: str) -> AsyncIterator[bytes]:
        store = self.parts().store
        image = self._image_for_inspect(image_uuid)
        async for chunk in inspect.archive(store, image, path):
            yield chunk

    async def check_archive(self, image_uuid: str, path: str) -> None:
        store = self.parts().store
        image = self._image_for_inspect(image_uuid)
        await asyncio.to_thread(inspect.check_archive, store, image, path)

    async def grep(self, image_uuid: str, query: GrepQuery) -> api.GrepResult:
        store = self.parts().store
        image = self._image_for_inspect(image_uuid)
        result: api.GrepResult = await inspect.grep(store, image, query)
        return result

    # ------------------------------------------------------------------ identity

    async def whoami(self) -> api.WhoAmIResponse:
        lim = self.limits
        return api.WhoAmIResponse(
            token_uuid=self._token,
            token_expiration=None,
            permissions={p: True for p in
                         ("import", "spawn", "spawn_disposable", "list", "cancel", "set_image_tag")},
            limits={
                "instance_max_timeout": lim.instance_max_timeout,
                "instance_max_concurrency": lim.instance_max_concurrency,
                "images_import_max_concurrency": lim.images_import_max_concurrency,
                "images_import_max_timeout": lim.images_import_max_timeout,
                "output_quota_bytes": lim.output_quota_bytes,
                "sandbox_max_count": lim.sandbox_max_count,
                "sandbox_max_ttl_seconds": lim.sandbox_max_ttl,
                "sandbox_default_ttl_seconds": min(DEFAULT_TTL, lim.sandbox_max_ttl),
                **(self._parts.sandbox_limits.whoami() if self._parts is not None else {}),
            },
            operations_stat={},
        )

    async def drain(self) -> None:
        """Wait for every queued operation to finish (tests and benchmarks)."""
        queue = self.parts().queue
        await queue.drain()


# ---------------------------------------------------------------------- helpers


def _check_uuid(value: str, what: str) -> str:
    try:
        uuidlib.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise BadRequest(f"invalid {what} id {value!r}: expected a UUID") from None
    return value


def _summary(record: OpRecord) -> api.OperationSummary:
    return api.OperationSummary(
        uuid=record.uuid, kind=record.kind, status=record.status,
        error=record.error, created_at=isoformat(record.created_at), duration=record.duration,
        image_size=record.image_size, consumed_cpu=record.consumed_cpu,
        consumed_memory=record.consumed_memory,
        image_uuid=record.image_uuid, result_image_uuid=record.result_image_uuid,
    )


def _response(record: OpRecord) -> api.OperationResponse:
    summary = _summary(record)
    fields = msgspec.structs.asdict(summary)
    result = None
    if record.terminal:
        result = api.OperationResult(image=record.result_image_uuid, tag=record.result_tag)
    return api.OperationResponse(**fields, metadata=dict(record.metadata), result=result)
