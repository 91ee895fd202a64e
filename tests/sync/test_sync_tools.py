"""The rsync / upload / download tools on contree.sync: allowed roots (refused, nothing read), superset
parameters, the per-sync report and progress, and download's no-clobber default."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from tests.sync.helpers import tree
from tests.tools.fakes import FakeBackend, FakeContext, call, make_registry


def sync_rows(tmp_path: Path) -> list[str]:
    db = tmp_path / "cache" / "sync.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT path FROM files")]


async def test_outside_the_allowed_roots_is_refused_and_nothing_is_read(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    tree(outside, {"secret.txt": "s3cr3t"})
    tree(root, {"ok.txt": "ok"})
    (root / "door").symlink_to(outside)
    backend = FakeBackend()
    reg, _ = make_registry(backend, tmp_path, roots=[root])
    for source in (outside, root / "door", root / "door" / "secret.txt", root / ".." / "outside"):
        out = await call(reg, "rsync", {"source": str(source), "destination": "/x"})
        assert out["isError"] and "outside the allowed roots" in out["content"][0]["text"], source
    up = await call(reg, "upload", {"path": str(root / "door" / "secret.txt")})
    assert up["isError"] and "outside the allowed roots" in up["content"][0]["text"]
    assert backend.blobs == {} and sync_rows(tmp_path) == []
    ok = await call(reg, "rsync", {"source": str(root), "destination": "/x"})
    assert not ok.get("isError") and sync_rows(tmp_path) == [str(root / "ok.txt")]


async def test_rsync_reports_progress_and_a_summary(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files: dict[str, str | bytes] = {f"f{i}.txt": f"content {i}" for i in range(100)}
    tree(src, {**files, "node_modules/x.js": "x"})
    reg, _ = make_registry(FakeBackend(), tmp_path)
    ctx = FakeContext()
    first = await call(reg, "rsync", {"source": str(src), "destination": "/app"}, ctx)
    state_id = first["structuredContent"]["result"]
    assert first["content"][0]["text"] == str(state_id)  # the compat shape: a bare integer
    summary = ctx.logs[-1]
    assert summary["directory_state_id"] == state_id and summary["manifest"].startswith("sha256:")
    assert (summary["files_scanned"], summary["files_changed"], summary["files_uploaded"]) == (100, 100, 100)
    assert summary["bytes_sent"] == summary["bytes_hashed"] > 0 and summary["elapsed_ms"] > 0
    assert ctx.progress_calls[-1][:2] == (100, 100)
    again = FakeContext()
    await call(reg, "rsync", {"source": str(src), "destination": "/app"}, again)
    assert again.logs[-1]["files_changed"] == 0 and again.logs[-1]["bytes_sent"] == 0


async def test_rsync_superset_params(tmp_path: Path) -> None:
    src = tmp_path / "src"
    tree(src, {".gitignore": "secret.env\n", "secret.env": "k=v", "build/out.txt": "o", "main.py": "m"})
    reg, state = make_registry(FakeBackend(), tmp_path)

    async def paths(args: dict[str, object]) -> list[str]:
        out = await call(reg, "rsync", {"source": str(src), "destination": "/app", **args})
        return sorted(await state.dirstates.injected_files(None, out["structuredContent"]["result"]))

    assert await paths({}) == ["/app/.gitignore", "/app/main.py", "/app/secret.env"]
    assert await paths({"gitignore": True}) == ["/app/.gitignore", "/app/main.py"]
    assert "/app/build/out.txt" in await paths({"default_excludes": False})


async def test_unreadable_directory_entry_is_a_clear_tool_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    tree(src, {"ok.txt": "ok"})
    os.mkfifo(src / "pipe")  # not a regular file: skipped and reported, never opened (would block)
    reg, _ = make_registry(FakeBackend(), tmp_path)
    ctx = FakeContext()
    out = await call(reg, "rsync", {"source": str(src), "destination": "/app"}, ctx)
    assert not out.get("isError") and ctx.logs[-1]["skipped"] == ["pipe (not a regular file)"]
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = await call(reg, "rsync", {"source": str(empty), "destination": "/app"})
    assert nothing["isError"] and "Nothing to sync in" in nothing["content"][0]["text"]


async def test_download_clobbers_only_unless_told_not_to(tmp_path: Path) -> None:
    """0.5.0 overwrites by default; overwrite=false refuses an existing file and leaves it as it was."""
    backend = FakeBackend()
    backend.add_image("art:1", {"/out/bin": b"#!/bin/sh\n"})
    reg, _ = make_registry(backend, tmp_path)
    dest = tmp_path / "bin"
    dest.write_text("mine")
    args = {"image": "art:1", "path": "/out/bin", "destination": str(dest)}
    refused = await call(reg, "download", {**args, "overwrite": False})
    assert refused["isError"] and "pass overwrite=true" in refused["content"][0]["text"]
    assert dest.read_text() == "mine" and not list(tmp_path.glob(".bin*"))  # noqa: ASYNC240
    done = await call(reg, "download", {**args, "executable": True})
    assert done["structuredContent"]["size"] == 10 and dest.read_bytes() == b"#!/bin/sh\n"
    assert dest.stat().st_mode & 0o777 == 0o755
