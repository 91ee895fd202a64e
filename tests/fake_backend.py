"""One in-memory Backend for the tests that need no engine: the REST layer (client ↔ server) and the tools.

Records are `contree.api` Structs, as a real backend returns them. Semantics follow the spec closely
enough for both: a spawned run echoes its `command` as stdout and finishes at once (unless `hold` is
cleared), with an event log a follower can wait on. The tool tests use the fake with
`auto_finish=False, event_log=False, spawned_status="PENDING"` (`tests.tools.fakes.FakeBackend`): a run
then stays queued until the test calls `finish`, and without an event log the tools poll, as they do on a
backend without one.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import posixpath
import tarfile
import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from contree import api
from contree.backend import FileQuery, GrepQuery, ImageQuery, OperationQuery
from contree.errors import BadRequest, Conflict, NotFound, TooEarly, Unprocessable
from contree.timeparse import isoformat, parse_timestamp

BUSYBOX_TREE: dict[str, bytes | None] = {
    "/bin": None,
    "/etc": None,
    "/etc/hosts": b"127.0.0.1 localhost\n",
    "/etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
}


def _now() -> str:
    return isoformat(time.time())


def new_id() -> str:
    return str(uuidlib.uuid4())


class FakeBackend:
    def __init__(
        self,
        *,
        auto_finish: bool = True,
        event_log: bool = True,
        download_chunk: int = 4096,
        spawned_status: api.OperationStatus = "EXECUTING",
    ) -> None:
        self.auto_finish = auto_finish  # False: a run keeps `spawned_status` until `finish`
        self.spawned_status = spawned_status
        self.event_log = event_log  # False: `events` raises NotImplementedError (followers poll)
        self.download_chunk = download_chunk
        self.images: dict[str, api.Image] = {}
        self.trees: dict[str, dict[str, bytes | None]] = {}  # image → path → bytes (file) or None (dir)
        self.files: dict[str, api.File] = {}
        self.blobs: dict[str, bytes] = {}
        self.ops: dict[str, api.OperationResponse] = {}
        self.op_events: dict[str, list[api.OperationEvent]] = {}
        self._grown = asyncio.Event()  # set (and replaced) whenever an event is appended
        self.hold = asyncio.Event()
        self.hold.set()  # cleared: spawned operations stay EXECUTING until set again
        self.stdin: dict[tuple[str, int], bytearray] = {}
        self.too_early: set[str] = set()
        self.closed = False
        # what the backend was asked, for assertions
        self.spawned: list[api.InstanceSpawnRequest] = []
        self.imports: list[api.ImageImportRequest] = []
        self.image_queries: list[ImageQuery] = []
        self.cancelled: list[str] = []
        self.busybox = self.add_image("busybox:latest", BUSYBOX_TREE)

    # ------------------------------------------------------------ helpers for tests

    def add_image(
        self, tag: str | None, tree: dict[str, bytes | None] | None = None, *, operation: str | None = None
    ) -> str:
        """A new image holding `tree` (path → content, None for a directory; parent directories are
        implied); returns its UUID."""
        image = api.Image(uuid=new_id(), tag=None, created_at=_now(), operation_uuid=operation)
        self.images[image.uuid] = image
        nodes: dict[str, bytes | None] = {"/": None}
        for path, content in (tree or {}).items():
            parent = posixpath.dirname(path)
            while parent not in nodes:
                nodes[parent] = None
                parent = posixpath.dirname(parent)
            nodes[path] = content
        self.trees[image.uuid] = nodes
        if tag:
            self._move_tag(image.uuid, tag)
        return image.uuid

    def add_op(
        self,
        status: api.OperationStatus,
        kind: api.OperationKind = "instance",
        *,
        image_uuid: str | None = None,
        result_image_uuid: str | None = None,
        metadata: dict[str, Any] | None = None,
        result: api.OperationResult | None = None,
    ) -> str:
        """An operation record as a test needs it (no event log); returns its id."""
        op = new_id()
        self.ops[op] = api.OperationResponse(
            uuid=op,
            kind=kind,
            status=status,
            created_at=_now(),
            image_uuid=image_uuid,
            result_image_uuid=result_image_uuid,
            metadata=metadata,
            result=result,
        )
        self.op_events[op] = []
        return op

    def finish(
        self,
        op: str,
        *,
        stdout: bytes | str = b"",
        exit_code: int = 0,
        result_image: str | None = None,
        status: api.TerminalStatus = "SUCCESS",
    ) -> None:
        """End a run: its result (stdout, exit code) in the record and, with an event log, the events."""
        data = stdout.encode() if isinstance(stdout, str) else stdout
        record = self.ops[op]
        if data:
            self._emit(op, "stdout", api.encode_event_stream(data), 1)
        self._emit(
            op, "exit", api.EventDataExit(pid=2, code=exit_code, signal=-1, timed_out=False, duration_ms=1), 1
        )
        result = api.InstanceResult(
            state=api.ProcessState(exit_code=exit_code, pid=2), stdout=api.encode_stream(data),
            stderr=api.encode_stream(b""),
        )  # fmt: skip
        record.status = status
        record.duration = 0.01
        record.result_image_uuid = result_image
        record.metadata = {**(record.metadata or {}), "result": msgspec.to_builtins(result)}
        record.result = api.OperationResult(image=result_image)
        completion = api.EventDataCompletion(status=status, duration_ms=10, result_image_uuid=result_image)
        self._emit(op, "completion", completion, None)

    def _move_tag(self, image_uuid: str, tag: str) -> None:
        for other in self.images.values():
            if other.tag == tag:
                other.tag = None
        self.images[image_uuid].tag = tag

    def _image(self, image_uuid: str) -> api.Image:
        image = self.images.get(image_uuid)
        if image is None:
            raise NotFound(f"image not found: {image_uuid}")
        return image

    def _op(self, op: str) -> api.OperationResponse:
        record = self.ops.get(op)
        if record is None:
            raise NotFound(f"operation not found: {op}")
        return record

    def _emit(self, op: str, type_: api.OperationEventType, data: api.EventData, spid: int | None) -> None:
        events = self.op_events[op]
        event = api.OperationEvent.make(id=len(events), ts=_now(), type=type_, data=data, spid=spid)
        events.append(event)
        grown, self._grown = self._grown, asyncio.Event()
        grown.set()

    # ------------------------------------------------------------ images and tags

    async def list_images(self, query: ImageQuery) -> list[api.Image]:
        self.image_queries.append(query)
        images = list(self.images.values())
        if query.tagged or query.tag:
            images = [i for i in images if i.tag and i.tag.startswith(query.tag or "")]
        if query.uuid:
            images = [i for i in images if i.uuid == query.uuid]
        if query.since:
            cut = parse_timestamp(query.since)
            images = [i for i in images if parse_timestamp(i.created_at) >= cut]
        if query.until:
            cut = parse_timestamp(query.until)
            images = [i for i in images if parse_timestamp(i.created_at) <= cut]
        return images[query.offset : query.offset + query.limit]

    async def get_image(self, image_uuid: str) -> api.Image:
        return self._image(image_uuid)

    async def resolve_tag(self, tag: str) -> str:
        for image in self.images.values():
            if image.tag == tag:
                return image.uuid
        raise NotFound(f"tag not found: {tag}")

    async def set_tag(self, image_uuid: str, tag: str) -> api.Image:
        self._image(image_uuid)
        self._move_tag(image_uuid, tag)
        return self.images[image_uuid]

    async def delete_tag(self, image_uuid: str, tag: str | None = None) -> None:
        image = self._image(image_uuid)
        if tag is None or image.tag == tag:
            image.tag = None

    async def import_image(self, request: api.ImageImportRequest) -> str:
        self.imports.append(request)
        url = request.registry.url
        if "://" in url and not url.startswith("docker://"):
            raise BadRequest(f"unsupported registry url: {url}")
        op = new_id()
        image = self.add_image(request.tag, {"/imported": b"yes\n"}, operation=op)
        self.ops[op] = api.OperationResponse(
            uuid=op,
            kind="image_import",
            status="SUCCESS",
            created_at=_now(),
            duration=0.0,
            result_image_uuid=image,
            metadata=api.metadata_from(api.ImageImportMetadata.masked(request)),
            result=api.OperationResult(image=image, tag=request.tag),
        )
        self.op_events[op] = []
        return op

    # ------------------------------------------------------------ files

    async def upload_file(self, data: bytes | AsyncIterator[bytes]) -> api.FileResponse:
        if isinstance(data, bytes):
            content = data
        else:
            content = b"".join([chunk async for chunk in data])
        sha = hashlib.sha256(content).hexdigest()
        now = _now()
        existing = self.files.get(sha)
        if existing is None:
            existing = api.File(uuid=new_id(), sha256=sha, size=len(content), created_at=now, updated_at=now)
        else:
            existing.updated_at = now
        self.files[sha] = existing
        self.blobs[sha] = content
        return api.FileResponse(uuid=existing.uuid, sha256=sha, size=len(content))

    async def get_file(self, sha256: str) -> api.File:
        record = self.files.get(sha256)
        if record is None:
            raise NotFound(f"file not found: {sha256}")
        return record

    async def list_files(self, query: FileQuery) -> list[api.File]:
        return list(self.files.values())[query.offset : query.offset + query.limit]

    # ------------------------------------------------------------ instances and operations

    async def spawn(self, request: api.InstanceSpawnRequest) -> api.InstanceSpawnResponse:
        self.spawned.append(request)
        image = request.image
        if image.startswith("tag:"):
            image = await self.resolve_tag(image[4:])
        self._image(image)
        op = new_id()
        self.ops[op] = api.OperationResponse(
            uuid=op,
            kind="instance",
            status=self.spawned_status,
            created_at=_now(),
            image_uuid=image,
            metadata=api.metadata_from(api.OperationInstanceMetadata.from_request(request, image=image)),
        )
        self.op_events[op] = []
        self._emit(op, "init", api.EventDataInit(started_at=_now(), runtime_path="/run", init_pid=1), 0)
        self._emit(op, "spawn", api.EventDataSpawn(pid=2, command=request.command), 1)
        if self.auto_finish:
            asyncio.get_running_loop().create_task(self._finish_when_released(op, request, image))
        return api.InstanceSpawnResponse.echo(request, uuid=op, image=image)

    async def _finish_when_released(self, op: str, request: api.InstanceSpawnRequest, image: str) -> None:
        await self.hold.wait()
        if self.ops[op].status != "EXECUTING":
            return
        stdout = request.command.encode() + b"\n" + bytes(self.stdin.get((op, 1), b""))
        self.finish(op, stdout=stdout, result_image=None if request.disposable else image)

    async def list_operations(self, query: OperationQuery) -> list[api.OperationSummary]:
        ops = [o.summary() for o in self.ops.values()]
        if query.status:
            ops = [o for o in ops if o.status == query.status]
        if query.kind:
            ops = [o for o in ops if o.kind == query.kind]
        return ops[query.offset : query.offset + query.limit]

    async def get_operation(self, operation_id: str, *, inflight: bool = False) -> api.OperationResponse:
        # a fresh record per read, as over the wire: a later change does not reach an earlier answer
        return msgspec.structs.replace(self._op(operation_id))

    async def cancel_operation(self, operation_id: str) -> None:
        record = self._op(operation_id)
        if record.status in api.TERMINAL_STATUSES:
            raise Conflict(f"operation {operation_id} is already {record.status}")
        self.cancelled.append(operation_id)
        record.status = "CANCELLED"
        completion = api.EventDataCompletion(status="CANCELLED", duration_ms=1, error="cancelled")
        self._emit(operation_id, "completion", completion, None)

    async def events(
        self, operation_id: str, *, follow: bool = False, spid: int | None = None, since: int | None = None
    ) -> AsyncIterator[api.OperationEvent]:
        if not self.event_log:
            raise NotImplementedError("this fake keeps no event log")
        self._op(operation_id)
        if operation_id in self.too_early:
            raise TooEarly("events not yet available", retry_after=0)
        position = 0
        while True:
            events = self.op_events[operation_id]
            while position < len(events):
                event = events[position]
                position += 1
                if since is not None and event.id <= since:
                    continue
                if spid is not None and event.spid != spid:
                    continue
                yield event
            if not follow or self.ops[operation_id].status in api.TERMINAL_STATUSES:
                if position >= len(self.op_events[operation_id]):
                    return
                continue
            grown = self._grown
            if len(self.op_events[operation_id]) == position:
                await grown.wait()

    # ------------------------------------------------------------ subprocesses

    async def create_subprocess(self, operation_id: str, spec: api.ExecSpec) -> int:
        record = self._op(operation_id)
        if record.status != "EXECUTING":
            raise Conflict(f"operation {operation_id} is not running")
        spids = {e.spid for e in self.op_events[operation_id] if e.spid}
        spid = max(spids | {1}) + 1
        self._emit(operation_id, "spawn", api.EventDataSpawn(pid=10 + spid, command=spec.command), spid)
        return spid

    async def get_subprocess(self, operation_id: str, spid: int) -> api.InstanceResult:
        self._op(operation_id)
        if not any(e.spid == spid for e in self.op_events[operation_id]):
            raise NotFound(f"no subprocess {spid}")
        return api.InstanceResult(state=api.ProcessState(pid=10 + spid))

    async def kill_subprocess(self, operation_id: str, spid: int, signal: str | int | None = None) -> None:
        await self.get_subprocess(operation_id, spid)

    async def write_stdin(self, operation_id: str, spid: int, chunk: api.ClosableStreamRepr) -> None:
        record = self._op(operation_id)
        if record.status != "EXECUTING":
            raise Conflict("stdin is closed")
        self.stdin.setdefault((operation_id, spid), bytearray()).extend(api.decode_stream(chunk))

    # ------------------------------------------------------------ inspect

    def _node(self, image_uuid: str, path: str) -> bytes | None:
        tree = self.trees[self._image(image_uuid).uuid]
        norm = "/" + path.strip("/") if path.strip("/") else "/"
        if norm not in tree:
            raise NotFound(f"no such file: {path}")
        return tree[norm]

    def _children(self, image_uuid: str, path: str) -> list[api.FileItem]:
        if self._node(image_uuid, path) is not None:
            raise Unprocessable(f"not a directory: {path}")
        prefix = "/" + path.strip("/") if path.strip("/") else ""
        items = []
        for name, content in sorted(self.trees[image_uuid].items()):
            if name == "/" or not name.startswith(prefix + "/") or "/" in name[len(prefix) + 1 :]:
                continue
            is_dir = content is None
            items.append(
                api.FileItem(
                    size=0 if content is None else len(content),
                    path=name[len(prefix) + 1 :],
                    owner="root",
                    group="root",
                    mode=0o40755 if is_dir else 0o100644,
                    mtime=0,
                    nlink=1,
                    uid=0,
                    gid=0,
                    is_dir=is_dir,
                    is_regular=not is_dir,
                    is_symlink=False,
                    is_socket=False,
                    is_fifo=False,
                    symlink_to="",
                )
            )
        return items

    async def list_directory(self, image_uuid: str, path: str) -> api.DirectoryList:
        return api.DirectoryList(path=path, files=self._children(image_uuid, path))

    async def list_directory_text(self, image_uuid: str, path: str) -> str:
        items = self._children(image_uuid, path)
        return "total 0\n" + "".join(
            f"{'d' if i.is_dir else '-'}rw-r--r-- 1 0 0 {i.size} {i.path}\n" for i in items
        )

    async def download(self, image_uuid: str, path: str) -> AsyncIterator[bytes]:
        content = self._node(image_uuid, path)
        if content is None:
            raise Unprocessable(f"not a regular file: {path}")
        for start in range(0, len(content), self.download_chunk):
            yield content[start : start + self.download_chunk]

    async def check_file(self, image_uuid: str, path: str) -> None:
        if self._node(image_uuid, path) is None:
            raise Unprocessable(f"not a regular file: {path}")

    async def archive(self, image_uuid: str, path: str) -> AsyncIterator[bytes]:
        content = self._node(image_uuid, path)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            if content is not None:
                info = tarfile.TarInfo(path.rsplit("/", 1)[-1])
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                for item in self._children(image_uuid, path):
                    info = tarfile.TarInfo(item.path)
                    data = self.trees[image_uuid].get(path.rstrip("/") + "/" + item.path) or b""
                    info.type = tarfile.DIRTYPE if item.is_dir else tarfile.REGTYPE
                    info.size = 0 if item.is_dir else len(data)
                    tar.addfile(info, None if item.is_dir else io.BytesIO(data))
        yield buffer.getvalue()

    async def check_archive(self, image_uuid: str, path: str) -> None:
        self._node(image_uuid, path)

    async def grep(self, image_uuid: str, query: GrepQuery) -> api.GrepResult:
        """Literal patterns, one match per line that contains one."""
        self._image(image_uuid)
        matches = []
        for name, content in sorted(self.trees[image_uuid].items()):
            if content is None:
                continue
            for number, line in enumerate(content.splitlines(keepends=True), 1):
                for pattern in query.pattern:
                    start = line.find(pattern.encode())
                    if start >= 0:
                        matches.append(
                            api.GrepMatch(
                                path=name,
                                line_number=number,
                                absolute_offset=0,
                                line_text=line.decode(errors="replace"),
                                line_bytes=len(line),
                                submatches=[
                                    api.GrepSubmatch(text=pattern, start=start, end=start + len(pattern))
                                ],
                                type="match",
                            )
                        )
                        break
        return api.GrepResult(path=query.path[0], patterns=query.pattern, matches=matches, truncated=False)

    async def whoami(self) -> api.WhoAmIResponse:
        return api.WhoAmIResponse(
            token_uuid="00000000-0000-0000-0000-000000000000",
            token_expiration=None,
            permissions={"spawn": True, "list": True},
            operations_stat={},
            limits={"instance_max_timeout": 3600},
        )

    async def close(self) -> None:
        self.closed = True
