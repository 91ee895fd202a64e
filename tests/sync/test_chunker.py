"""Content-defined chunking: stable cut points, bounded sizes, edits touch about one chunk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import xxhash

from contree.sync.chunker import (
    MAX_CHUNK,
    MIN_CHUNK,
    STREAM_BLOCK,
    FileChangedError,
    _read_small,
    chunks_of,
    cut_points,
    digest_bytes,
    digest_file,
    read_chunks,
)
from tests.sync.helpers import pseudo_random

# xxh3-64 of repr(cut_points(...)) of the inputs in test_cut_points_are_pinned, from the first chunker.
PINNED_RANDOM = "7c7e448b265be6bb"
PINNED_TEXT = "314f073d293e4e75"


def test_chunks_cover_the_data_within_bounds() -> None:
    data = pseudo_random(8 << 20, 1)
    chunks = chunks_of(data)
    assert b"".join(data[c.offset : c.offset + c.length] for c in chunks) == data
    assert all(MIN_CHUNK <= c.length <= MAX_CHUNK for c in chunks[:-1])
    average = len(data) / len(chunks)
    assert 40 * 1024 < average < 100 * 1024  # target ~64 KiB
    assert all(c.digest == xxhash.xxh3_128_hexdigest(data[c.offset : c.offset + c.length]) for c in chunks)


def test_degenerate_inputs() -> None:
    assert cut_points(b"") == [] and chunks_of(b"") == []
    assert cut_points(b"x") == [1]
    zeros = bytes(3 * MAX_CHUNK + 5)
    cuts = cut_points(zeros)
    assert cuts[-1] == len(zeros) and all(b - a <= MAX_CHUNK for a, b in zip([0, *cuts], cuts, strict=False))


@pytest.mark.parametrize("edit", ["flip", "insert", "delete"])
def test_a_local_edit_changes_about_one_chunk(edit: str) -> None:
    data = pseudo_random(16 << 20, 2)
    at = 9_000_001
    changed = {
        "flip": data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :],
        "insert": data[:at] + b"inserted" + data[at:],
        "delete": data[:at] + data[at + 100 :],
    }[edit]
    before = {c.digest for c in chunks_of(data)}
    new = [c for c in chunks_of(changed) if c.digest not in before]
    assert 1 <= len(new) <= 2, len(new)


def test_streamed_file_digest_matches_in_memory(tmp_path: Path) -> None:
    data = pseudo_random(20 << 20, 3)  # spans several 8 MiB reads
    path = tmp_path / "big"
    path.write_bytes(data)
    digest = digest_file(path)
    assert digest.chunks == chunks_of(data)
    assert digest.size == len(data) and digest.xxh128 == xxhash.xxh3_128_hexdigest(data)
    import hashlib

    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert digest_file(path, with_sha256=False).sha256 == ""
    wanted = [digest.chunks[3], digest.chunks[-1]]
    assert [d for _, d in read_chunks(path, wanted)] == [
        data[c.offset : c.offset + c.length] for c in wanted
    ]
    path.write_bytes(b"different")
    with pytest.raises(FileChangedError, match="changed while it was synced"):
        list(read_chunks(path, wanted))


@pytest.mark.parametrize(
    "size",
    [0, 1, MIN_CHUNK, MIN_CHUNK + 1, MAX_CHUNK, MAX_CHUNK + 1, STREAM_BLOCK, STREAM_BLOCK + 1,
     2 * STREAM_BLOCK + MAX_CHUNK - 7, (9 << 20) - 3],
)
def test_streamed_chunks_equal_in_memory_chunks_at_boundaries(tmp_path: Path, size: int) -> None:
    data = pseudo_random(size, size)
    path = tmp_path / "f"
    path.write_bytes(data)
    digest = digest_file(path, with_sha256=False)
    assert digest.chunks == chunks_of(data) and digest.size == size
    assert digest == digest_bytes(data, with_sha256=False)
    assert digest.xxh128 == xxhash.xxh3_128_hexdigest(data)


def test_cut_points_are_pinned() -> None:
    """The cut-point definition keys every warm cache and the engine's chunk store: these figures were
    taken from the first release's chunker, so any change to it (even a faster search) must keep them."""
    data = pseudo_random(3 << 20, 2026)
    cuts = cut_points(data)
    assert len(cuts) == 61 and cuts[:4] == [38873, 73447, 113597, 155572]
    assert xxhash.xxh3_64_hexdigest(repr(cuts).encode()) == PINNED_RANDOM
    text = b"".join(b"token%d " % (i * 7 % 1000) for i in range(400000))[: 3 << 20]
    assert xxhash.xxh3_64_hexdigest(repr(cut_points(text)).encode()) == PINNED_TEXT
    ones = bytes(b for b in range(256) if chunker_bits()[b]) * 2000  # a cut as early as allowed
    assert cut_points(ones)[0] == MIN_CHUNK


def chunker_bits() -> bytes:
    from contree.sync import chunker

    return chunker._BITS


def test_a_file_that_grows_past_one_read_is_streamed(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(pseudo_random(STREAM_BLOCK + 10, 4))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _read_small(fd, 100) is None  # stat said 100 bytes, the file holds more than one read
    finally:
        os.close(fd)
    small = tmp_path / "s"
    small.write_bytes(b"x" * 300)
    fd = os.open(small, os.O_RDONLY)
    try:
        assert _read_small(fd, 100) == b"x" * 300  # stat was stale: everything there is, is read
    finally:
        os.close(fd)


@pytest.mark.parametrize("hint", [0, 5, MIN_CHUNK, STREAM_BLOCK, 3 * STREAM_BLOCK])
def test_a_wrong_size_hint_costs_only_speed(tmp_path: Path, hint: int) -> None:
    for size in (7, MIN_CHUNK + 3, STREAM_BLOCK + 5):
        data = pseudo_random(size, size + hint)
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        assert digest_file(path, size_hint=hint) == digest_bytes(data)
