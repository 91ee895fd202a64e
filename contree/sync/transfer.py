"""Getting file content into a backend.

`RemoteTransfer` (any Backend, e.g. the Contree cloud): the API dedups by sha256, so a hash-existence
check (`get_file`) comes first and only missing content is uploaded, streamed.
`ChunkTransfer` (the embedded engine's BlobStore): only chunks the engine lacks travel, and the file is
assembled from chunks it already holds, so a one-byte edit of a large file moves about one chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import xxhash

from contree import api
from contree.backend import Backend
from contree.engine.blobs import BlobStore
from contree.errors import NotFound
from contree.sync.chunker import FileChangedError, FileDigest, read_chunks

_STREAM = 1024 * 1024


@dataclass(frozen=True)
class Sent:
    sha256: str
    uuid: str
    bytes_sent: int


class Transfer(Protocol):
    target: str  # names the store in the sync cache's blob map
    needs_sha256: bool  # whether digests must carry sha256 before `ensure`

    async def ensure(self, path: str, digest: FileDigest) -> Sent: ...


def transfer_for(backend: Backend, target: str | None = None) -> Transfer:
    """The engine's chunk store when the backend has one, else the plain Backend file API."""
    blobs = getattr(backend, "blobs", None)
    if isinstance(blobs, BlobStore):
        return ChunkTransfer(blobs, target or f"engine:{blobs.root}")
    base = getattr(backend, "base", None)  # RemoteBackend's API root: stable across restarts
    default = f"remote:{base}" if isinstance(base, str) else f"backend:{type(backend).__name__}:{id(backend)}"
    return RemoteTransfer(backend, target or default)


async def _stream(path: str) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:  # noqa: ASYNC230 - every read below happens in a worker thread
        while block := await asyncio.to_thread(f.read, _STREAM):
            yield block


class RemoteTransfer:
    needs_sha256 = True

    def __init__(self, backend: Backend, target: str) -> None:
        self.backend = backend
        self.target = target

    async def ensure(self, path: str, digest: FileDigest) -> Sent:
        try:
            got = await self.backend.get_file(digest.sha256)
            return Sent(got.sha256, got.uuid, 0)
        except NotFound:
            pass
        resp = await self.backend.upload_file(_stream(path))
        if resp.sha256 != digest.sha256:
            raise FileChangedError(path)
        return Sent(resp.sha256, resp.uuid, resp.size)


class ChunkTransfer:
    needs_sha256 = False

    def __init__(self, blobs: BlobStore, target: str) -> None:
        self.blobs = blobs
        self.target = target

    async def ensure(self, path: str, digest: FileDigest) -> Sent:
        return await asyncio.to_thread(self._ensure, path, digest)

    def _ensure(self, path: str, digest: FileDigest) -> Sent:
        if len(digest.chunks) <= 1:
            # One chunk or empty: the file is its only chunk, store it whole (no assembly copy).
            with open(path, "rb") as f:
                data = f.read()
            if len(data) != digest.size or xxhash.xxh3_128_hexdigest(data) != digest.xxh128:
                raise FileChangedError(path)
            whole = self.blobs.put_bytes(data)
            return Sent(whole.sha256, whole.uuid, len(data))
        digests = [c.digest for c in digest.chunks]
        held = self.blobs.has_chunks(set(digests))
        wanted, seen = [], set(held)
        for c in digest.chunks:
            if c.digest not in seen:
                seen.add(c.digest)
                wanted.append(c)
        sent = 0
        for chunk, data in read_chunks(path, wanted):
            self.blobs.put_chunk(chunk.digest, data)
            sent += len(data)
        resp: api.FileResponse = self.blobs.assemble(digests)
        if resp.size != digest.size:
            raise FileChangedError(path)
        return Sent(resp.sha256, resp.uuid, sent)


