"""An in-memory Backend and RequestContext for unit tests of the tools (no engine, no transport)."""

from __future__ import annotations

import hashlib
import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec

from contree import api
from contree.backend import FileQuery, GrepQuery, ImageQuery, OperationQuery
from contree.errors import Conflict, NotFound
from protocol.registry import Registry
from tools.app import build_registry, build_state
from tools.state import ServerState


def new_id() -> str:
    return str(uuidlib.uuid4())


class FakeBackend:
    def __init__(self) -> None:
        self.images: dict[str, api.Image] = {}
        self.ops: dict[str, dict[str, Any]] = {}
        self.files: dict[str, api.File] = {}
        self.blobs: dict[str, bytes] = {}
        self.fs: dict[str, dict[str, bytes]] = {}  # image → path → content
        self.spawned: list[api.InstanceSpawnRequest] = []
        self.cancelled: list[str] = []
        self.imports: list[api.ImageImportRequest] = []
        self.image_queries: list[ImageQuery] = []
        self.busybox = self.add_image("busybox:latest", {"/etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n"})

    def add_image(self, tag: str | None, files: dict[str, bytes] | None = None) -> str:
        uuid = new_id()
        self.images[uuid] = api.Image(uuid=uuid, tag=tag, created_at="2026-01-01T00:00:00+00:00")
        self.fs[uuid] = dict(files or {})
        return uuid

    def add_op(self, status: str, kind: str = "instance", **extra: Any) -> str:
        op_id = new_id()
        self.ops[op_id] = {
            "uuid": op_id,
            "kind": kind,
            "status": status,
            "created_at": "2026-01-01T00:00:00",
            **extra,
        }
        return op_id

    # images
    async def list_images(self, query: ImageQuery) -> list[api.Image]:
        self.image_queries.append(query)
        out = list(self.images.values())
        if query.tagged:
            out = [i for i in out if i.tag]
        if query.tag:
            out = [i for i in out if i.tag and i.tag.startswith(query.tag)]
        return out[query.offset : query.offset + query.limit]

    async def get_image(self, image_uuid: str) -> api.Image:
        if image_uuid not in self.images:
            raise NotFound(f"image {image_uuid} not found")
        return self.images[image_uuid]

    async def resolve_tag(self, tag: str) -> str:
        for image in self.images.values():
            if image.tag == tag:
                return image.uuid
        raise NotFound(f"tag {tag} not found")

    async def set_tag(self, image_uuid: str, tag: str) -> api.Image:
        for uuid, image in list(self.images.items()):
            if image.tag == tag:
                self.images[uuid] = msgspec.structs.replace(image, tag=None)
        image = await self.get_image(image_uuid)
        self.images[image_uuid] = msgspec.structs.replace(image, tag=tag)
        return self.images[image_uuid]

    async def delete_tag(self, image_uuid: str, tag: str | None = None) -> None:
        image = await self.get_image(image_uuid)
        if tag is None or image.tag == tag:
            self.images[image_uuid] = msgspec.structs.replace(image, tag=None)

    async def import_image(self, request: api.ImageImportRequest) -> str:
        self.imports.append(request)
        result = self.add_image(request.tag)
        return self.add_op(
            "SUCCESS",
            "image_import",
            result={"image": result, "tag": request.tag},
            result_image_uuid=result,
            metadata={"registry": {"url": request.registry.url}},
        )

    # files
    async def upload_file(self, data: bytes | AsyncIterator[bytes]) -> api.FileResponse:
        if not isinstance(data, bytes):
            data = b"".join([c async for c in data])
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        record = self.files.get(sha) or api.File(
            uuid=new_id(), sha256=sha, size=len(data), created_at="", updated_at=""
        )
        self.files[sha] = record
        return api.FileResponse(uuid=record.uuid, sha256=sha, size=len(data))

    async def get_file(self, sha256: str) -> api.File:
        if sha256 not in self.files:
            raise NotFound("no such file")
        return self.files[sha256]

    async def list_files(self, query: FileQuery) -> list[api.File]:
        return list(self.files.values())

    # operations
    async def spawn(self, request: api.InstanceSpawnRequest) -> api.InstanceSpawnResponse:
        self.spawned.append(request)
        op_id = self.add_op("PENDING", image_uuid=request.image, metadata=msgspec.to_builtins(request))
        return api.InstanceSpawnResponse(uuid=op_id, command=request.command, image=request.image)

    def finish(
        self,
        op_id: str,
        *,
        stdout: str = "",
        exit_code: int = 0,
        result_image: str | None = None,
        status: str = "SUCCESS",
    ) -> None:
        op = self.ops[op_id]
        op["status"] = status
        op["result_image_uuid"] = result_image
        op["result"] = {"image": result_image, "tag": None}
        meta = op.setdefault("metadata", {})
        meta["result"] = {
            "state": {"exit_code": exit_code, "signal": -1, "timed_out": False},
            "stdout": {"value": stdout, "encoding": "ascii", "truncated": False},
            "stderr": {"value": "", "encoding": "ascii", "truncated": False},
        }

    async def list_operations(self, query: OperationQuery) -> list[api.OperationSummary]:
        ops = [
            o
            for o in self.ops.values()
            if (not query.status or o["status"] == query.status)
            and (not query.kind or o["kind"] == query.kind)
        ]
        fields = set(api.OperationSummary.__struct_fields__)
        return [
            msgspec.convert({k: v for k, v in o.items() if k in fields}, api.OperationSummary) for o in ops
        ]

    async def get_operation(self, operation_id: str, *, inflight: bool = False) -> api.OperationResponse:
        if operation_id not in self.ops:
            raise NotFound(f"operation {operation_id} not found")
        return msgspec.convert(self.ops[operation_id], api.OperationResponse)

    async def cancel_operation(self, operation_id: str) -> None:
        op = self.ops.get(operation_id)
        if op is None:
            raise NotFound("no such operation")
        if op["status"] in ("SUCCESS", "FAILED", "CANCELLED"):
            raise Conflict("already finished")
        self.cancelled.append(operation_id)
        op["status"] = "CANCELLED"

    async def events(
        self, operation_id: str, *, follow: bool = False, spid: int | None = None, since: int | None = None
    ) -> AsyncIterator[api.OperationEvent]:
        raise NotImplementedError("the fake has no event log")
        yield  # pragma: no cover

    # inspect
    async def list_directory(self, image_uuid: str, path: str) -> api.DirectoryList:
        """The files directly under `path` (the fake has no directories of its own)."""
        files = self._files_of(image_uuid)
        prefix = path.rstrip("/") + "/"
        names = [p[len(prefix) :] for p in files if p.startswith(prefix) and "/" not in p[len(prefix) :]]
        if not names:
            raise NotFound(f"{path} not found")
        items = [
            api.FileItem(
                size=len(files[prefix + n]), path=n, owner=0, group=0, mode=0o100644, mtime=0, nlink=1,
                uid=0, gid=0, is_dir=False, is_regular=True, is_symlink=False, is_socket=False,
                is_fifo=False, symlink_to="",
            )
            for n in sorted(names)
        ]  # fmt: skip
        return api.DirectoryList(path=path, files=items)

    def _files_of(self, image_uuid: str) -> dict[str, bytes]:
        if image_uuid not in self.images:
            raise NotFound(f"image {image_uuid} not found")
        return self.fs.get(image_uuid, {})

    def download(self, image_uuid: str, path: str) -> AsyncIterator[bytes]:
        async def gen() -> AsyncIterator[bytes]:
            data = self.fs.get(image_uuid, {}).get(path)
            if data is None:
                raise NotFound(f"{path} not found")
            for i in range(0, len(data), 7):
                yield data[i : i + 7]

        return gen()

    async def grep(self, image_uuid: str, query: GrepQuery) -> api.GrepResult:
        """Literal patterns only: a match per file that contains one."""
        files = self._files_of(image_uuid)
        matches = [
            api.GrepMatch(
                path=path, line_number=1, absolute_offset=0, line_text=data.decode(errors="replace"),
                line_bytes=len(data), submatches=[], type="match",
            )
            for path, data in sorted(files.items())
            if any(p.encode() in data for p in query.pattern)
        ]  # fmt: skip
        return api.GrepResult(path=query.path[0], patterns=query.pattern, matches=matches, truncated=False)

    async def whoami(self) -> api.WhoAmIResponse:
        return api.WhoAmIResponse(
            token_uuid="fake", token_expiration=None, permissions={}, operations_stat={}
        )

    async def close(self) -> None:
        pass


class FakeContext:
    """Stands in for protocol's RequestContext when calling registry.call_tool directly."""

    def __init__(self, principal: str | None = None) -> None:
        self.principal = principal
        self.progress_calls: list[tuple[float, float | None, str | None]] = []
        self.logs: list[Any] = []
        self.updated: list[str] = []
        self.client_capabilities: dict[str, Any] = {}
        self.cancel_requested = False  # True = the client sent notifications/cancelled for this request

    async def progress(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        self.progress_calls.append((progress, total, message))

    async def log(self, level: str, data: Any, logger: str | None = None) -> None:
        self.logs.append(data)

    async def notify_resource_updated(self, uri: str) -> None:
        self.updated.append(uri)


def make_registry(
    backend: Any,
    tmp: Path,
    *,
    roots: list[Path] | None = None,
    kind: str = "contree",
    scoped_operations: bool = False,
) -> tuple[Registry, ServerState]:
    state = build_state(
        backend,
        kind,  # type: ignore[arg-type]
        cache_dir=tmp / "cache",
        allowed_roots=roots or [tmp],
        scoped_operations=scoped_operations,
    )
    return build_registry(state), state


async def call(registry: Registry, name: str, args: dict[str, Any], ctx: FakeContext | None = None) -> Any:
    """(is_error, structured, text) of a tools/call."""
    result = await registry.call_tool(name, args, ctx or FakeContext())  # type: ignore[arg-type]
    blocks = msgspec.to_builtins(result)
    return blocks
