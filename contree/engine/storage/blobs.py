"""Content-addressed file blobs (`POST /files`), their injection into a sandbox, and the sync chunk store.

Layout under `root` (the engine's `blobs/`, same filesystem as the rest of the store):

    sha256/<hex>          uploaded files, immutable, named by their sha256
    chunks/<xx>/<hex>     sync chunks, named by their xxh3-128
    files.db              SQLite: one record per uploaded content (uuid, sha256, size, created, updated)
    tmp/                  staging; every blob is written, fsynced and renamed into place
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import ctypes
import errno
import hashlib
import os
import re
import stat
import threading
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path

import msgspec
import xxhash

from contree import api
from contree.backend import FileQuery
from contree.engine.storage.home import private_dir, private_file
from contree.errors import BadRequest, NotFound, Unprocessable
from contree.openat2 import RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, openat2
from contree.sqlitedb import open_wal
from contree.timeparse import isoformat, time_bounds

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_XXH128 = re.compile(r"^[0-9a-f]{32}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
_COPY = 1 << 20

_FILE_COLUMNS = "uuid, sha256, size, created_at, updated_at"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    uuid TEXT PRIMARY KEY, sha256 TEXT UNIQUE NOT NULL, size INTEGER NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS files_created ON files(created_at);
"""


_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(path: Path) -> None:
    """syncfs(2) of the filesystem holding `path`: makes every file written there durable in one call,
    instead of one fsync each (put_many's point)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobsPruned(msgspec.Struct, kw_only=True):
    sha256s: builtins.list[str]
    bytes: int
    chunks: int = 0
    chunk_bytes: int = 0


class _Staged:
    """A temp file being written and hashed; `finish` fsyncs it and renames it to its content name."""

    def __init__(self, tmp_dir: Path) -> None:
        self.path = tmp_dir / f"upload-{uuidlib.uuid4().hex}"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.sha.update(data)
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.size += len(data)

    def finish(self, dest_dir: Path) -> tuple[str, int]:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        digest = self.sha.hexdigest()
        dest = dest_dir / digest
        if dest.exists():
            self.path.unlink()
        else:
            os.chmod(self.path, 0o400)
            os.rename(self.path, dest)
            _fsync_dir(dest_dir)
        return digest, self.size

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class BlobStore:
    """Uploaded files of one engine. Thread-safe; `upload` is the only coroutine."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.files_dir = self.root / "sha256"
        self.chunks_dir = self.root / "chunks"
        self.tmp_dir = self.root / "tmp"
        for d in (self.root, self.files_dir, self.chunks_dir, self.tmp_dir):
            private_dir(d)
        for leftover in self.tmp_dir.iterdir():  # half-written uploads of a previous process
            leftover.unlink(missing_ok=True)
        self._lock = threading.Lock()
        private_file(self.root / "files.db")
        self._db = open_wal(self.root / "files.db", _SCHEMA, synchronous="FULL", busy_timeout=10.0)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- records ---------------------------------------------------------------------------------------

    def _record(self, digest: str, size: int) -> api.FileResponse:
        """Insert or bump the record of `digest` (re-uploads keep their uuid; `updated_at` moves)."""
        return self._record_many([(digest, size)])[0]

    @staticmethod
    def _file(row: tuple[str, str, int, float, float]) -> api.File:
        return api.File(uuid=row[0], sha256=row[1], size=row[2], created_at=isoformat(row[3]),
                        updated_at=isoformat(row[4]))

    def put_bytes(self, data: bytes) -> api.FileResponse:
        staged = _Staged(self.tmp_dir)
        try:
            staged.write(data)
            digest, size = staged.finish(self.files_dir)
        except BaseException:
            staged.abort()
            raise
        return self._record(digest, size)

    def put_many(self, items: Sequence[bytes]) -> builtins.list[api.FileResponse]:
        """Store several (small) uploads at once: one syncfs, one directory fsync and one database
        transaction for all, instead of three fsyncs each (a cold rsync of 10,000 files)."""
        staged: builtins.list[_Staged] = []
        try:
            for data in items:
                one = _Staged(self.tmp_dir)
                staged.append(one)
                one.write(data)
            _syncfs(self.tmp_dir)
            done: builtins.list[tuple[str, int]] = []
            for one in staged:
                os.close(one.fd)
                one.fd = -1
                digest = one.sha.hexdigest()
                dest = self.files_dir / digest
                if dest.exists():
                    one.path.unlink()
                else:
                    os.chmod(one.path, 0o400)
                    os.rename(one.path, dest)
                done.append((digest, one.size))
            _fsync_dir(self.files_dir)
        except BaseException:
            for one in staged:
                one.abort()
            raise
        return self._record_many(done)

    def _record_many(self, items: builtins.list[tuple[str, int]]) -> builtins.list[api.FileResponse]:
        """`_record` for a batch, in one transaction."""
        now = time.time()
        out: builtins.list[api.FileResponse] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for digest, size in items:
                    row = self._db.execute("SELECT uuid FROM files WHERE sha256 = ?", (digest,)).fetchone()
                    if row is None:
                        file_uuid = str(uuidlib.uuid4())
                        self._db.execute("INSERT INTO files VALUES (?,?,?,?,?)",
                                         (file_uuid, digest, size, now, now))
                    else:
                        file_uuid = row[0]
                        self._db.execute("UPDATE files SET updated_at = ? WHERE uuid = ?", (now, file_uuid))
                    out.append(api.FileResponse(uuid=file_uuid, sha256=digest, size=size))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return out

    async def upload(self, data: bytes | AsyncIterator[bytes]) -> api.FileResponse:
        """Store an upload streamed from the client (never held in memory whole)."""
        if isinstance(data, bytes | bytearray | memoryview):
            return await asyncio.to_thread(self.put_bytes, bytes(data))
        staged = _Staged(self.tmp_dir)
        try:
            async for chunk in data:
                staged.write(chunk)
            digest, size = await asyncio.to_thread(staged.finish, self.files_dir)
        except BaseException:
            staged.abort()
            raise
        return await asyncio.to_thread(self._record, digest, size)

    def get(self, sha256: str) -> api.File:
        digest = sha256.lower()
        if not _SHA256.match(digest):
            raise BadRequest(f"invalid sha256 {sha256!r}: expected 64 hex digits")
        with self._lock:
            sql = f"SELECT {_FILE_COLUMNS} FROM files WHERE sha256 = ?"
            row = self._db.execute(sql, (digest,)).fetchone()
        if row is None:
            raise NotFound(f"file {sha256} not found")
        return self._file(row)

    def list(self, query: FileQuery | None = None) -> list[api.File]:
        q = query or FileQuery()
        if not 1 <= q.limit <= 1000 or q.offset < 0:
            raise BadRequest("limit must be 1..1000 and offset ≥ 0")
        where: list[str] = []
        args: list[object] = []
        bounds, bound_args = time_bounds("updated_at", q.since, q.until)
        where += bounds
        args += bound_args
        sql = f"SELECT {_FILE_COLUMNS} FROM files"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY updated_at DESC, uuid LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._db.execute(sql, [*args, q.limit, q.offset]).fetchall()
        return [self._file(r) for r in rows]

    def path_for(self, ref: str) -> Path | None:
        """The blob of a file record, by record uuid or by sha256; None when unknown."""
        key = ref.lower()
        column = "uuid" if _UUID.match(key) else "sha256" if _SHA256.match(key) else None
        if column is None:
            return None
        with self._lock:
            row = self._db.execute(f"SELECT sha256 FROM files WHERE {column} = ?", (key,)).fetchone()
        if row is None:
            return None
        path = self.files_dir / row[0]
        return path if path.is_file() else None

    def gc(self, older_than: float) -> builtins.list[str]:
        """Forget uploads not (re-)uploaded for `older_than` seconds, and chunks as old; returns the
        removed sha256s. Injected files were copied into layers, so no image needs its blob later."""
        return self.prune(uploaded_before=time.time() - older_than).sha256s

    def prune(
        self, *, uploaded_before: float, keep: Iterable[str] = (), dry_run: bool = False
    ) -> BlobsPruned:
        """Delete uploads last (re-)uploaded before `uploaded_before`, except the file uuids in `keep`
        (files queued runs will inject), sync chunks as old, and blob files no record names (a crash
        between a record's deletion and its file's)."""
        kept = set(keep)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = [(u, d, n) for u, d, n in self._db.execute(
                    "SELECT uuid, sha256, size FROM files WHERE updated_at < ?", (uploaded_before,))
                    if u not in kept]
                if not dry_run:
                    self._db.executemany("DELETE FROM files WHERE uuid = ?", [(u,) for u, _, _ in rows])
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            known = {r[0] for r in self._db.execute("SELECT sha256 FROM files")}
        out = BlobsPruned(sha256s=[d for _, d, _ in rows], bytes=sum(n for _, _, n in rows))
        doomed = {d for _, d, _ in rows}
        for entry in list(self.files_dir.iterdir()):
            with contextlib.suppress(FileNotFoundError):
                if entry.name in doomed:
                    if not dry_run:
                        entry.unlink()
                elif entry.name not in known and entry.stat().st_mtime < uploaded_before:
                    out.bytes += entry.stat().st_size
                    out.sha256s.append(entry.name)
                    if not dry_run:
                        entry.unlink()
        for shard in list(self.chunks_dir.iterdir()):
            for chunk in list(shard.iterdir()):
                with contextlib.suppress(FileNotFoundError):
                    st = chunk.stat()
                    if st.st_mtime < uploaded_before:
                        out.chunks += 1
                        out.chunk_bytes += st.st_size
                        if not dry_run:
                            chunk.unlink()
        return out

    # ---- sync chunks (xxh3-128) -----------------------------------------------------------------------

    def _chunk_path(self, digest: str) -> Path:
        if not _XXH128.match(digest):
            raise BadRequest(f"invalid chunk hash {digest!r}: expected 32 hex digits (xxh3-128)")
        return self.chunks_dir / digest[:2] / digest

    def put_chunk(self, digest: str, data: bytes) -> None:
        """Store one chunk; its content must hash to `digest` (xxh3-128 hex)."""
        path = self._chunk_path(digest)
        actual = xxhash.xxh3_128_hexdigest(data)
        if actual != digest:
            raise BadRequest(f"chunk content hashes to {actual}, not {digest}")
        if path.exists():
            return
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = self.tmp_dir / f"chunk-{uuidlib.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)

    def put_chunks(self, items: Sequence[tuple[str, bytes]]) -> None:
        """`put_chunk` for many chunks with one syncfs instead of an fsync each."""
        todo: builtins.list[tuple[Path, Path]] = []
        try:
            for digest, data in items:
                path = self._chunk_path(digest)
                actual = xxhash.xxh3_128_hexdigest(data)
                if actual != digest:
                    raise BadRequest(f"chunk content hashes to {actual}, not {digest}")
                if path.exists():
                    continue
                tmp = self.tmp_dir / f"chunk-{uuidlib.uuid4().hex}"
                todo.append((tmp, path))
                with open(tmp, "wb") as f:
                    f.write(data)
            if todo:
                _syncfs(self.tmp_dir)
            for tmp, path in todo:
                path.parent.mkdir(mode=0o700, exist_ok=True)
                os.rename(tmp, path)
        except BaseException:
            for tmp, _ in todo:
                tmp.unlink(missing_ok=True)
            raise

    def has_chunks(self, digests: Iterable[str]) -> set[str]:
        """The subset of `digests` already stored."""
        return {d for d in digests if self._chunk_path(d).is_file()}

    def assemble(self, digests: Sequence[str]) -> api.FileResponse:
        """Concatenate stored chunks into one uploaded file (NotFound names the first missing chunk)."""
        missing = [d for d in digests if not self._chunk_path(d).is_file()]
        if missing:
            raise NotFound(f"{len(missing)} chunks missing, first {missing[0]}")
        staged = _Staged(self.tmp_dir)
        try:
            for d in digests:
                staged.write(self._chunk_path(d).read_bytes())
            digest, size = staged.finish(self.files_dir)
        except BaseException:
            staged.abort()
            raise
        return self._record(digest, size)

    # ---- injection -------------------------------------------------------------------------------------

    def inject_file(self, root: Path | int, path: str, blob: Path, *, mode: int = 0o644, uid: int = 0,
                    gid: int = 0) -> None:
        inject_file(root, path, blob, mode=mode, uid=uid, gid=gid)


def _open_dir_in_root(rootfd: int, rel: str) -> int:
    return openat2(rootfd, rel or ".", os.O_RDONLY | os.O_DIRECTORY, _RESOLVE)


def inject_file(
    root: Path | int, path: str, blob: Path, *, mode: int = 0o644, uid: int = 0, gid: int = 0
) -> None:
    """Write `blob` to image path `path` under `root` (a merged rootfs or an upper dir, path or dirfd).

    Every step resolves inside `root` (`openat2(RESOLVE_IN_ROOT)`): symlinks in the image, absolute or
    with `..`, can never send the write to the host. Missing parents are created (root:root 0755). An
    existing symlink at the final path is replaced by the file, never followed. A directory there is
    refused (422).
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise BadRequest(f"invalid file path {path!r}")
    rootfd = root if isinstance(root, int) else os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parent = _make_parents(rootfd, parts[:-1])
        try:
            _write_final(parent, parts[-1], path, blob, mode, uid, gid)
        finally:
            os.close(parent)
    finally:
        if not isinstance(root, int):
            os.close(rootfd)


def _make_parents(rootfd: int, parents: list[str]) -> int:
    """An fd of the parent directory, creating missing directories one verified level at a time."""
    fd = _open_dir_in_root(rootfd, "")
    try:
        for i, name in enumerate(parents):
            rel = "/".join(parents[: i + 1])
            try:
                nxt = _open_dir_in_root(rootfd, rel)
            except FileNotFoundError:
                # `fd` is the resolved parent, so the new directory lands inside the root even when
                # `rel` went through symlinks; a dangling symlink named `name` makes mkdir fail.
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    raise Unprocessable(f"cannot create /{rel}: a dangling symlink is in the way") from None
                nxt = _open_dir_in_root(rootfd, rel)
            except NotADirectoryError:
                raise Unprocessable(f"cannot create /{rel}: a parent is not a directory") from None
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_final(parent: int, name: str, path: str, blob: Path, mode: int, uid: int, gid: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    try:
        fd = openat2(parent, name, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink: replace it rather than write through it
            os.unlink(name, dir_fd=parent)
            fd = openat2(parent, name, flags | os.O_EXCL, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS, 0o600)
        elif exc.errno == errno.EISDIR:
            raise Unprocessable(f"cannot write {path}: it is a directory in the image") from None
        else:
            raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Unprocessable(f"cannot write {path}: not a regular file in the image")
        with open(blob, "rb") as src:
            while chunk := src.read(_COPY):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode & 0o7777)  # after chown, which clears set-id bits
    finally:
        os.close(fd)

