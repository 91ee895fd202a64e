"""The sync cache's storage: caches written by earlier releases keep working."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from contree.sync import StateCache, sync_tree, transfer_for
from tests.sync.helpers import FakeFiles, tree

# The first release's schema (rowid tables); later releases create WITHOUT ROWID tables instead.
_OLD_SCHEMA = """
CREATE TABLE files (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL,
    mode INTEGER NOT NULL, xxh128 TEXT NOT NULL, sha256 TEXT NOT NULL, chunks BLOB NOT NULL,
    used_at REAL NOT NULL);
CREATE INDEX files_by_inode ON files (inode, size, mtime_ns);
CREATE TABLE blobs (
    target TEXT NOT NULL, xxh128 TEXT NOT NULL, sha256 TEXT NOT NULL, uuid TEXT NOT NULL,
    used_at REAL NOT NULL, PRIMARY KEY (target, xxh128));
CREATE TABLE snapshots (
    root TEXT NOT NULL, target TEXT NOT NULL, body BLOB NOT NULL, used_at REAL NOT NULL,
    PRIMARY KEY (root, target));
"""


async def test_a_cache_with_the_old_schema_is_used_as_is(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(_OLD_SCHEMA)
    src = tmp_path / "src"
    tree(src, {"a.txt": "alpha", "b/c.txt": "gamma"})
    backend = FakeFiles()
    cache = StateCache(db)
    _, r1 = await sync_tree(str(src), "/app", cache=cache, transfer=transfer_for(backend))  # type: ignore[arg-type]
    cache.close()
    cache = StateCache(db)
    (src / "a.txt").rename(src / "moved.txt")  # answered by the batched inode lookup
    again, r2 = await sync_tree(str(src), "/app", cache=cache, transfer=transfer_for(backend))  # type: ignore[arg-type]
    assert r1.files_uploaded == 2 and r2.files_changed == 0 and r2.files_uploaded == 0
    assert sorted(e.path for e in again.entries) == ["/app/b/c.txt", "/app/moved.txt"]
    assert "WITHOUT ROWID" not in _schema(db, "files")
    StateCache(tmp_path / "new.db").close()
    assert "WITHOUT ROWID" in _schema(tmp_path / "new.db", "files")


def _schema(db: Path, table: str) -> str:
    with sqlite3.connect(db) as conn:
        return str(conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0])
