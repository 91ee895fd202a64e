"""The BlobStore batch calls the engine transfer relies on: put_many (one syncfs for many files) and
put_chunks (one syncfs for many chunks)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import xxhash

from contree.engine.storage.blobs import BlobStore
from contree.errors import BadRequest


def test_put_many_stores_dedups_and_records(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    first = blobs.put_bytes(b"already")
    items = [b"one", b"", b"already", b"one"]
    got = blobs.put_many(items)
    assert [r.sha256 for r in got] == [hashlib.sha256(x).hexdigest() for x in items]
    assert got[2].uuid == first.uuid and got[0].uuid == got[3].uuid
    for r, data in zip(got, items, strict=True):
        path = blobs.path_for(r.uuid)
        assert path is not None and path.read_bytes() == data
        assert blobs.get(r.sha256).uuid == r.uuid
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []
    blobs.close()


def test_put_chunks_checks_digests_and_leaves_no_temp_files(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    good = [(xxhash.xxh3_128_hexdigest(d), d) for d in (b"a" * 10, b"b" * 20)]
    blobs.put_chunks(good)
    assert blobs.has_chunks([g[0] for g in good]) == {g[0] for g in good}
    assert blobs.assemble([good[1][0], good[0][0]]).size == 30
    with pytest.raises(BadRequest, match="hashes to"):
        blobs.put_chunks([(xxhash.xxh3_128_hexdigest(b"c"), b"c"), ("0" * 32, b"not zero")])
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []
    assert not blobs.has_chunks([xxhash.xxh3_128_hexdigest(b"c")])
    blobs.close()
