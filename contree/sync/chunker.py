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
READ_SIZE = 8 * 1024 * 1024


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
    while True:
        if n - start <= MIN_CHUNK:
            if final and n > start:
                cuts.append(n)
            return cuts
        limit = start + MAX_CHUNK
        if limit > n and not final:
            return cuts  # the cut may lie in data not read yet
        limit = min(limit, n)
        pos = start + MIN_CHUNK - _RUN  # a run must end at or after MIN_CHUNK
        end = limit
        while pos < limit:
            stop = min(pos + _BLOCK + _RUN, limit)
            hit = bytes(view[pos:stop]).translate(_BITS).find(_NEEDLE)
            if hit >= 0:
                end = pos + hit + _RUN
                break
            if stop == limit:
                break
            pos = stop - _RUN + 1
        cuts.append(end)
        start = end


def chunks_of(data: bytes) -> list[Chunk]:
    view = memoryview(data)
    out: list[Chunk] = []
    prev = 0
    for end in cut_points(view):
        out.append(Chunk(xxhash.xxh3_128_hexdigest(view[prev:end]), prev, end - prev))
        prev = end
    return out


def digest_file(path: str | os.PathLike[str], *, with_sha256: bool = True) -> FileDigest:
    """Read `path` once (blocking): chunk list, xxh3-128 and (when asked: it is the slowest part) sha256
    of the whole content; without it `sha256` is ""."""
    whole = xxhash.xxh3_128()
    sha = hashlib.sha256() if with_sha256 else None
    chunks: list[Chunk] = []
    # One buffer for the whole file: the uncut tail (< MAX_CHUNK) moves to its front between reads.
    fill = 0
    base = 0  # file offset of buf[0]
    size = 0
    with open(path, "rb", buffering=0) as f:
        # Sized to the file (+1 so EOF shows without a reallocation): most files are small.
        buf = bytearray(min(READ_SIZE + MAX_CHUNK, os.fstat(f.fileno()).st_size + 1))
        while True:
            if fill == len(buf):  # the file grew while we read it
                buf.extend(bytes(READ_SIZE))
            with memoryview(buf) as space:
                got = f.readinto(space[fill:]) or 0
                if got:
                    whole.update(space[fill : fill + got])
                    if sha is not None:
                        sha.update(space[fill : fill + got])
                fill += got
                size += got
                final = got == 0
                with space[:fill] as view:
                    prev = 0
                    for end in cut_points(view, final=final):
                        digest = xxhash.xxh3_128_hexdigest(view[prev:end])
                        chunks.append(Chunk(digest, base + prev, end - prev))
                        prev = end
            if final:
                break
            buf[: fill - prev] = buf[prev:fill]
            base += prev
            fill -= prev
    return FileDigest(size, whole.hexdigest(), sha.hexdigest() if sha is not None else "", chunks)


def read_chunks(path: str | os.PathLike[str], wanted: list[Chunk]) -> Iterator[tuple[Chunk, bytes]]:
    """The bytes of `wanted` chunks of `path`, each checked against its digest (the file may have changed
    since it was scanned)."""
    with open(path, "rb") as f:
        for chunk in wanted:
            f.seek(chunk.offset)
            data = f.read(chunk.length)
            if len(data) != chunk.length or xxhash.xxh3_128_hexdigest(data) != chunk.digest:
                raise FileChangedError(str(path))
            yield chunk, data


class FileChangedError(OSError):
    def __init__(self, path: str) -> None:
        super().__init__(f"{path} changed while it was synced; sync again")
        self.path = path
