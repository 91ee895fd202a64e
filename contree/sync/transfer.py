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
from contree.sync.chunker import FileChangedError, FileDigest, open_file, read_chunks

_STREAM = 1024 * 1024
UPLOAD_CONCURRENCY = 8  # concurrent backend calls per sync
_CHUNK_GROUP = 64  # chunks stored per syncfs (bounds memory to 64 x 256 KiB)


@dataclass(frozen=True)
class Sent:
    sha256: str
    uuid: str
    bytes_sent: int


class Transfer(Protocol):
    target: str  # names the store in the sync cache's blob map
    needs_sha256: bool  # whether digests must carry sha256 before `ensure`

    async def ensure(self, path: str, digest: FileDigest) -> Sent: ...

    async def ensure_batch(self, items: list[tuple[str, FileDigest]]) -> list[Sent]:
        """`ensure` for several files (distinct contents), results in order."""
        ...

    async def missing(self, refs: dict[str, tuple[str, str]]) -> set[str]:
        """Keys of `refs` ({key: (sha256, uuid)}) whose file the target no longer holds."""
        ...


def transfer_for(backend: Backend, target: str | None = None) -> Transfer:
    """The engine's chunk store when the backend has one, else the plain Backend file API."""
    blobs = getattr(backend, "blobs", None)
    if isinstance(blobs, BlobStore):
        return ChunkTransfer(blobs, target or f"engine:{blobs.root}")
    base = getattr(backend, "base", None)  # RemoteBackend's API root: stable across restarts
    default = f"remote:{base}" if isinstance(base, str) else f"backend:{type(backend).__name__}:{id(backend)}"
    return RemoteTransfer(backend, target or default)


async def _stream(path: str) -> AsyncIterator[bytes]:
    # opening can block too (slow or network filesystems): it runs in a worker thread like every read
    fd = await asyncio.to_thread(open_file, path)
    with open(fd, "rb") as f:  # noqa: ASYNC230 - wraps the fd opened in the thread above
        while block := await asyncio.to_thread(f.read, _STREAM):
            yield block


class RemoteTransfer:
    needs_sha256 = True

    def __init__(self, backend: Backend, target: str) -> None:
        self.backend = backend
        self.target = target
        self._calls = asyncio.Semaphore(UPLOAD_CONCURRENCY)

    async def ensure_batch(self, items: list[tuple[str, FileDigest]]) -> list[Sent]:
        return list(await asyncio.gather(*(self.ensure(p, d) for p, d in items)))

    async def ensure(self, path: str, digest: FileDigest) -> Sent:
        async with self._calls:
            return await self._ensure(path, digest)

    async def missing(self, refs: dict[str, tuple[str, str]]) -> set[str]:
        async def gone(key: str, sha256: str, uuid: str) -> str | None:
            async with self._calls:
                try:
                    got = await self.backend.get_file(sha256)
                except NotFound:
                    return key
            return None if got.uuid == uuid else key

        found = await asyncio.gather(*(gone(k, sha, uuid) for k, (sha, uuid) in refs.items()))
        return {k for k in found if k is not None}

    async def _ensure(self, path: str, digest: FileDigest) -> Sent:
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
        return (await self.ensure_batch([(path, digest)]))[0]

    async def ensure_batch(self, items: list[tuple[str, FileDigest]]) -> list[Sent]:
        return await asyncio.to_thread(self._ensure_batch, items)

    async def missing(self, refs: dict[str, tuple[str, str]]) -> set[str]:
        def check() -> set[str]:
            return {k for k, (_, uuid) in refs.items() if self.blobs.path_for(uuid) is None}

        return await asyncio.to_thread(check)

    def _ensure_batch(self, items: list[tuple[str, FileDigest]]) -> list[Sent]:
        # Files of one chunk (most files) are stored whole, all with one syncfs; larger ones through
        # the chunk store.
        small = [(i, p) for i, (p, d) in enumerate(items) if len(d.chunks) <= 1]
        out: dict[int, Sent] = {}
        if small:
            datas = [_read_whole(p, items[i][1]) for i, p in small]
            for (i, _), data, resp in zip(small, datas, self.blobs.put_many(datas), strict=True):
                out[i] = Sent(resp.sha256, resp.uuid, len(data))
        for i, (path, digest) in enumerate(items):
            if i not in out:
                out[i] = self._ensure_chunked(path, digest)
        return [out[i] for i in range(len(items))]

    def _ensure_chunked(self, path: str, digest: FileDigest) -> Sent:
        digests = [c.digest for c in digest.chunks]
        held = self.blobs.has_chunks(set(digests))
        wanted, seen = [], set(held)
        for c in digest.chunks:
            if c.digest not in seen:
                seen.add(c.digest)
                wanted.append(c)
        sent = 0
        group: list[tuple[str, bytes]] = []
        for chunk, data in read_chunks(path, wanted):
            group.append((chunk.digest, data))
            sent += len(data)
            if len(group) >= _CHUNK_GROUP:
                self.blobs.put_chunks(group)
                group = []
        if group:
            self.blobs.put_chunks(group)
        resp: api.FileResponse = self.blobs.assemble(digests)
        if resp.size != digest.size:
            raise FileChangedError(path)
        return Sent(resp.sha256, resp.uuid, sent)




def _read_whole(path: str, digest: FileDigest) -> bytes:
    with open(open_file(path), "rb") as f:
        data = f.read(digest.size + 1)
    if len(data) != digest.size or xxhash.xxh3_128_hexdigest(data) != digest.xxh128:
        raise FileChangedError(path)
    return data
