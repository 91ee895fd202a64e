"""sync_tree: the stat cache, content identity, renames/duplicates, deletions, modes, symlinks, errors,
and the two transfers (remote sha256 dedup, engine chunks)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from contree.sync import Excludes, StateCache, SyncError, sync_tree, transfer_for
from contree.sync.chunker import MAX_CHUNK
from contree.sync.transfer import ChunkTransfer, RemoteTransfer
from tests.sync.helpers import EngineHolder, FakeFiles, pseudo_random, tree

ROOT = Path(__file__).resolve().parents[2]


async def sync(src: Path, backend: Any, cache: StateCache, **kw: Any) -> Any:
    return await sync_tree(str(src), "/app", cache=cache, transfer=transfer_for(backend), **kw)


@pytest.fixture
def cache(tmp_path: Path) -> StateCache:
    return StateCache(tmp_path / "sync.db")


async def test_unchanged_tree_reads_nothing_and_keeps_its_id(tmp_path: Path, cache: StateCache) -> None:
    src = tmp_path / "src"
    tree(src, {"a.py": "print(1)\n", "pkg/b.py": "x = 2\n", "node_modules/m.js": "junk", "c.pyc": "bin"})
    backend = FakeFiles()
    first, r1 = await sync(src, backend, cache)
    assert [e.path for e in first.entries] == ["/app/a.py", "/app/pkg/b.py"]
    assert (r1.files_scanned, r1.files_changed, r1.files_uploaded) == (2, 2, 2)
    assert r1.bytes_hashed == r1.bytes_sent == 15
    lookups = backend.lookups
    again, r2 = await sync(src, backend, cache)
    assert again.id == first.id and again.entries == first.entries
    assert (r2.files_changed, r2.files_uploaded, r2.bytes_hashed, r2.bytes_sent) == (0, 0, 0, 0)
    assert backend.lookups == lookups  # the blob map answered: no backend call at all
    assert r2.elapsed_ms > 0


async def test_touch_without_edit_uploads_nothing(tmp_path: Path, cache: StateCache) -> None:
    src = tmp_path / "src"
    tree(src, {"a.txt": "same"})
    backend = FakeFiles()
    first, _ = await sync(src, backend, cache)
    os.utime(src / "a.txt", ns=(1, 1))
    again, report = await sync(src, backend, cache)
    assert report.files_changed == 1 and report.bytes_hashed == 4  # stat changed: read once
    assert report.files_uploaded == 0 and report.bytes_sent == 0 and len(backend.uploads) == 1
    assert again.id == first.id


async def test_edits_make_a_new_id_and_old_ids_keep_their_meaning(tmp_path: Path, cache: StateCache) -> None:
    src = tmp_path / "src"
    tree(src, {"a.txt": "one", "b.txt": "bee"})
    backend = FakeFiles()
    first, _ = await sync(src, backend, cache)
    (src / "a.txt").write_text("two")
    second, report = await sync(src, backend, cache)
    assert second.id != first.id and report.files_uploaded == 1 and backend.uploads[-1] == b"two"
    assert {e.path: e.sha256 for e in first.entries} != {e.path: e.sha256 for e in second.entries}
    (src / "a.txt").write_text("one")  # back to the first content: the first id again
    third, report = await sync(src, backend, cache)
    assert third.id == first.id and report.files_uploaded == 0


async def test_rename_and_duplicate_cost_no_upload(tmp_path: Path, cache: StateCache) -> None:
    src = tmp_path / "src"
    big = pseudo_random(300_000, 4)
    tree(src, {"old.bin": big})
    backend = FakeFiles()
    await sync(src, backend, cache)
    os.rename(src / "old.bin", src / "new.bin")
    shutil.copyfile(src / "new.bin", src / "copy.bin")
    manifest, report = await sync(src, backend, cache)
    assert [e.path for e in manifest.entries] == ["/app/copy.bin", "/app/new.bin"]
    assert len({e.uuid for e in manifest.entries}) == 1
    # the rename is recognised by inode/size/mtime (not even read); the copy is read, then deduplicated
    assert report.files_changed == 1 and report.bytes_hashed == len(big)
    assert report.files_uploaded == 0 and report.bytes_sent == 0 and len(backend.uploads) == 1
    assert report.files_removed == 1  # old.bin


async def test_duplicates_in_one_sync_are_sent_once(tmp_path: Path, cache: StateCache) -> None:
    src = tmp_path / "src"
    tree(src, {f"d{i}/same.txt": "dup" for i in range(20)})
    backend = FakeFiles()
    manifest, report = await sync(src, backend, cache)
    assert len(manifest.entries) == 20 and backend.uploads == [b"dup"] and report.files_uploaded == 1


async def test_deletions_and_permission_changes(tmp_path: Path, cache: StateCache) -> None:
    src = tmp_path / "src"
    tree(src, {"keep.sh": "echo\n", "gone.txt": "bye", "sub/x": "x"})
    backend = FakeFiles()
    first, _ = await sync(src, backend, cache)
    (src / "gone.txt").unlink()
    shutil.rmtree(src / "sub")
    os.chmod(src / "keep.sh", 0o755)
    second, report = await sync(src, backend, cache)
    assert [(e.path, e.mode) for e in second.entries] == [("/app/keep.sh", "0755")]
    assert report.files_removed == 2 and report.files_uploaded == 0
    assert {e.mode for e in first.entries} == {"0644"} and second.id != first.id
    files = second.injected_files()
    assert files["/app/keep.sh"].mode == "0755" and files["/app/keep.sh"].uid == 0


async def test_empty_files(tmp_path: Path, cache: StateCache) -> None:
    src = tmp_path / "src"
    tree(src, {"empty": b"", "also/empty": b""})
    remote = FakeFiles()
    manifest, _ = await sync(src, remote, cache)
    assert {e.size for e in manifest.entries} == {0} and remote.uploads == [b""]
    engine = EngineHolder(tmp_path / "blobs")
    on_engine, _ = await sync(src, engine, StateCache(tmp_path / "other.db"))
    uuid = on_engine.entries[0].uuid
    blob = engine.blobs.path_for(uuid)
    assert blob is not None and blob.read_bytes() == b""


async def test_symlinks_inside_are_content_outside_never_followed(tmp_path: Path, cache: StateCache) -> None:
    src, outside = tmp_path / "src", tmp_path / "outside"
    tree(outside, {"secret.txt": "s3cr3t", "dir/f": "also secret"})
    tree(src, {"real.txt": "real", "dir/inner.txt": "inner"})
    (src / "alias.txt").symlink_to("real.txt")
    (src / "leak.txt").symlink_to(outside / "secret.txt")
    (src / "leakdir").symlink_to(outside / "dir")
    (src / "loop").symlink_to(src)
    (src / "dangling").symlink_to(src / "nope")
    backend = FakeFiles()
    manifest, report = await sync(src, backend, cache)
    assert [e.path for e in manifest.entries] == ["/app/alias.txt", "/app/dir/inner.txt", "/app/real.txt"]
    assert all(b"secret" not in b and b"s3cr3t" not in b for b in backend.uploads)
    reasons = " | ".join(report.skipped)
    assert "leak.txt (symlink leaving the source" in reasons and "leakdir (symlink leaving" in reasons
    assert "loop (symlink to a directory" in reasons and "dangling (" in reasons


async def test_excludes_prune_dirs_and_gitignore_is_optional(tmp_path: Path, cache: StateCache) -> None:
    src = tmp_path / "src"
    tree(src, {".gitignore": "*.log\n/gen/\n", "a.log": "x", "gen/g.py": "g", "sub/.gitignore": "!keep.log\n",
               "sub/keep.log": "k", "sub/drop.log": "d", "node_modules/x.js": "x", "main.py": "m"})
    os.chmod(src / "node_modules", 0)  # pruned, so never opened (root could open it anyway)
    plain, _ = await sync(src, FakeFiles(), cache)
    assert "/app/a.log" in [e.path for e in plain.entries]
    honoured, _ = await sync(src, FakeFiles(), cache, gitignore=True)
    assert [e.path for e in honoured.entries] == [
        "/app/.gitignore", "/app/main.py", "/app/sub/.gitignore", "/app/sub/keep.log"
    ]
    everything, _ = await sync(src, FakeFiles(), cache, excludes=Excludes(defaults=False))
    assert "/app/node_modules/x.js" in [e.path for e in everything.entries]
    os.chmod(src / "node_modules", 0o755)


async def test_single_file_source_and_nothing_to_sync(tmp_path: Path, cache: StateCache) -> None:
    tree(tmp_path, {"one.txt": "1", "only/__pycache__/x.pyc": "c"})
    manifest, _ = await sync_tree(
        str(tmp_path / "one.txt"), "/d/", cache=cache, transfer=transfer_for(FakeFiles())  # type: ignore[arg-type]
    )
    assert [e.path for e in manifest.entries] == ["/d/one.txt"]
    with pytest.raises(SyncError, match="Nothing to sync in"):
        await sync(tmp_path / "only", FakeFiles(), cache)


def test_unreadable_file_fails_naming_it(tmp_path: Path) -> None:
    """Root reads anything, so the sync runs in a child without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH."""
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv not found: install the Debian package util-linux")
    src = tmp_path / "src"
    tree(src, {"ok.txt": "ok", "locked.txt": "no"})
    os.chmod(src / "locked.txt", 0)
    script = textwrap.dedent(f"""
        import asyncio
        from contree.sync import StateCache, SyncError, sync_tree, transfer_for
        from tests.sync.helpers import FakeFiles
        async def main():
            backend = FakeFiles()
            try:
                await sync_tree({str(src)!r}, "/app", cache=StateCache(None), transfer=transfer_for(backend))
            except SyncError as exc:
                print("ERROR", exc, "UPLOADS", len(backend.uploads))
        asyncio.run(main())
    """)
    out = subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all",
         sys.executable, "-c", script],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    assert f"ERROR cannot read {src / 'locked.txt'}: Permission denied" in out.stdout


async def test_remote_transfer_checks_existence_before_uploading(tmp_path: Path, cache: StateCache) -> None:
    src = tmp_path / "src"
    tree(src, {"a": "known", "b": "new"})
    backend = FakeFiles()
    await backend.upload_file(b"known")  # already on the server (e.g. uploaded by someone else)
    assert isinstance(transfer_for(backend), RemoteTransfer)  # type: ignore[arg-type]
    _, report = await sync(src, backend, cache)
    assert backend.uploads == [b"known", b"new"] and report.files_uploaded == 1 and report.bytes_sent == 3


async def test_engine_moves_about_one_chunk_after_a_one_byte_edit(tmp_path: Path, cache: StateCache) -> None:
    src = tmp_path / "src"
    data = bytearray(pseudo_random(24 << 20, 5))
    tree(src, {"huge.bin": bytes(data), "small.txt": "s"})
    engine = EngineHolder(tmp_path / "blobs")
    assert isinstance(transfer_for(engine), ChunkTransfer)  # type: ignore[arg-type]
    first, cold = await sync(src, engine, cache)
    assert cold.bytes_sent == len(data) + 1
    data[12_345_678] ^= 0xFF
    edited = src / "huge.bin"
    fd = os.open(edited, os.O_WRONLY)
    os.pwrite(fd, data[12_345_678:12_345_679], 12_345_678)
    os.close(fd)
    notes: list[tuple[int, int]] = []

    async def progress(done: int, total: int, message: str) -> None:
        notes.append((done, total))

    second, warm = await sync(src, engine, cache, progress=progress)
    assert warm.files_changed == 1 and warm.files_uploaded == 1
    assert 0 < warm.bytes_sent <= MAX_CHUNK and warm.bytes_hashed == len(data)
    assert notes[-1] == (1, 1)
    entry = next(e for e in second.entries if e.path == "/app/huge.bin")
    blob = engine.blobs.path_for(entry.uuid)
    assert blob is not None and blob.read_bytes() == bytes(data)
    assert second.id != first.id


async def test_cache_retention_is_by_last_use(tmp_path: Path, cache: StateCache) -> None:
    src = tmp_path / "src"
    tree(src, {"a.txt": "a"})
    await sync(src, FakeFiles(), cache)
    assert cache.prune(3600) == 0  # just used
    time_travel = 10**10
    assert cache.prune(-time_travel) == 3  # the file row, its blob and the snapshot, all older than "now + x"
    _, report = await sync(src, FakeFiles(), cache)
    assert report.files_changed == 1  # forgotten: read again, nothing worse


async def test_vanished_blobs_are_found_by_periodic_revalidation(
    tmp_path: Path, cache: StateCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    from contree.sync import syncer

    src = tmp_path / "src"
    tree(src, {"a.txt": "kept", "b.txt": "lost"})
    backend = FakeFiles()
    first, _ = await sync(src, backend, cache)
    lost = next(sha for sha, data in backend.blobs.items() if data == b"lost")
    del backend.files[lost]  # the server dropped it
    lookups = backend.lookups
    again, report = await sync(src, backend, cache)  # within the revalidation period: trusted
    assert again == first and backend.lookups == lookups and report.files_uploaded == 0
    monkeypatch.setattr(syncer, "REVALIDATE_AFTER", -1.0)
    fixed, report = await sync(src, backend, cache)
    assert backend.lookups == lookups + 2 + 1  # two existence checks, then the re-upload's own check
    assert report.files_changed == 1 and report.files_uploaded == 1 and backend.uploads[-1] == b"lost"
    assert fixed.id == first.id  # same content, so the same state id ...
    assert {e.path: e.uuid for e in fixed.entries}["/app/b.txt"] == backend.files[lost].uuid  # ... new home


async def test_engine_revalidation_checks_blob_records(
    tmp_path: Path, cache: StateCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    from contree.sync import syncer

    src = tmp_path / "src"
    tree(src, {"a.txt": "engine"})
    engine = EngineHolder(tmp_path / "blobs")
    first, _ = await sync(src, engine, cache)
    engine.blobs.gc(-10.0)  # everything older than "10 s from now": all of it
    monkeypatch.setattr(syncer, "REVALIDATE_AFTER", -1.0)
    fixed, report = await sync(src, engine, cache)
    assert report.files_uploaded == 1 and fixed.entries[0].uuid != first.entries[0].uuid
    blob = engine.blobs.path_for(fixed.entries[0].uuid)
    assert blob is not None and blob.read_bytes() == b"engine"


class _FailingTransfer:
    """Accepts every batch but the one holding `poison`; counts what it was asked."""

    needs_sha256 = False
    target = "failing:test"

    def __init__(self, poison: str) -> None:
        self.poison = poison
        self.asked: list[str] = []

    async def ensure_batch(self, items: list[tuple[str, Any]]) -> list[Any]:
        from contree.sync.transfer import Sent

        self.asked += [p for p, _ in items]
        if any(p.endswith(self.poison) for p, _ in items):
            raise RuntimeError("backend refused")
        return [Sent("0" * 64, "u-" + d.xxh128, d.size) for _, d in items]

    async def missing(self, refs: dict[str, tuple[str, str]]) -> set[str]:
        return set()


async def test_a_failing_transfer_stops_the_sync_and_what_was_read_stays_learnt(
    tmp_path: Path, cache: StateCache
) -> None:
    src = tmp_path / "src"
    tree(src, {f"d{i % 3}/f{i:03}.txt": f"content {i}" for i in range(300)})  # several read batches
    transfer = _FailingTransfer("f150.txt")
    with pytest.raises(RuntimeError, match="backend refused"):
        await sync_tree(str(src), "/app", cache=cache, transfer=transfer)  # type: ignore[arg-type]
    learnt = cache.files_under(str(src))
    assert learnt and all(p.startswith(str(src)) for p in learnt)
    # Contents the target accepted are remembered: the next sync sends only the rest.
    again = _FailingTransfer("never")
    manifest, report = await sync_tree(str(src), "/app", cache=cache, transfer=again)  # type: ignore[arg-type]
    assert len(manifest.entries) == 300 and report.files_changed < 300
    assert 0 < len(again.asked) < 300 and any(p.endswith("f150.txt") for p in again.asked)


class _StallingTransfer(_FailingTransfer):
    """Never finishes a batch: the sync can only end by being cancelled."""

    def __init__(self) -> None:
        super().__init__("never")
        self.started = asyncio.Event()

    async def ensure_batch(self, items: list[tuple[str, Any]]) -> list[Any]:
        self.started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_cancelled_sync_keeps_what_it_read(tmp_path: Path, cache: StateCache) -> None:
    src = tmp_path / "src"
    tree(src, {f"f{i:03}.txt": f"content {i}" for i in range(300)})
    transfer = _StallingTransfer()
    task = asyncio.create_task(sync_tree(str(src), "/app", cache=cache, transfer=transfer))  # type: ignore[arg-type]
    await asyncio.wait_for(transfer.started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cache.files_under(str(src))  # read before the cancel: remembered
    again = _FailingTransfer("never")
    manifest, _ = await sync_tree(str(src), "/app", cache=cache, transfer=again)  # type: ignore[arg-type]
    assert len(manifest.entries) == 300 and len(again.asked) == 300  # nothing was accepted before
