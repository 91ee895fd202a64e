"""Blob store: content-addressed uploads, chunks, and symlink-safe injection into an image root."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import xxhash

from contree.backend import FileQuery
from contree.engine.storage.blobs import BlobStore, inject_file
from contree.engine.storage.overlay import mount_overlay, unmount
from contree.engine.storage.store import ImageRecord, Store
from contree.errors import BadRequest, NotFound, Unprocessable


@pytest.fixture
def blobs(tmp_path: Path) -> Iterator[BlobStore]:
    b = BlobStore(tmp_path / "blobs")
    yield b
    b.close()


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


async def test_upload_is_content_addressed_and_deduplicated(blobs: BlobStore) -> None:
    first = await blobs.upload(_chunks(b"hello ", b"world"))
    assert first.sha256 == hashlib.sha256(b"hello world").hexdigest() and first.size == 11
    again = await blobs.upload(b"hello world")
    assert again.uuid == first.uuid
    record = blobs.get(first.sha256)
    assert record.uuid == first.uuid and record.updated_at >= record.created_at
    path = blobs.path_for(first.uuid)
    assert path is not None and path.read_bytes() == b"hello world"
    assert blobs.path_for(first.sha256) == path
    assert blobs.path_for("00000000-0000-0000-0000-000000000000") is None
    assert blobs.path_for("../../etc/passwd") is None
    assert list(blobs.tmp_dir.iterdir()) == []


async def test_failed_stream_leaves_nothing(blobs: BlobStore) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"partial"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        await blobs.upload(broken())
    assert list(blobs.tmp_dir.iterdir()) == [] and blobs.list() == []


def test_get_validates_and_404s(blobs: BlobStore) -> None:
    with pytest.raises(BadRequest):
        blobs.get("not-a-hash")
    with pytest.raises(NotFound):
        blobs.get("0" * 64)


def test_list_newest_first_with_paging_and_time_filters(blobs: BlobStore) -> None:
    made = [blobs.put_bytes(bytes([i])) for i in range(5)]
    listed = blobs.list(FileQuery(limit=2, offset=1))
    assert [f.uuid for f in listed] == [made[3].uuid, made[2].uuid]
    assert len(blobs.list(FileQuery(since="1h"))) == 5 and blobs.list(FileQuery(until="1h")) == []
    with pytest.raises(BadRequest):
        blobs.list(FileQuery(limit=1001))


def test_records_survive_reopening(tmp_path: Path) -> None:
    b = BlobStore(tmp_path / "b")
    rec = b.put_bytes(b"persist")
    b.close()
    b2 = BlobStore(tmp_path / "b")
    try:
        assert b2.get(rec.sha256).uuid == rec.uuid
    finally:
        b2.close()


def test_chunks_round_trip_into_a_file(blobs: BlobStore) -> None:
    parts = [b"alpha" * 100, b"beta" * 50, b"gamma"]
    digests = [xxhash.xxh3_128_hexdigest(p) for p in parts]
    blobs.put_chunk(digests[0], parts[0])
    assert blobs.has_chunks(digests) == {digests[0]}
    with pytest.raises(NotFound):
        blobs.assemble(digests)
    for d, p in zip(digests[1:], parts[1:], strict=True):
        blobs.put_chunk(d, p)
    rec = blobs.assemble(digests)
    assert rec.sha256 == hashlib.sha256(b"".join(parts)).hexdigest()
    assert blobs.path_for(rec.uuid).read_bytes() == b"".join(parts)  # type: ignore[union-attr]
    with pytest.raises(BadRequest):
        blobs.put_chunk(digests[0], b"other content")
    with pytest.raises(BadRequest):
        blobs.has_chunks(["../x"])


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """A hostile rootfs: absolute and relative symlinks pointing out of it, a loop."""
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("image")
    os.symlink("/etc/hostname", root / "etc" / "evil")
    os.symlink("/", root / "rootlink")
    os.symlink("../../../../..", root / "up")
    os.symlink(str(tmp_path / "outside"), root / "outlink")
    os.symlink("/nonexistent/dir", root / "dangling")
    os.symlink("loop", root / "loop")
    (tmp_path / "outside").mkdir()
    return root


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    p = tmp_path / "blob"
    p.write_bytes(b"payload")
    return p


def test_inject_creates_parents_with_owner_and_mode(image_root: Path, blob: Path) -> None:
    inject_file(image_root, "/opt/app/bin/tool", blob, mode=0o4755, uid=1000, gid=2000)
    st = (image_root / "opt/app/bin/tool").lstat()
    assert (image_root / "opt/app/bin/tool").read_bytes() == b"payload"
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 2000, 0o4755)
    assert stat.S_IMODE((image_root / "opt").stat().st_mode) == 0o755


def test_inject_replaces_a_final_symlink_instead_of_following_it(image_root: Path, blob: Path) -> None:
    host_before = Path("/etc/hostname").read_bytes()
    inject_file(image_root, "/etc/evil", blob)
    assert not (image_root / "etc" / "evil").is_symlink()
    assert (image_root / "etc" / "evil").read_bytes() == b"payload"
    assert Path("/etc/hostname").read_bytes() == host_before


def test_inject_through_symlinked_parents_stays_inside(image_root: Path, blob: Path, tmp_path: Path) -> None:
    inject_file(image_root, "/rootlink/etc/written", blob)
    assert (image_root / "etc" / "written").read_bytes() == b"payload"
    assert not Path("/etc/written").exists()
    inject_file(image_root, "/up/up/tmp/x", blob)
    assert (image_root / "tmp" / "x").read_bytes() == b"payload"
    with pytest.raises(Unprocessable):  # the link's target does not exist inside the image
        inject_file(image_root, "/outlink/file", blob)
    inside = image_root / tmp_path.relative_to("/") / "outside"
    inside.mkdir(parents=True)
    inject_file(image_root, "/outlink/file", blob)
    assert (inside / "file").read_bytes() == b"payload"
    assert list((tmp_path / "outside").iterdir()) == []


def test_inject_refusals(image_root: Path, blob: Path) -> None:
    with pytest.raises(Unprocessable):
        inject_file(image_root, "/etc", blob)
    with pytest.raises(Unprocessable):
        inject_file(image_root, "/etc/hostname/child", blob)
    with pytest.raises(Unprocessable):
        inject_file(image_root, "/dangling/file", blob)
    with pytest.raises(BadRequest):
        inject_file(image_root, "/a/../../b", blob)
    with pytest.raises(OSError):
        inject_file(image_root, "/loop/file", blob)
    assert not Path("/nonexistent").exists()


def test_inject_with_a_dirfd(image_root: Path, blob: Path) -> None:
    fd = os.open(image_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        inject_file(fd, "/new/file", blob, mode=0o600)
    finally:
        os.close(fd)
    assert stat.S_IMODE((image_root / "new/file").stat().st_mode) == 0o600


def test_inject_into_a_merged_overlay_lands_in_the_upper(store: Store, busybox_image: ImageRecord,
                                                          blob: Path) -> None:
    box = store.sandboxes_dir / "inject"
    upper, work, merged = box / "upper", box / "work", box / "rootfs"
    for d in (upper, work, merged):
        d.mkdir(parents=True)
    mount_overlay(store.layer_paths(busybox_image), upper, work, merged)
    host_hostname = Path("/etc/hostname").read_bytes()
    try:
        os.symlink("/etc/hostname", merged / "etc" / "evil")
        os.symlink("/", merged / "hostroot")
        inject_file(merged, "/etc/evil", blob, mode=0o640)
        inject_file(merged, "/hostroot/usr/local/bin/tool", blob, mode=0o755)
        inject_file(merged, "/bin/sh", blob)  # an applet symlink in a lower layer is replaced, not followed
    finally:
        unmount(merged)
    assert Path("/etc/hostname").read_bytes() == host_hostname
    assert not Path("/usr/local/bin/tool").exists()
    assert (upper / "etc" / "evil").read_bytes() == b"payload"
    assert stat.S_IMODE((upper / "etc" / "evil").stat().st_mode) == 0o640
    assert (upper / "usr" / "local" / "bin" / "tool").read_bytes() == b"payload"
    assert (upper / "bin" / "sh").read_bytes() == b"payload"
    assert Path("/bin/busybox").stat().st_size > 1000  # the lower busybox binary was not touched
    assert (store.layer_path(busybox_image.layers[0]) / "bin" / "busybox").stat().st_size > 1000


def test_gc_forgets_only_old_uploads_and_chunks(blobs: BlobStore) -> None:
    old = blobs.put_bytes(b"old")
    chunk = xxhash.xxh3_128_hexdigest(b"c")
    blobs.put_chunk(chunk, b"c")
    assert blobs.gc(older_than=3600) == []
    fresh = blobs.put_bytes(b"fresh")
    blobs._db.execute("UPDATE files SET updated_at = updated_at - 7200 WHERE uuid = ?", (old.uuid,))
    os.utime(blobs.chunks_dir / chunk[:2] / chunk, (0, 0))
    assert blobs.gc(older_than=3600) == [old.sha256]
    assert blobs.path_for(old.uuid) is None and not (blobs.files_dir / old.sha256).exists()
    assert blobs.path_for(fresh.uuid) is not None
    assert blobs.has_chunks([chunk]) == set()
    with pytest.raises(NotFound):
        blobs.get(old.sha256)
