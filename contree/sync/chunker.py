"""Content-defined chunking with xxh3-128 chunk hashes.

A gear-style rolling hash done byte by byte in Python runs at ~10 MB/s, so the cut-point test is built
from primitives that run in C: each byte is mapped to one pseudo-random bit (`bytes.translate`), and a
boundary is the end of the first run of `_RUN` one-bits after the minimum size (`bytes.find`). The
decision depends only on the last `_RUN` bytes, so an insertion or deletion moves the cut points next to
it and leaves the others where they were (the property that keeps a one-byte edit to about one chunk).
Only the window between the minimum size and the cut is ever translated.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator

import msgspec
import xxhash

from contree.fsutil import NotRegularFile, open_regular

MIN_CHUNK = 32 * 1024
MAX_CHUNK = 256 * 1024
# A run of 14 one-bits is expected about every 2**15 bytes: average chunk ≈ MIN_CHUNK + 32 KiB = 64 KiB.
_RUN = 14
_NEEDLE = b"\x01" * _RUN
_BLOCK = 8 * 1024  # measured: smaller windows translate less past the cut (1.3 GB/s at 8 KiB)
# Fixed seed: cut points must be the same on every machine and in every release, or warm caches and the
# engine's chunk store stop matching.
_SEEDED = random.Random(0x636F6E74726565)
_BITS = bytes(_SEEDED.getrandbits(1) for _ in range(256))
# Large files stream in blocks small enough to stay in cache between the read, the cut and the chunk
# hashes (measured: 1 MiB blocks run ~20% faster than 8 MiB ones).
STREAM_BLOCK = 1024 * 1024


class Chunk(msgspec.Struct, array_like=True, frozen=True):
    digest: str  # xxh3-128 hex
    offset: int
    length: int


class FileDigest(msgspec.Struct, array_like=True, frozen=True):
    """What reading a file once yields: its size, whole-file hashes and its chunk list."""

    size: int
    xxh128: str
    sha256: str
    chunks: list[Chunk]


def cut_points(data: bytes | memoryview, final: bool = True) -> list[int]:
    """Chunk end offsets in `data`. With `final=False` the tail after the last cut is left for later
    (more data follows), so a streamed file gets the cut points of the whole file."""
    view = memoryview(data)
    n = len(view)
    cuts: list[int] = []
    start = 0
    bits, needle, run = _BITS, _NEEDLE, _RUN
    while True:
        if n - start <= MIN_CHUNK:
            if final and n > start:
                cuts.append(n)
            return cuts
        limit = start + MAX_CHUNK
        if limit > n:
            if not final:
                return cuts  # the cut may lie in data not read yet
            limit = n
        pos = start + MIN_CHUNK - run  # a run must end at or after MIN_CHUNK
        end = limit
        while pos < limit:
            stop = pos + _BLOCK + run
            if stop > limit:
                stop = limit
            # The window is copied (translate needs bytes), never the whole buffer: only the part
            # between the minimum size and the cut is ever looked at.
            hit = view[pos:stop].tobytes().translate(bits).find(needle)
            if hit >= 0:
                end = pos + hit + run
                break
            if stop == limit:
                break
            pos = stop - run + 1
        cuts.append(end)
        start = end


def chunks_of(data: bytes | memoryview) -> list[Chunk]:
    view = memoryview(data)
    out: list[Chunk] = []
    prev = 0
    for end in cut_points(view):
        out.append(Chunk(xxhash.xxh3_128_hexdigest(view[prev:end]), prev, end - prev))
        prev = end
    return out


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_bytes(data: bytes, *, with_sha256: bool = True) -> FileDigest:
    """`digest_file` of content already in memory."""
    n = len(data)
    if n <= MIN_CHUNK:
        # One chunk (or none): its digest is the whole file's, hashed once.
        whole = xxhash.xxh3_128_hexdigest(data)
        return FileDigest(
            n, whole, _sha256_hex(data) if with_sha256 else "", [Chunk(whole, 0, n)] if n else []
        )
    # No helper thread for sha256: xxhash and the cut search hold the GIL, and handing the GIL back and
    # forth cost more than the overlap gained (measured on 6 MiB and 100 MiB files).
    return FileDigest(n, xxhash.xxh3_128_hexdigest(data), _sha256_hex(data) if with_sha256 else "",
                      chunks_of(data))


def digest_file(
    path: str | os.PathLike[str], *, with_sha256: bool = True, size_hint: int | None = None
) -> FileDigest:
    """Read `path` once (blocking): chunk list, xxh3-128 and (when asked: it is the slowest part) sha256
    of the whole content; without it `sha256` is "". `size_hint` (the size a scan just saw) saves an
    fstat; a wrong hint costs only speed."""
    fd = open_file(path)
    try:
        size = os.fstat(fd).st_size if size_hint is None else size_hint
        if size <= STREAM_BLOCK:
            data = _read_small(fd, size)
            if data is not None:
                return digest_bytes(data, with_sha256=with_sha256)
            os.lseek(fd, 0, os.SEEK_SET)  # it grew past one read while we looked: stream it
        return _digest_stream(fd, with_sha256)
    finally:
        os.close(fd)


def _read_small(fd: int, size: int) -> bytes | None:
    """The whole file in one allocation, or None when it turns out larger than STREAM_BLOCK."""
    data = os.read(fd, size + 1)
    if len(data) == size:
        return data  # the short read that ends exactly at the stat size is the end of file
    parts = [data]
    total = len(data)
    while total <= STREAM_BLOCK:
        more = os.read(fd, STREAM_BLOCK + 1 - total)
        if not more:
            return b"".join(parts)
        parts.append(more)
        total += len(more)
    return None


def _digest_stream(fd: int, with_sha256: bool) -> FileDigest:
    """A large file in blocks small enough to stay in cache from the read through the whole-file hashes,
    the cut and the chunk hashes. The uncut tail of a block (< MAX_CHUNK) moves to the buffer's front."""
    whole = xxhash.xxh3_128()
    sha = hashlib.sha256() if with_sha256 else None
    chunks: list[Chunk] = []
    base = 0  # file offset of buf[0]
    fill = 0
    with memoryview(bytearray(MAX_CHUNK + STREAM_BLOCK)) as buf:
        while True:
            with buf[fill : fill + STREAM_BLOCK] as space:
                got = os.readv(fd, [space])
                if got:
                    whole.update(space[:got])
                    if sha is not None:
                        sha.update(space[:got])
            fill += got
            final = got == 0
            with buf[:fill] as view:
                prev = 0
                for end in cut_points(view, final=final):
                    chunks.append(Chunk(xxhash.xxh3_128_hexdigest(view[prev:end]), base + prev, end - prev))
                    prev = end
            if final:
                break
            if prev:
                buf[: fill - prev] = buf[prev:fill]
                base += prev
                fill -= prev
    return FileDigest(base + fill, whole.hexdigest(), sha.hexdigest() if sha is not None else "", chunks)


def open_file(path: str | os.PathLike[str]) -> int:
    """`open_regular`, with a file that stopped being a regular file since the scan reported as changed."""
    try:
        return open_regular(path)
    except NotRegularFile as exc:
        raise FileChangedError(str(path), f"became {exc.what}") from None


def read_chunks(path: str | os.PathLike[str], wanted: list[Chunk]) -> Iterator[tuple[Chunk, bytes]]:
    """The bytes of `wanted` chunks of `path`, each checked against its digest (the file may have changed
    since it was scanned)."""
    with open(open_file(path), "rb") as f:
        for chunk in wanted:
            f.seek(chunk.offset)
            data = f.read(chunk.length)
            if len(data) != chunk.length or xxhash.xxh3_128_hexdigest(data) != chunk.digest:
                raise FileChangedError(str(path))
            yield chunk, data


class FileChangedError(OSError):
    def __init__(self, path: str, how: str = "changed") -> None:
        super().__init__(f"{path} {how} while it was synced; sync again")
        self.path = path
