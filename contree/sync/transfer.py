"""Getting file content into a backend.

`RemoteTransfer` (any Backend, e.g. the Contree cloud): the API dedups by sha256, so a hash-existence
check (`get_file`) comes first and only missing content is uploaded, streamed.
`ChunkTransfer` (the embedded engine's BlobStore): only chunks the engine lacks travel, and the file is
assembled from chunks it already holds, so a one-byte edit of a large file moves about one chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import xxhash

from contree import api
from contree.backend import Backend
from contree.errors import NotFound
from contree.sync.chunker import Chunk, FileChangedError, FileDigest, open_file, read_chunks

if TYPE_CHECKING:
    from contree.engine.storage.blobs import BlobStore  # the engine's, loaded only where an engine runs

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


class ChunkStore(Protocol):
    """An engine's chunk store across a process boundary (`ServiceBackend.chunk_store`)."""

    target: str

    async def missing_chunks(self, digests: Sequence[str]) -> set[str]: ...
    async def put_chunks(self, items: Sequence[tuple[str, bytes]]) -> None: ...
    async def put_files(self, datas: Sequence[bytes]) -> list[api.FileResponse]: ...
    async def assemble(self, digests: Sequence[str]) -> api.FileResponse: ...
    async def missing_files(self, refs: Sequence[str]) -> set[str]: ...


def transfer_for(backend: Backend, target: str | None = None) -> Transfer:
    """The engine's chunk store when the backend has one (in this process, or the engine service's),
    else the plain Backend file API."""
    blobs = getattr(backend, "blobs", None)
    if blobs is not None:
        from contree.engine.storage.blobs import BlobStore

        if isinstance(blobs, BlobStore):
            return ChunkTransfer(blobs, target or f"engine:{blobs.root}")
    store = getattr(backend, "chunk_store", None)
    if store is not None:
        return RemoteChunkTransfer(store, target or store.target)
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



class RemoteChunkTransfer:
    """`ChunkTransfer` through the engine service: the scan and the reads stay in this process (which
    runs as the user), only chunks the engine lacks travel, small files in batches."""

    needs_sha256 = False

    def __init__(self, store: ChunkStore, target: str) -> None:
        self.store = store
        self.target = target

    async def ensure(self, path: str, digest: FileDigest) -> Sent:
        return (await self.ensure_batch([(path, digest)]))[0]

    async def ensure_batch(self, items: list[tuple[str, FileDigest]]) -> list[Sent]:
        out: dict[int, Sent] = {}
        small = [i for i, (_, d) in enumerate(items) if len(d.chunks) <= 1]
        for group in _batches(small, lambda i: items[i][1].size, _BATCH_BYTES):
            datas = await asyncio.to_thread(_read_files, [items[i] for i in group])
            for i, data, resp in zip(group, datas, await self.store.put_files(datas), strict=True):
                out[i] = Sent(resp.sha256, resp.uuid, len(data))
        for i, (path, digest) in enumerate(items):
            if i not in out:
                out[i] = await self._ensure_chunked(path, digest)
        return [out[i] for i in range(len(items))]

    async def missing(self, refs: dict[str, tuple[str, str]]) -> set[str]:
        gone = await self.store.missing_files([uuid for _, uuid in refs.values()])
        return {k for k, (_, uuid) in refs.items() if uuid in gone}

    async def _ensure_chunked(self, path: str, digest: FileDigest) -> Sent:
        digests = [c.digest for c in digest.chunks]
        missing = await self.store.missing_chunks(sorted(set(digests)))
        wanted, seen = [], set()
        for c in digest.chunks:
            if c.digest in missing and c.digest not in seen:
                seen.add(c.digest)
                wanted.append(c)
        sent = 0
        for group in _batches(list(range(len(wanted))), lambda i: wanted[i].length, _BATCH_BYTES):
            chunks = [wanted[i] for i in group]
            datas = await asyncio.to_thread(_read_chunk_datas, path, chunks)
            await self.store.put_chunks([(c.digest, d) for c, d in zip(chunks, datas, strict=True)])
            sent += sum(len(d) for d in datas)
        resp = await self.store.assemble(digests)
        if resp.size != digest.size:
            raise FileChangedError(path)
        return Sent(resp.sha256, resp.uuid, sent)


_BATCH_BYTES = 8 << 20  # one request carries at most this much (plus one item)


def _batches(indexes: list[int], size: Callable[[int], int], limit: int) -> list[list[int]]:
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in indexes:
        if current and total + size(i) > limit:
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += size(i)
    if current:
        groups.append(current)
    return groups


def _read_files(items: list[tuple[str, FileDigest]]) -> list[bytes]:
    return [_read_whole(path, digest) for path, digest in items]


def _read_chunk_datas(path: str, chunks: list[Chunk]) -> list[bytes]:
    return [data for _, data in read_chunks(path, chunks)]


def _read_whole(path: str, digest: FileDigest) -> bytes:
    with open(open_file(path), "rb") as f:
        data = f.read(digest.size + 1)
    if len(data) != digest.size or xxhash.xxh3_128_hexdigest(data) != digest.xxh128:
        raise FileChangedError(path)
    return data
