"""The local sync cache (stdlib SQLite): what each host file looked like when it was last read, and which
backend already holds which content.

`files` is keyed by host path with the stat tuple (size, mtime_ns, inode, mode) and the content's
digests and chunk list, so a file whose stat is unchanged is never read again. `blobs` maps
(target backend, xxh3-128 of the content) to the backend's file record, so unchanged content costs no
backend call either.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import msgspec

from contree.sync.chunker import Chunk, FileDigest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL,
    mode INTEGER NOT NULL, xxh128 TEXT NOT NULL, sha256 TEXT NOT NULL, chunks BLOB NOT NULL,
    used_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS files_by_inode ON files (inode, size, mtime_ns);
CREATE TABLE IF NOT EXISTS blobs (
    target TEXT NOT NULL, xxh128 TEXT NOT NULL, sha256 TEXT NOT NULL, uuid TEXT NOT NULL,
    used_at REAL NOT NULL, PRIMARY KEY (target, xxh128));
"""

_chunks = msgspec.msgpack.Encoder()
_chunks_dec = msgspec.msgpack.Decoder(list[Chunk])


class StatKey(msgspec.Struct, array_like=True, frozen=True):
    size: int
    mtime_ns: int
    inode: int
    mode: int


class CachedFile(msgspec.Struct, array_like=True, frozen=True):
    stat: StatKey
    xxh128: str
    sha256: str  # "" when it was never needed
    chunks_blob: bytes  # msgpack list[Chunk], decoded only when needed

    def digest(self) -> FileDigest:
        return FileDigest(self.stat.size, self.xxh128, self.sha256, _chunks_dec.decode(self.chunks_blob))


class BlobRef(msgspec.Struct, array_like=True, frozen=True):
    sha256: str
    uuid: str


class StateCache:
    """Blocking and thread-safe: call it from worker threads."""

    def __init__(self, path: Path | str | None = None) -> None:
        target = str(path) if path else ":memory:"
        if target != ":memory:":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def files_under(self, root: str) -> dict[str, CachedFile]:
        """Every cached file at `root` or below it, in one query."""
        base = root.rstrip("/") + "/"
        with self._lock:
            rows = self._db.execute(
                "SELECT path, size, mtime_ns, inode, mode, xxh128, sha256, chunks FROM files"
                " WHERE path = ? OR (path >= ? AND path < ?)",
                (root, base, base[:-1] + "0"),  # "0" sorts right after "/"
            ).fetchall()
        return {r[0]: CachedFile(StatKey(r[1], r[2], r[3], r[4]), r[5], r[6], r[7]) for r in rows}

    def by_inode(self, stat: StatKey) -> CachedFile | None:
        """A cached file with this inode, size and mtime (the same file under a new name: a rename)."""
        with self._lock:
            r = self._db.execute(
                "SELECT size, mtime_ns, inode, mode, xxh128, sha256, chunks FROM files"
                " WHERE inode = ? AND size = ? AND mtime_ns = ? LIMIT 1",
                (stat.inode, stat.size, stat.mtime_ns),
            ).fetchone()
        return CachedFile(StatKey(r[0], r[1], r[2], r[3]), r[4], r[5], r[6]) if r else None

    def remember(self, rows: Iterable[tuple[str, StatKey, FileDigest]]) -> None:
        now = time.time()
        values = [
            (p, s.size, s.mtime_ns, s.inode, s.mode, d.xxh128, d.sha256, _chunks.encode(d.chunks), now)
            for p, s, d in rows
        ]
        if not values:
            return
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?)", values)
            self._db.execute("COMMIT")

    def forget(self, paths: Iterable[str]) -> None:
        doomed = [(p,) for p in paths]
        if not doomed:
            return
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM files WHERE path = ?", doomed)
            self._db.execute("COMMIT")

    def blobs(self, target: str) -> dict[str, BlobRef]:
        with self._lock:
            rows = self._db.execute(
                "SELECT xxh128, sha256, uuid FROM blobs WHERE target = ?", (target,)
            ).fetchall()
        return {r[0]: BlobRef(r[1], r[2]) for r in rows}

    def remember_blobs(self, target: str, refs: Iterable[tuple[str, BlobRef]]) -> None:
        now = time.time()
        values = [(target, x, b.sha256, b.uuid, now) for x, b in refs]
        if not values:
            return
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO blobs VALUES (?,?,?,?,?)", values)
            self._db.execute("COMMIT")

    def forget_blob(self, target: str, xxh128: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM blobs WHERE target = ? AND xxh128 = ?", (target, xxh128))

    def touch(self, paths: Iterable[str]) -> None:
        """Mark rows as used (retention is by last use, COMPAT §15.39)."""
        now = time.time()
        values = [(now, p) for p in paths]
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("UPDATE files SET used_at = ? WHERE path = ?", values)
            self._db.execute("COMMIT")

    def prune(self, older_than: float) -> int:
        """Drop rows not used for `older_than` seconds; returns how many went."""
        cutoff = time.time() - older_than
        with self._lock:
            gone = self._db.execute("DELETE FROM files WHERE used_at < ?", (cutoff,)).rowcount
            gone += self._db.execute("DELETE FROM blobs WHERE used_at < ?", (cutoff,)).rowcount
        return int(gone)
