"""The Backend interface: what the MCP tools need from a Contree engine.

`LocalEngine` (embedded crun+overlayfs engine) and `RemoteBackend` (the Contree REST API over aiohttp)
implement it; the REST server exposes any Backend at `/v1`. Methods mirror the REST endpoints of
`shared/reference/contree-openapi.yaml` one to one and raise `contree.errors.BackendError` subclasses
with the status the API uses. Image arguments are UUID strings; tag resolution is `resolve_tag`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

import msgspec

from contree import api


class ImageQuery(msgspec.Struct, kw_only=True):
    limit: int = 100
    offset: int = 0
    tagged: bool = False
    tag: str | None = None  # prefix; implies tagged
    uuid: str | None = None
    since: str | None = None  # ISO 8601, unix seconds or interval (600s, 15m, 2h, 3d, 1w)
    until: str | None = None
    kind: int | None = None  # undocumented: 0 = instance results, 1 = imported


class OperationQuery(msgspec.Struct, kw_only=True):
    limit: int = 100
    offset: int = 0
    status: str | None = None
    kind: str | None = None
    since: str | None = None
    until: str | None = None


class FileQuery(msgspec.Struct, kw_only=True):
    limit: int = 100
    offset: int = 0
    since: str | None = None
    until: str | None = None


class GrepQuery(msgspec.Struct, kw_only=True):
    pattern: list[str]
    path: list[str] = msgspec.field(default_factory=lambda: ["/"])
    glob: list[str] = msgspec.field(default_factory=list)
    max_count: int | None = None
    max_total: int = 1000
    case: str = "sensitive"  # sensitive | insensitive | smart
    before: int = 0
    after: int = 0


MAX_OUTPUT_PAGE = 64 << 20  # bytes one read_output call returns at most


class OutputPage(msgspec.Struct, kw_only=True):
    """A byte range of one process's stored stdout/stderr (`read_output`, beyond the Contree API).

    `total` = bytes stored so far; `complete` = the stream will not grow; `dropped` = bytes the process
    wrote that were not stored (the engine's per-run output `quota`, or the cap of an event log)."""

    data: bytes
    offset: int
    total: int
    complete: bool
    dropped: int = 0
    quota: int | None = None


@runtime_checkable
class OutputReader(Protocol):
    """A backend that keeps whole streams (the embedded engine, directly or over its REST API)."""

    async def read_output(
        self, operation_id: str, stream: str, *, spid: int = 1, offset: int = 0,
        limit: int = MAX_OUTPUT_PAGE, tail: bool = False,
    ) -> OutputPage: ...


class DiskUsage(msgspec.Struct, kw_only=True):
    """What an engine home holds, in bytes (`reclaimable`: what `images prune --untagged` would free)."""

    home: str
    total_bytes: int
    images: int
    tagged_images: int
    layers: int
    layer_bytes: int
    reclaimable_images: int
    reclaimable_bytes: int
    output_bytes: int
    uploads_bytes: int
    chunks_bytes: int
    other_bytes: int  # operation event logs, databases


@runtime_checkable
class EngineAdmin(Protocol):
    """A backend that manages its own disk (the embedded engine, directly or over its REST API)."""

    async def delete_image(self, image_uuid: str) -> int: ...  # bytes freed
    async def disk_usage(self) -> DiskUsage: ...


class ImageLineage(msgspec.Struct, kw_only=True):
    """Where an image comes from in the engine's own records (beyond the API): its parent, children,
    ancestors (nearest first), the root of its chain and its depth."""

    uuid: str
    parent: api.Image | None
    children: list[api.Image]
    ancestors: list[api.Image]
    root: api.Image
    depth: int


@runtime_checkable
class LineageReader(Protocol):
    """A backend that records each image's parent (the embedded engine, directly or as its service);
    the Contree cloud has no parent concept (the tools record edges themselves)."""

    async def image_lineage(self, image_uuid: str) -> ImageLineage: ...


@runtime_checkable
class RecordFollower(Protocol):
    """A backend whose followed event stream can end with the operation's record (the engine service,
    `record=1` on its events route): after `completion` a follower needs no request for the result.
    The record is yielded last, and only once the stream reached `completion`; a server that does not
    send it just ends the stream."""

    def follow_to_end(
        self, operation_id: str, *, since: int | None = None
    ) -> AsyncIterator[api.OperationEvent | api.OperationResponse]: ...


@runtime_checkable
class Backend(Protocol):
    """One Contree namespace. Every method may raise BackendError subclasses."""

    # images and tags
    async def list_images(self, query: ImageQuery) -> list[api.Image]: ...
    async def get_image(self, image_uuid: str) -> api.Image: ...
    async def resolve_tag(self, tag: str) -> str: ...  # tag without the "tag:" prefix → image UUID
    async def set_tag(self, image_uuid: str, tag: str) -> api.Image: ...
    async def delete_tag(self, image_uuid: str, tag: str | None = None) -> None: ...
    async def import_image(self, request: api.ImageImportRequest) -> str: ...  # operation UUID

    # files (content-addressed blobs)
    async def upload_file(self, data: bytes | AsyncIterator[bytes]) -> api.FileResponse: ...
    async def get_file(self, sha256: str) -> api.File: ...
    async def list_files(self, query: FileQuery) -> list[api.File]: ...

    # instances and operations
    async def spawn(self, request: api.InstanceSpawnRequest) -> api.InstanceSpawnResponse: ...
    async def list_operations(self, query: OperationQuery) -> list[api.OperationSummary]: ...
    async def get_operation(self, operation_id: str, *, inflight: bool = False) -> api.OperationResponse: ...
    async def cancel_operation(self, operation_id: str) -> None: ...
    def events(
        self, operation_id: str, *, follow: bool = False, spid: int | None = None, since: int | None = None
    ) -> AsyncIterator[api.OperationEvent]: ...

    # subprocesses of a running instance
    async def create_subprocess(self, operation_id: str, spec: api.ExecSpec) -> int: ...
    async def get_subprocess(self, operation_id: str, spid: int) -> api.InstanceResult: ...
    async def kill_subprocess(
        self, operation_id: str, spid: int, signal: str | int | None = None
    ) -> None: ...
    async def write_stdin(self, operation_id: str, spid: int, chunk: api.ClosableStreamRepr) -> None: ...

    # inspect (no sandbox)
    async def list_directory(self, image_uuid: str, path: str) -> api.DirectoryList: ...
    async def list_directory_text(self, image_uuid: str, path: str) -> str: ...
    def download(self, image_uuid: str, path: str) -> AsyncIterator[bytes]: ...
    async def check_file(self, image_uuid: str, path: str) -> None: ...  # HEAD download
    def archive(self, image_uuid: str, path: str) -> AsyncIterator[bytes]: ...
    async def check_archive(self, image_uuid: str, path: str) -> None: ...  # HEAD archive
    async def grep(self, image_uuid: str, query: GrepQuery) -> api.GrepResult: ...

    async def whoami(self) -> api.WhoAmIResponse: ...
    async def close(self) -> None: ...
