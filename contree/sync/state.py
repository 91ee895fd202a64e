"""The local sync cache (stdlib SQLite): what each host file looked like when it was last read, and which
backend already holds which content.

`files` is keyed by host path with the stat tuple (size, mtime_ns, inode, mode) and the content's
digests and chunk list, so a file whose stat is unchanged is never read again. `blobs` maps
(target backend, xxh3-128 of the content) to the backend's file record, so unchanged content costs no
backend call either.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path

import msgspec

from contree.sqlitedb import open_wal
from contree.sync.chunker import Chunk, FileDigest

# WITHOUT ROWID: the primary key is the table, so a cold sync's 10,000 inserts update one b-tree less
# (blobs: 38 -> 19 ms). Caches created before keep their rowid tables; both work.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL,
    mode INTEGER NOT NULL, xxh128 TEXT NOT NULL, sha256 TEXT NOT NULL, chunks BLOB NOT NULL,
    used_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS files_by_inode ON files (inode, size, mtime_ns);
CREATE TABLE IF NOT EXISTS blobs (
    target TEXT NOT NULL, xxh128 TEXT NOT NULL, sha256 TEXT NOT NULL, uuid TEXT NOT NULL,
    used_at REAL NOT NULL, PRIMARY KEY (target, xxh128)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS snapshots (
    root TEXT NOT NULL, target TEXT NOT NULL, body BLOB NOT NULL, used_at REAL NOT NULL,
    PRIMARY KEY (root, target));
"""

_IN_BATCH = 500  # host parameters per IN (...) query, far below SQLite's limit
_chunks = msgspec.msgpack.Encoder()
_chunks_dec = msgspec.msgpack.Decoder(list[Chunk])


# (size, mtime_ns, inode, mode): plain tuples, because the warm path compares 10,000s of them.
StatKey = tuple[int, int, int, int]
# (size, mtime_ns, inode, mode, xxh128, sha256 or "" when it was never needed)
Known = tuple[int, int, int, int, str, str]


class BlobRef(msgspec.Struct, array_like=True, frozen=True):
    sha256: str
    uuid: str


class Snapshot(msgspec.Struct, array_like=True):
    """The last sync of one root to one target in a single row: a warm sync decodes one blob instead of
    fetching a row per file (the per-path rows stay the source of truth for renames and chunk lists)."""

    files: dict[str, Known]
    blobs: dict[str, BlobRef]
    checked_at: float = 0.0  # when the target last confirmed it still holds `blobs`


_snapshot_enc = msgspec.msgpack.Encoder()
_snapshot_dec = msgspec.msgpack.Decoder(Snapshot)


class StateCache:
    """Blocking and thread-safe: call it from worker threads."""

    def __init__(self, path: Path | str | None = None) -> None:
        target = str(path) if path else ":memory:"
        if target != ":memory:":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        self._db = open_wal(target, _SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def files_under(self, root: str) -> dict[str, Known]:
        """Every cached file at `root` or below it, in one query (chunk lists stay in the database)."""
        base = root.rstrip("/") + "/"
        with self._lock:
            rows = self._db.execute(
                "SELECT path, size, mtime_ns, inode, mode, xxh128, sha256 FROM files"
                " WHERE path = ? OR (path >= ? AND path < ?)",
                (root, base, base[:-1] + "0"),  # "0" sorts right after "/"
            ).fetchall()
        return {r[0]: r[1:] for r in rows}

    def by_inode(self, stat: StatKey) -> FileDigest | None:
        """The content of a cached file with this inode, size and mtime (the same file under a new
        name: a rename)."""
        size, mtime_ns, inode, _ = stat
        with self._lock:
            r = self._db.execute(
                "SELECT size, xxh128, sha256, chunks FROM files"
                " WHERE inode = ? AND size = ? AND mtime_ns = ? LIMIT 1",
                (inode, size, mtime_ns),
            ).fetchone()
        return FileDigest(r[0], r[1], r[2], _chunks_dec.decode(r[3])) if r else None

    def by_inodes(self, stats: Iterable[StatKey]) -> dict[tuple[int, int, int], FileDigest]:
        """`by_inode` for many files in a few queries, keyed by (inode, size, mtime_ns): a cold sync of
        10,000 new files asked 10,000 times one at a time."""
        wanted = {(s[2], s[0], s[1]) for s in stats}
        inodes = sorted({w[0] for w in wanted})
        out: dict[tuple[int, int, int], FileDigest] = {}
        with self._lock:
            for at in range(0, len(inodes), _IN_BATCH):
                part = inodes[at : at + _IN_BATCH]
                rows = self._db.execute(
                    "SELECT inode, size, mtime_ns, xxh128, sha256, chunks FROM files"
                    f" WHERE inode IN ({','.join('?' * len(part))})",
                    part,
                ).fetchall()
                for inode, size, mtime_ns, xxh, sha, chunks in rows:
                    key = (inode, size, mtime_ns)
                    if key in wanted and key not in out:
                        out[key] = FileDigest(size, xxh, sha, _chunks_dec.decode(chunks))
        return out

    def chunks_of(self, path: str) -> list[Chunk] | None:
        with self._lock:
            r = self._db.execute("SELECT chunks FROM files WHERE path = ?", (path,)).fetchone()
        return _chunks_dec.decode(r[0]) if r else None

    def save(
        self,
        rows: Iterable[tuple[str, StatKey, FileDigest]],
        target: str,
        refs: Iterable[tuple[str, BlobRef]],
        removed: Iterable[str],
    ) -> None:
        """`remember`, `remember_blobs` and `forget` in one transaction (one commit per sync)."""
        now = time.time()
        files = [(p, *s, d.xxh128, d.sha256, _chunks.encode(d.chunks), now) for p, s, d in rows]
        blobs = [(target, x, b.sha256, b.uuid, now) for x, b in refs]
        doomed = [(p,) for p in removed]
        if not (files or blobs or doomed):
            return
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?)", files)
                self._db.executemany("INSERT OR REPLACE INTO blobs VALUES (?,?,?,?,?)", blobs)
                self._db.executemany("DELETE FROM files WHERE path = ?", doomed)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def remember(self, rows: Iterable[tuple[str, StatKey, FileDigest]]) -> None:
        now = time.time()
        values = [
            (p, *s, d.xxh128, d.sha256, _chunks.encode(d.chunks), now)
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

    def snapshot(self, root: str, target: str) -> Snapshot | None:
        with self._lock:
            r = self._db.execute(
                "SELECT body FROM snapshots WHERE root = ? AND target = ?", (root, target)
            ).fetchone()
        if r is None:
            return None
        try:
            return _snapshot_dec.decode(r[0])
        except msgspec.DecodeError:
            return None  # written by an incompatible version: rebuilt from the rows

    def save_snapshot(self, root: str, target: str, snap: Snapshot) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO snapshots VALUES (?,?,?,?)",
                (root, target, _snapshot_enc.encode(snap), time.time()),
            )

    def forget_blob(self, target: str, xxh128: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM blobs WHERE target = ? AND xxh128 = ?", (target, xxh128))

    def touch_snapshot(self, root: str, target: str) -> None:
        """Retention is by last use (COMPAT §15.39): a warm sync that changed nothing still uses it."""
        with self._lock:
            self._db.execute(
                "UPDATE snapshots SET used_at = ? WHERE root = ? AND target = ?", (time.time(), root, target)
            )

    def prune(self, older_than: float) -> int:
        """Drop rows not used for `older_than` seconds; returns how many went."""
        cutoff = time.time() - older_than
        with self._lock:
            gone = self._db.execute("DELETE FROM files WHERE used_at < ?", (cutoff,)).rowcount
            gone += self._db.execute("DELETE FROM blobs WHERE used_at < ?", (cutoff,)).rowcount
            gone += self._db.execute("DELETE FROM snapshots WHERE used_at < ?", (cutoff,)).rowcount
        return int(gone)
