"""An in-memory Backend for exercising the HTTP layer (client ↔ server) without the engine.

Semantics follow the spec closely enough for transport tests: spawn echoes `command` as stdout and
finishes at once unless `hold` is cleared; events are kept per operation with a condition for follow.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import tarfile
import time
import uuid as uuidlib
from collections.abc import AsyncIterator

from contree import api
from contree.backend import FileQuery, GrepQuery, ImageQuery, OperationQuery
from contree.errors import BadRequest, Conflict, NotFound, TooEarly, Unprocessable
from contree.timeparse import isoformat, parse_timestamp


def _now() -> str:
    return isoformat(time.time())


class FakeBackend:
    def __init__(self) -> None:
        self.images: dict[str, api.Image] = {}
        self.trees: dict[str, dict[str, bytes | None]] = {}  # path → bytes (file) or None (dir)
        self.files: dict[str, api.File] = {}
        self.blobs: dict[str, bytes] = {}
        self.ops: dict[str, api.OperationResponse] = {}
        self.op_events: dict[str, list[api.OperationEvent]] = {}
        self.changed = asyncio.Condition()
        self.hold = asyncio.Event()
        self.hold.set()  # cleared: spawned operations stay EXECUTING until set again
        self.spawn_calls = 0
        self.stdin: dict[tuple[str, int], bytearray] = {}
        self.too_early: set[str] = set()
        self.closed = False
        base = self.add_image(
            "busybox:latest", {"/etc": None, "/etc/hosts": b"127.0.0.1 localhost\n", "/bin": None}
        )
        self.base_uuid = base.uuid

    # ------------------------------------------------------------ helpers for tests

    def add_image(self, tag: str | None, tree: dict[str, bytes | None], op: str | None = None) -> api.Image:
        image = api.Image(uuid=str(uuidlib.uuid4()), tag=None, created_at=_now(), operation_uuid=op)
        self.images[image.uuid] = image
        self.trees[image.uuid] = {"/": None, **tree}
        if tag:
            self._move_tag(image.uuid, tag)
        return self.images[image.uuid]

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

    async def _emit(
        self, op: str, type_: api.OperationEventType, data: api.EventData, spid: int | None
    ) -> None:
        events = self.op_events[op]
        event = api.OperationEvent.make(id=len(events), ts=_now(), type=type_, data=data, spid=spid)
        events.append(event)
        async with self.changed:
            self.changed.notify_all()

    # ------------------------------------------------------------ images and tags

    async def list_images(self, query: ImageQuery) -> list[api.Image]:
        images = sorted(self.images.values(), key=lambda i: i.created_at)
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
        if not request.registry.url.startswith("docker://"):
            raise BadRequest(f"unsupported registry url: {request.registry.url}")
        op = str(uuidlib.uuid4())
        image = self.add_image(request.tag, {"/imported": b"yes\n"}, op)
        self.ops[op] = api.OperationResponse(
            uuid=op,
            kind="image_import",
            status="SUCCESS",
            created_at=_now(),
            duration=0.0,
            result_image_uuid=image.uuid,
            metadata=api.metadata_from(api.ImageImportMetadata.masked(request)),
            result=api.OperationResult(image=image.uuid, tag=request.tag),
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
            existing = api.File(
                uuid=str(uuidlib.uuid4()), sha256=sha, size=len(content), created_at=now, updated_at=now
            )
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
        self.spawn_calls += 1
        image = request.image
        if image.startswith("tag:"):
            image = await self.resolve_tag(image[4:])
        self._image(image)
        op = str(uuidlib.uuid4())
        self.ops[op] = api.OperationResponse(
            uuid=op,
            kind="instance",
            status="EXECUTING",
            created_at=_now(),
            image_uuid=image,
            metadata=api.metadata_from(api.OperationInstanceMetadata.from_request(request, image=image)),
        )
        self.op_events[op] = []
        await self._emit(op, "init", api.EventDataInit(started_at=_now(), runtime_path="/run", init_pid=1), 0)
        await self._emit(op, "spawn", api.EventDataSpawn(pid=2, command=request.command), 1)
        asyncio.get_running_loop().create_task(self._finish(op, request, image))
        return api.InstanceSpawnResponse.echo(request, uuid=op, image=image)

    async def _finish(self, op: str, request: api.InstanceSpawnRequest, image: str) -> None:
        await self.hold.wait()
        record = self.ops[op]
        if record.status != "EXECUTING":
            return
        out = request.command.encode() + b"\n"
        stdin = self.stdin.get((op, 1))
        if stdin:
            out += bytes(stdin)
        await self._emit(op, "stdout", api.encode_event_stream(out), 1)
        await self._emit(
            op, "exit", api.EventDataExit(pid=2, code=0, signal=-1, timed_out=False, duration_ms=1), 1
        )
        result = api.InstanceResult(
            state=api.ProcessState(exit_code=0, pid=2),
            stdout=api.encode_stream(out),
            stderr=api.encode_stream(b""),
        )
        meta = api.OperationInstanceMetadata.from_request(request, image=image, result=result)
        result_image = None if request.disposable else image
        record.status = "SUCCESS"
        record.duration = 0.01
        record.result_image_uuid = result_image
        record.metadata = api.metadata_from(meta)
        record.result = api.OperationResult(image=result_image)
        completion = api.EventDataCompletion(status="SUCCESS", duration_ms=10, result_image_uuid=result_image)
        await self._emit(op, "completion", completion, None)

    async def list_operations(self, query: OperationQuery) -> list[api.OperationSummary]:
        ops = [o.summary() for o in self.ops.values()]
        if query.status:
            ops = [o for o in ops if o.status == query.status]
        if query.kind:
            ops = [o for o in ops if o.kind == query.kind]
        return ops[query.offset : query.offset + query.limit]

    async def get_operation(self, operation_id: str, *, inflight: bool = False) -> api.OperationResponse:
        return self._op(operation_id)

    async def cancel_operation(self, operation_id: str) -> None:
        record = self._op(operation_id)
        if record.status in api.TERMINAL_STATUSES:
            raise Conflict(f"operation {operation_id} is already {record.status}")
        record.status = "CANCELLED"
        completion = api.EventDataCompletion(status="CANCELLED", duration_ms=1, error="cancelled")
        await self._emit(operation_id, "completion", completion, None)

    async def events(
        self, operation_id: str, *, follow: bool = False, spid: int | None = None, since: int | None = None
    ) -> AsyncIterator[api.OperationEvent]:
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
            seen = position

            def grown(seen: int = seen) -> bool:
                return len(self.op_events[operation_id]) > seen

            async with self.changed:
                await self.changed.wait_for(grown)

    # ------------------------------------------------------------ subprocesses

    async def create_subprocess(self, operation_id: str, spec: api.ExecSpec) -> int:
        record = self._op(operation_id)
        if record.status != "EXECUTING":
            raise Conflict(f"operation {operation_id} is not running")
        spids = {e.spid for e in self.op_events[operation_id] if e.spid}
        spid = max(spids | {1}) + 1
        await self._emit(operation_id, "spawn", api.EventDataSpawn(pid=10 + spid, command=spec.command), spid)
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
        for start in range(0, len(content), 4096):
            yield content[start : start + 4096]

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
                                line_text=line.decode(),
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
