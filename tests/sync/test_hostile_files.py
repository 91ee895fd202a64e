"""Issue 17 item 8: a file swapped for a FIFO (or a link) between the scan and the read never hangs a
sync: files are opened without blocking, regular files only, checked on the open descriptor.

The swaps are made by deterministic hooks at the seams of `sync_tree` (after the scan; after the hash,
before the transfer reads again), never by a race."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from contree import fsutil
from contree.sync import Excludes, StateCache, SyncError, sync_tree, syncer, transfer_for
from contree.sync.chunker import FileChangedError
from tests.sync.helpers import EngineHolder, FakeFiles, tree

# a reader stuck in open() is let go after this long: it bounds the test, not the sync's speed
HANG = 10.0


def make_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


class Released:
    """Lets a reader stuck in open() on `fifo` (the bug) go after HANG seconds, and at the end, so a
    failing test ends instead of hanging the run; `stuck` says whether it had to."""

    def __init__(self, fifo: Path) -> None:
        self.fifo = fifo
        self.stuck = False
        self._timer = threading.Timer(HANG, self._let_go, (True,))

    def _let_go(self, stuck: bool = False) -> None:
        with contextlib.suppress(OSError):
            # only a FIFO: never open what a swap left there (a link to a host file) for writing
            fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
            self.stuck = self.stuck or (stuck and stat.S_ISFIFO(os.fstat(fd).st_mode))
            os.close(fd)

    def __enter__(self) -> Released:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self._let_go()


@pytest.mark.parametrize("kind", ["remote", "engine"])
async def test_a_file_swapped_for_a_fifo_after_the_scan_fails_the_sync_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    src = tmp_path / "src"
    tree(src, {"a.txt": "a", "b.txt": "b"})
    fifo = src / "b.txt"
    real_scan = syncer.scan

    def scan_then_swap(*args: Any, **kwargs: Any) -> Any:
        found = real_scan(*args, **kwargs)
        make_fifo(fifo)
        return found

    monkeypatch.setattr(syncer, "scan", scan_then_swap)
    backend = FakeFiles() if kind == "remote" else EngineHolder(tmp_path / "blobs")
    with Released(fifo):
        with pytest.raises(FileChangedError, match=r"b\.txt became a FIFO while it was synced; sync again"):
            await sync_tree(str(src), "/app", cache=StateCache(None), transfer=transfer_for(backend))


@pytest.mark.parametrize("swap", [make_fifo, lambda p: (p.unlink(), p.symlink_to("/etc/passwd"))])
async def test_a_file_swapped_after_hashing_is_not_read_by_the_transfer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: Callable[[Path], Any]
) -> None:
    """The engine transfer opens the file a second time to store it: that open is guarded too."""
    src = tmp_path / "src"
    tree(src, {"a.txt": "a"})
    target = src / "a.txt"
    real_read = syncer._read

    def read_then_swap(found: Any, need_sha: bool) -> Any:
        digest = real_read(found, need_sha)
        swap(target)
        return digest

    monkeypatch.setattr(syncer, "_read", read_then_swap)
    holder = EngineHolder(tmp_path / "blobs")
    with Released(target):
        with pytest.raises(FileChangedError, match=r"a\.txt became a (FIFO|symbolic link)"):
            await sync_tree(str(src), "/app", cache=StateCache(None), transfer=transfer_for(holder))


async def test_a_fifo_named_gitignore_is_not_read(tmp_path: Path) -> None:
    src = tmp_path / "src"
    tree(src, {"a.txt": "a", "sub/b.txt": "b"})
    os.mkfifo(src / "sub" / ".gitignore")
    with Released(src / "sub" / ".gitignore") as fifo:
        manifest, report = await sync_tree(
            str(src), "/app", cache=StateCache(None), transfer=transfer_for(FakeFiles()), excludes=Excludes(),
            gitignore=True,
        )  # fmt: skip
    assert not fifo.stuck
    assert [e.path for e in manifest.entries] == ["/app/a.txt", "/app/sub/b.txt"]
    assert "sub/.gitignore (not a regular file)" in report.skipped


def test_open_regular_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    with Released(tmp_path / "fifo"):
        with pytest.raises(fsutil.NotRegularFile, match="a FIFO"):
            fsutil.open_regular(tmp_path / "fifo")
    with pytest.raises(fsutil.NotRegularFile, match="a symbolic link"):
        fsutil.open_regular(tmp_path / "link")
    with pytest.raises(fsutil.NotRegularFile, match="a directory"):
        fsutil.open_regular(tmp_path)
    with pytest.raises(fsutil.NotRegularFile, match="a character device"):
        fsutil.open_regular("/dev/null")
    fd = fsutil.open_regular(tmp_path / "link", follow_symlinks=True)
    try:
        assert os.get_blocking(fd) and os.read(fd, 10) == b"x"
    finally:
        os.close(fd)


# --- names a sandbox path cannot carry, hard links leaving the tree (issue 17 item 9) -------------------


def make_bytes_tree(root: Path, files: dict[bytes, bytes]) -> None:
    for rel, content in files.items():
        path = os.fsencode(root) + b"/" + rel
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)


@pytest.mark.parametrize("kind", ["remote", "engine"])
async def test_names_that_are_not_utf8_are_reported_and_skipped(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "src"
    make_bytes_tree(
        src, {b"ok.txt": b"ok", b"bad\xff.txt": b"x", b"dir\xfe/inner.txt": b"y", b"d/\xe9t\xe9": b"z"}
    )
    backend = FakeFiles() if kind == "remote" else EngineHolder(tmp_path / "blobs")
    manifest, report = await sync_tree(
        str(src), "/app", cache=StateCache(None), transfer=transfer_for(backend)
    )
    assert [e.path for e in manifest.entries] == ["/app/ok.txt"]
    assert sorted(report.skipped) == [
        "bad\\xff.txt (file name is not UTF-8, not synced)",
        "d/\\xe9t\\xe9 (file name is not UTF-8, not synced)",
        "dir\\xfe (file name is not UTF-8, not synced)",
    ]


async def test_a_hard_link_to_a_file_outside_the_tree_is_not_synced(tmp_path: Path) -> None:
    outside = tmp_path / "private" / "id_rsa"
    outside.parent.mkdir()
    outside.write_text("PRIVATE KEY")
    src = tmp_path / "src"
    tree(src, {"main.py": "print(1)\n"})
    os.link(outside, src / "innocent.txt")
    backend = FakeFiles()
    manifest, report = await sync_tree(
        str(src), "/app", cache=StateCache(None), transfer=transfer_for(backend)
    )
    assert [e.path for e in manifest.entries] == ["/app/main.py"]
    assert report.skipped == ["innocent.txt (hard link to a file outside the synced files, not synced)"]
    assert b"PRIVATE KEY" not in backend.blobs.values()
    # named alone, it is refused with the reason
    with pytest.raises(SyncError, match=r"innocent\.txt \(hard link to a file outside the synced files"):
        await sync_tree(
            str(src / "innocent.txt"), "/app", cache=StateCache(None), transfer=transfer_for(backend)
        )


async def test_hard_links_within_the_tree_are_synced(tmp_path: Path) -> None:
    src = tmp_path / "src"
    tree(src, {"a.txt": "same", "sub/other.txt": "x"})
    os.link(src / "a.txt", src / "sub" / "b.txt")
    os.symlink("a.txt", src / "alias.txt")
    manifest, report = await sync_tree(
        str(src), "/app", cache=StateCache(None), transfer=transfer_for(FakeFiles())
    )
    assert [e.path for e in manifest.entries] == [
        "/app/a.txt",
        "/app/alias.txt",
        "/app/sub/b.txt",
        "/app/sub/other.txt",
    ]
    assert report.skipped == []
