"""`LocalEngine`: the embedded engine behind the `Backend` interface.

Wiring only: the store (images, layers), blobs (uploaded files), the operation log and queue, the
sandbox runtime and the inspect resolver are separate modules; the life of one instance is
`spawn_run.InstanceRun`. Everything runs on the caller's event loop; blocking filesystem work goes to
threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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
from contree.engine import inspect, spawn
from contree.engine.blobs import BlobStore
from contree.engine.home import prepare_home
from contree.engine.limits import HostResources, LimitPolicy, ResourceSettings, SandboxLimits, resolve_policy
from contree.engine.operations import Job, OperationQueue
from contree.engine.oplog import (
    ASSIGNED,
    CANCELLED,
    DEFAULT_OUTPUT_QUOTA,
    EXECUTING,
    FAILED,
    SUCCESS,
    OperationLog,
    OpRecord,
    completion_data,
    fold_process,
)
from contree.engine.prune import disk_usage
from contree.engine.sandbox import RuntimeConfig, SandboxRuntime
from contree.engine.spawn_recover import engine_id_for, recover_host
from contree.engine.spawn_run import SPARE_SCRATCH_DIRS, InstanceRun, result_from_fold
from contree.engine.store import MAX_DEPTH, ImageRecord, Store
from contree.engine.watchdog import Watchdog
from contree.errors import BackendError, BadRequest, Conflict, Gone, NotFound, TooEarly
from contree.timeparse import isoformat

log = logging.getLogger(__name__)

LOCK_GRACE_S = 0.5
NETWORK_ENV = "CONTREE_ENGINE_NETWORK"  # auto | nat | slirp | pasta (rootless) | none


class EngineLimits(msgspec.Struct, kw_only=True):
    squash_depth: int = MAX_DEPTH  # an image deeper than this many layers is flattened after its run
    instance_max_timeout: int = 3600
    instance_max_concurrency: int = max(4, 2 * (os.cpu_count() or 1))
    images_import_max_concurrency: int = 2
    images_import_max_timeout: int = 3600
    output_quota_bytes: int = DEFAULT_OUTPUT_QUOTA  # stdout+stderr one run may store (the rest is counted)
    # Sandbox memory/CPU/pids: defaults, per-run maxima and the engine's total (None = from the host).
    resources: ResourceSettings = msgspec.field(default_factory=ResourceSettings)


class LocalEngine:
    """One Contree namespace served by crun + overlayfs on this machine."""

    def __init__(
        self,
        home: Path,
        *,
        runtime_config: Any = None,
        limits: EngineLimits | None = None,
        import_roots: tuple[str, ...] | None = None,
    ) -> None:
        self.home = Path(home)
        self.limits = limits or EngineLimits()
        # Directories local image sources (oci-archive:, docker-archive:, oci:) must resolve into;
        # None = anything the engine can read. Front ends serving remote clients pass their roots.
        self.import_roots = import_roots
        self.runtime_config = runtime_config
        self.store: Store | None = None
        self.oplog: OperationLog | None = None
        self.queue: OperationQueue | None = None
        self.runtime: Any = None
        self.blobs: BlobStore | None = None
        self.watchdog: Watchdog | None = None
        self._runs: dict[str, InstanceRun] = {}
        self.sandbox_limits: LimitPolicy | None = None  # resolved from `limits.resources` at start
        self._layer_cap: int | None = None
        self._lock_fd = -1
        self._token = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"contree-local:{self.home.resolve()}"))

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the store and the operation log, recover from a previous crash, start the runtime."""
        prepare_home(self.home)  # 0700, or refused/repaired before anything in it is used
        if self._lock_fd < 0:
            await self.lock_home()
        try:
            await self._open()
        except BaseException:
            await self.close()  # release the lock, the databases and whatever the runtime set up
            raise

    async def _open(self) -> None:
        engine_id = engine_id_for(self.home)
        # A previous engine on this home may have died with sandboxes running: they pin mounts,
        # cgroups and netns, so they go first, then the store can unmount and clean its scratch space.
        actions = await asyncio.to_thread(recover_host, engine_id)
        if actions:
            log.warning("recovered after an unclean stop: %s", "; ".join(actions))
        self.store = await asyncio.to_thread(Store, self.home)
        await asyncio.to_thread(self.store.recover)
        await asyncio.to_thread(self.store.gc)  # layers orphaned by a crash mid-import or mid-squash
        await asyncio.to_thread(self.store.make_spare_scratch, SPARE_SCRATCH_DIRS)
        self.oplog = OperationLog(self.home, output_quota=self.limits.output_quota_bytes)
        interrupted = self.oplog.recover()
        if interrupted:
            log.warning("marked %d interrupted operations FAILED", len(interrupted))
        await self._start_runtime(engine_id)
        # Kills the sandboxes at their deadline and releases everything at once if this process dies.
        self.watchdog = Watchdog.start(engine_id=engine_id, cgroup_parent=self.runtime.cgroups.parent,
                                       home=self.home, runtime_root=self.runtime.root_dir)
        self.blobs = BlobStore(self.home / "blobs")
        self.queue = OperationQueue({
            "instance": self.limits.instance_max_concurrency,
            "image_import": self.limits.images_import_max_concurrency,
        })

    async def _start_runtime(self, engine_id: str) -> None:
        """The runtime, its parent cgroup carrying the engine's total budget, and the sandbox limits."""
        host = await asyncio.to_thread(HostResources.detect)
        config = self._runtime_config(engine_id)
        wanted = self.limits.resources
        # A runtime_config that names a budget (tests, embedders) wins over the settings' totals.
        settings = msgspec.structs.replace(
            wanted, total_memory_bytes=config.budget_memory_bytes or wanted.total_memory_bytes,
            total_cpus=config.budget_cpus or wanted.total_cpus,
            total_pids=config.budget_pids or wanted.total_pids)
        total = resolve_policy(settings, host).total  # refuses a misordered configuration before any setup
        self.runtime = await SandboxRuntime.create(msgspec.structs.replace(
            config, budget_memory_bytes=total.memory_bytes, budget_cpus=total.cpus, budget_pids=total.pids))
        self.sandbox_limits = resolve_policy(settings, host, self.runtime.cgroups.enforceable())
        if not getattr(self.runtime.cgroups, "enforces_total", True):  # rootless, no delegated cgroup
            self.sandbox_limits = msgspec.structs.replace(self.sandbox_limits, total=SandboxLimits())
        # A run's changes are held in memory (upperfs): without a memory limit, bound them by the host.
        self._layer_cap = self.sandbox_limits.maximum.memory_bytes or host.memory_bytes // 4

    def _runtime_config(self, engine_id: str) -> Any:
        config = self.runtime_config or RuntimeConfig(
            state_dir=self.home / "runtime", network_mode=os.environ.get(NETWORK_ENV) or "auto")
        return msgspec.structs.replace(config, engine_id=engine_id)

    async def lock_home(self) -> None:
        """One engine per home: a second one would kill the first one's sandboxes as 'leftovers'.

        Right after an engine was killed, a child it was forking can still hold the lock's open file
        description until it execs (seen in test_crash: gone within milliseconds), so a lock that frees
        up within LOCK_GRACE_S is not taken for a live engine. `start()` takes the lock itself; the
        engine service takes it first (Conflict = another engine holds the home), so it knows it won
        before it binds the home's socket."""
        fd = os.open(self.home / "engine.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + LOCK_GRACE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise Conflict(f"another engine is running on {self.home}") from None
                await asyncio.sleep(0.01)
        self._lock_fd = fd

    async def close(self) -> None:
        """Cancel running work, stop the runtime, close the databases. Safe to call twice."""
        if self.queue is not None:
            await self.queue.close()
            self.queue = None
        if self.runtime is not None:
            runtime, self.runtime = self.runtime, None
            try:
                await runtime.close()
            except Exception:  # keep closing: the databases and the home lock must be released
                log.exception("closing the sandbox runtime failed")
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        if self.oplog is not None:
            self.oplog.close()
            self.oplog = None
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.blobs is not None:
            self.blobs.close()
            self.blobs = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    async def __aenter__(self) -> LocalEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _blobs(self) -> BlobStore:
        if self.blobs is None:
            raise RuntimeError("LocalEngine.start() was not awaited")
        return self.blobs

    def _parts(self) -> tuple[Store, OperationLog, OperationQueue]:
        if self.store is None or self.oplog is None or self.queue is None:
            raise RuntimeError("LocalEngine.start() was not awaited")
        return self.store, self.oplog, self.queue

    # ------------------------------------------------------------------ images and tags

    async def list_images(self, query: ImageQuery) -> list[api.Image]:
        store, _, _ = self._parts()
        return [r.to_api() for r in store.list(query)]

    async def get_image(self, image_uuid: str) -> api.Image:
        store, _, _ = self._parts()
        return store.get(_check_uuid(image_uuid, "image")).to_api()

    async def resolve_tag(self, tag: str) -> str:
        store, _, _ = self._parts()
        return store.resolve_tag(tag.removeprefix("tag:"))

    async def set_tag(self, image_uuid: str, tag: str) -> api.Image:
        store, _, _ = self._parts()
        return store.set_tag(_check_uuid(image_uuid, "image"), tag).to_api()

    async def delete_tag(self, image_uuid: str, tag: str | None = None) -> None:
        store, _, _ = self._parts()
        store.delete_tag(_check_uuid(image_uuid, "image"), tag)

    async def delete_image(self, image_uuid: str) -> int:
        """Delete an untagged image no operation uses and no other image descends from, with the layers
        only it used (beyond the API: the Contree cloud collects untagged images itself). Returns the
        bytes freed; Conflict names why an image must stay."""
        store, oplog, _ = self._parts()
        pruned = await asyncio.to_thread(
            store.delete_image, _check_uuid(image_uuid, "image"), in_use=oplog.busy
        )
        return pruned.bytes

    async def disk_usage(self) -> DiskUsage:
        """What the engine home holds (beyond the API)."""
        store, oplog, _ = self._parts()
        return await asyncio.to_thread(disk_usage, self.home, store, oplog.busy)

    async def image_lineage(self, image_uuid: str) -> ImageLineage:
        """Parent, children, ancestors (nearest first), root and depth of an image (`LineageReader`)."""
        store, _, _ = self._parts()
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
        store, _, _ = self._parts()
        if source.startswith("tag:"):
            return store.resolve_tag(source[4:])
        store.get(source)
        return source

    async def import_image(
        self, request: api.ImageImportRequest, *, local_roots: tuple[str, ...] | None = None
    ) -> str:
        """`local_roots`: where local sources may be read for this request, instead of the engine's own
        `import_roots` (the engine service passes the allowed roots of the MCP server that asked)."""
        _, oplog, queue = self._parts()
        roots = self.import_roots if local_roots is None else local_roots
        if not request.registry.url:
            raise BadRequest("registry.url is required")
        if request.timeout < 1:
            raise BadRequest("timeout must be at least 1 second")
        meta = api.metadata_from(api.ImageImportMetadata.masked(request))
        record = oplog.create("image_import", image_uuid=None, metadata=meta)
        queue.submit(record.uuid, "image_import", lambda job: self._run_import(job, request, roots),
                     self._dropped)
        return record.uuid

    async def _run_import(
        self, job: Job, request: api.ImageImportRequest, roots: tuple[str, ...] | None
    ) -> None:
        from contree.oci import importer

        store, oplog, _ = self._parts()
        record = oplog.get(job.op_uuid)
        record.status = EXECUTING
        record.started_at = time.time()
        oplog.save(record)
        events = oplog.open_log(record.uuid)
        timeout = min(request.timeout, self.limits.images_import_max_timeout)
        options = msgspec.structs.replace(importer.default_options(), local_roots=roots)
        task = asyncio.create_task(
            importer.import_image(store, request, operation_id=record.uuid, options=options)
        )
        cancel = asyncio.create_task(job.cancelled.wait())
        try:
            done, _ = await asyncio.wait({task, cancel}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                image = task.result()
                record.status = SUCCESS
                record.result_image_uuid = image.uuid
                record.result_tag = image.tag
                record.image_size = image.total_size
            else:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                if cancel in done:
                    record.status, record.error = CANCELLED, "cancelled"
                else:
                    record.status, record.error = FAILED, f"import timed out after {timeout} s"
        except Exception as exc:
            record.status, record.error = FAILED, _error_text(exc)
        finally:
            cancel.cancel()
            record.finished_at = time.time()
            events.append("completion", completion_data(record))
            oplog.save(record)
            oplog.finish_log(record.uuid)

    # ------------------------------------------------------------------ files

    async def upload_file(self, data: bytes | AsyncIterator[bytes]) -> api.FileResponse:
        return await self._blobs().upload(data)

    async def get_file(self, sha256: str) -> api.File:
        return await asyncio.to_thread(self._blobs().get, sha256)

    async def list_files(self, query: FileQuery) -> list[api.File]:
        return await asyncio.to_thread(self._blobs().list, query)

    # ------------------------------------------------------------------ instances

    async def spawn(self, request: api.InstanceSpawnRequest) -> api.InstanceSpawnResponse:
        _, oplog, queue = self._parts()
        spawn.validate_request(request)
        image_uuid = await self._resolve_source(request.image)
        for path, entry in (request.files or {}).items():
            if await asyncio.to_thread(self._blobs().path_for, entry.uuid) is None:
                raise NotFound(f"files[{path!r}]: file {entry.uuid} not found (upload it first)")
        timeout = spawn.resolve_timeout(request.timeout, self.limits.instance_max_timeout)
        assert self.sandbox_limits is not None
        limits = self.sandbox_limits.for_request(request.resources_limits)
        meta = api.metadata_from(api.OperationInstanceMetadata.from_request(request, image=image_uuid))
        record = oplog.create("instance", image_uuid=image_uuid, metadata=meta)
        run = InstanceRun(
            engine=self, record=record, request=request, image_uuid=image_uuid, timeout=timeout,
            limits=limits, layer_cap=self._layer_cap,
        )
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
        _, oplog, _ = self._parts()
        self._runs.pop(job.op_uuid, None)
        record = oplog.get(job.op_uuid)
        if record.terminal:
            return
        record.status, record.error = CANCELLED, "cancelled before it started"
        record.finished_at = time.time()
        events = oplog.open_log(record.uuid)
        events.append("completion", completion_data(record))
        oplog.save(record)
        oplog.finish_log(record.uuid)

    # ------------------------------------------------------------------ operations

    async def list_operations(self, query: OperationQuery) -> list[api.OperationSummary]:
        _, oplog, _ = self._parts()
        records = oplog.query(status=query.status, kind=query.kind, since=query.since, until=query.until,
                              limit=query.limit, offset=query.offset)
        return [_summary(r) for r in records]

    async def get_operation(self, operation_id: str, *, inflight: bool = False) -> api.OperationResponse:
        _, oplog, _ = self._parts()
        record = oplog.get(_check_uuid(operation_id, "operation"))
        response = _response(record)
        if inflight and record.kind == "instance" and record.status in (ASSIGNED, EXECUTING):
            folded = fold_process(oplog.read_events(record.uuid), 1)
            if response.metadata is not None:
                response.metadata["result"] = msgspec.to_builtins(result_from_fold(folded))
        return response

    async def cancel_operation(self, operation_id: str) -> None:
        _, oplog, queue = self._parts()
        record = oplog.get(_check_uuid(operation_id, "operation"))
        if record.terminal:
            raise Conflict(f"operation {operation_id} is already {record.status}")
        if not queue.cancel(record.uuid):
            raise Conflict(f"operation {operation_id} is not running in this engine")

    async def events(
        self, operation_id: str, *, follow: bool = False, spid: int | None = None, since: int | None = None
    ) -> AsyncIterator[api.OperationEvent]:
        _, oplog, _ = self._parts()
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
        _, oplog, _ = self._parts()
        _check_uuid(operation_id, "operation")
        return await asyncio.to_thread(
            oplog.read_output, operation_id, stream, spid=spid, offset=offset, limit=limit, tail=tail
        )

    # ------------------------------------------------------------------ subprocesses

    def _live_run(self, operation_id: str) -> InstanceRun:
        _, oplog, _ = self._parts()
        record = oplog.get(_check_uuid(operation_id, "operation"))
        if record.kind != "instance":
            raise Conflict(f"operation {operation_id} is not an instance")
        if record.terminal:
            raise Conflict(f"operation {operation_id} is {record.status}, not running")
        run = self._runs.get(record.uuid)
        if run is None or not run.started:
            raise TooEarly(f"operation {operation_id} is not running yet", retry_after=1.0)
        return run

    async def create_subprocess(self, operation_id: str, spec: api.ExecSpec) -> int:
        spawn.validate_exec(spec)
        return await self._live_run(operation_id).exec(spec)

    async def get_subprocess(self, operation_id: str, spid: int) -> api.InstanceResult:
        _, oplog, _ = self._parts()
        record = oplog.get(_check_uuid(operation_id, "operation"))
        if spid < 1:
            raise BadRequest("spid must be >= 1")
        if record.status == CANCELLED:
            raise NotFound(f"operation {operation_id} was cancelled; its processes are gone")
        folded = fold_process(oplog.read_events(record.uuid), spid)
        if not folded.spawned:
            if record.status in ("PENDING", ASSIGNED):
                raise TooEarly(f"operation {operation_id} has not started yet", retry_after=1.0)
            raise NotFound(f"operation {operation_id} has no process {spid}")
        return result_from_fold(folded)

    async def kill_subprocess(self, operation_id: str, spid: int, signal: str | int | None = None) -> None:
        await self._live_run(operation_id).kill(spid, signal)

    async def write_stdin(self, operation_id: str, spid: int, chunk: api.ClosableStreamRepr) -> None:
        _, oplog, _ = self._parts()
        record = oplog.get(_check_uuid(operation_id, "operation"))
        if record.terminal:
            raise Gone(f"operation {operation_id} finished; there is no process to write to")
        try:
            data = api.decode_stream(chunk)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        await self._live_run(operation_id).write_stdin(spid, data, close=chunk.close)

    # ------------------------------------------------------------------ inspect

    def _image_for_inspect(self, image_uuid: str) -> ImageRecord:
        store, _, _ = self._parts()
        return store.get(_check_uuid(image_uuid, "image"))

    async def list_directory(self, image_uuid: str, path: str) -> api.DirectoryList:
        store, _, _ = self._parts()
        image = self._image_for_inspect(image_uuid)
        result: api.DirectoryList = await asyncio.to_thread(inspect.list_directory, store, image, path)
        return result

    async def list_directory_text(self, image_uuid: str, path: str) -> str:
        store, _, _ = self._parts()
        image = self._image_for_inspect(image_uuid)
        result: str = await asyncio.to_thread(inspect.list_directory_text, store, image, path)
        return result

    async def download(self, image_uuid: str, path: str) -> AsyncIterator[bytes]:
        store, _, _ = self._parts()
        image = self._image_for_inspect(image_uuid)
        async for chunk in inspect.read_file(store, image, path):
            yield chunk

    async def check_file(self, image_uuid: str, path: str) -> None:
        store, _, _ = self._parts()
        image = self._image_for_inspect(image_uuid)
        await asyncio.to_thread(inspect.check_file, store, image, path)

    async def archive(self, image_uuid: str, path: str) -> AsyncIterator[bytes]:
        store, _, _ = self._parts()
        image = self._image_for_inspect(image_uuid)
        async for chunk in inspect.archive(store, image, path):
            yield chunk

    async def check_archive(self, image_uuid: str, path: str) -> None:
        store, _, _ = self._parts()
        image = self._image_for_inspect(image_uuid)
        await asyncio.to_thread(inspect.check_archive, store, image, path)

    async def grep(self, image_uuid: str, query: GrepQuery) -> api.GrepResult:
        store, _, _ = self._parts()
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
                **(self.sandbox_limits.whoami() if self.sandbox_limits is not None else {}),
            },
            operations_stat={},
        )

    async def drain(self) -> None:
        """Wait for every queued operation to finish (tests and benchmarks)."""
        _, _, queue = self._parts()
        await queue.drain()


# ---------------------------------------------------------------------- helpers


def _check_uuid(value: str, what: str) -> str:
    try:
        uuidlib.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise BadRequest(f"invalid {what} id {value!r}: expected a UUID") from None
    return value


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, BackendError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


def _summary(record: OpRecord) -> api.OperationSummary:
    return api.OperationSummary(
        uuid=record.uuid, kind=record.kind,  # type: ignore[arg-type]
        status=record.status,  # type: ignore[arg-type]
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
