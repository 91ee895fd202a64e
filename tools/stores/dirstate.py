"""rsync's directory states: immutable, content-identified manifests of a synced host directory.

A state id is a random integer below 2^53 naming one manifest (path → file, mode) for one principal.
Syncing identical content again returns the same id; changed content gets a new id and never alters
what an old id means. The scan, the chunk diff and the transfer are `contree.sync`'s.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec

from contree import api
from contree.backend import Backend
from contree.errors import NotFound
from contree.fsutil import open_regular
from protocol.errors import ToolError
from tools.bounds import MAX_STATE_ID

CHUNK = 1024 * 1024
MAX_ID = MAX_STATE_ID


def parse_state_id(state_id: int | str) -> int:
    """The integer a `directory_state_id` names (given as a number or a string of digits)."""
    try:
        number = int(str(state_id).strip())
    except ValueError:
        raise ToolError(f"Directory state not found: {state_id}") from None
    if not 1 <= number <= MAX_ID:
        raise ToolError(f"directory_state_id must be between 1 and {MAX_ID}, got {number}")
    return number


class ManifestEntry(msgspec.Struct, array_like=True):
    path: str  # absolute path in the sandbox
    sha256: str
    uuid: str
    mode: str  # "0644"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    try:
        # never blocks on a FIFO, never follows a link swapped in after the caller's checks
        with open(open_regular(path), "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise ToolError(f"cannot read {path}: {exc.strerror}") from None
    return h.hexdigest()


async def file_chunks(path: str) -> AsyncIterator[bytes]:
    fd = await asyncio.to_thread(open_regular, path)
    with open(fd, "rb") as f:  # noqa: ASYNC230 - wraps the fd opened in the thread above
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk


async def ensure_blob(
    backend: Backend, sha256: str, path: str | None, data: bytes | None = None
) -> tuple[str, int]:
    """(file uuid, size): reuse the backend's blob when it has the content, else upload it."""
    try:
        got = await backend.get_file(sha256)
        return got.uuid, got.size
    except NotFound:
        pass
    if data is not None:
        resp = await backend.upload_file(data)
    else:
        assert path is not None
        resp = await backend.upload_file(file_chunks(path))
    if resp.sha256 and resp.sha256 != sha256:
        raise ToolError(f"{path or 'content'} changed while it was uploaded; try again")
    return resp.uuid, resp.size


def mode_string(st_mode: int) -> str:
    return format(stat.S_IMODE(st_mode), "04o")


class DirectoryStates:
    """SQLite: manifests by (principal, id), and a stat cache so unchanged files are not re-hashed."""

    def __init__(self, path: Path | None) -> None:
        target = str(path) if path else ":memory:"
        if target != ":memory:":  # ":memory:" keeps nothing on disk (tests, transcripts)
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(target, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._db.executescript(
                "CREATE TABLE IF NOT EXISTS states (principal TEXT NOT NULL, id INTEGER NOT NULL,"
                " digest TEXT NOT NULL, manifest BLOB NOT NULL, used_at REAL NOT NULL,"
                " source TEXT, destination TEXT,"
                " PRIMARY KEY (principal, id), UNIQUE (principal, digest));"
            )
            self._db.commit()

    def save(
        self, principal: str | None, entries: list[ManifestEntry], origin: tuple[str, str] | None = None
    ) -> int:
        """The id of this content for this principal; `origin` = (host source, sandbox destination)."""
        source, destination = origin or (None, None)
        ordered = sorted(entries, key=lambda e: e.path)
        encoded = msgspec.msgpack.encode(ordered)
        # Identity is the content (path, sha256, mode); the blob uuid is only where the backend keeps it.
        digest = hashlib.sha256(
            msgspec.msgpack.encode([(e.path, e.sha256, e.mode) for e in ordered])
        ).hexdigest()
        key = principal or ""
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM states WHERE principal=? AND digest=?", (key, digest)
            ).fetchone()
            if row:
                self._db.execute(
                    "UPDATE states SET used_at=?, manifest=?, source=COALESCE(?, source),"
                    " destination=COALESCE(?, destination) WHERE principal=? AND id=?",
                    (time.time(), encoded, source, destination, key, row[0]),
                )
                self._db.commit()
                return int(row[0])
            while True:
                new_id = secrets.randbelow(MAX_ID - 1) + 1
                try:
                    self._db.execute(
                        "INSERT INTO states VALUES (?,?,?,?,?,?,?)",
                        (key, new_id, digest, encoded, time.time(), source, destination),
                    )
                    self._db.commit()
                    return new_id
                except sqlite3.IntegrityError:
                    continue  # id collision (astronomically rare): draw again

    def origin_of(self, principal: str | None, state_id: int) -> tuple[str, str] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT source, destination FROM states WHERE principal=? AND id=?",
                (principal or "", state_id),
            ).fetchone()
        return (row[0], row[1]) if row and row[0] and row[1] else None

    async def restore_blobs(self, backend: Backend, principal: str | None, state_id: int | str) -> int:
        """Re-upload the blobs of a state that vanished from the backend (COMPAT §15.38), from the synced
        host files when their content is unchanged. Returns how many were uploaded."""
        number = parse_state_id(state_id)
        entries = self.load(principal, number)
        origin = self.origin_of(principal, number)
        if not entries or origin is None:
            return 0
        source, destination = origin
        restored = 0
        fixed: list[ManifestEntry] = []
        single_file = await asyncio.to_thread(os.path.isfile, source)
        for entry in entries:
            try:
                got = await backend.get_file(entry.sha256)
                fixed.append(ManifestEntry(entry.path, entry.sha256, got.uuid, entry.mode))
                continue
            except NotFound:
                pass
            host = source if single_file else source + "/" + entry.path[len(destination) :].lstrip("/")
            # rsync syncs an in-tree symlink as its target's content: read the target, never a file
            # outside the synced tree (and the content must still be what was synced)
            real = await asyncio.to_thread(os.path.realpath, host)
            if real != source and not real.startswith(source.rstrip("/") + "/"):
                raise ToolError(f"{host} changed since rsync and its old content is gone: run rsync again")
            host = real
            sha = await asyncio.to_thread(sha256_file, host)
            if sha != entry.sha256:
                raise ToolError(f"{host} changed since rsync and its old content is gone: run rsync again")
            uuid, _ = await ensure_blob(backend, sha, host)
            fixed.append(ManifestEntry(entry.path, entry.sha256, uuid, entry.mode))
            restored += 1
        if restored:
            self.save(principal, fixed, origin)
        return restored

    def load(self, principal: str | None, state_id: int) -> list[ManifestEntry] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT manifest FROM states WHERE principal=? AND id=?", (principal or "", state_id)
            ).fetchone()
        if row is None:
            return None
        return msgspec.msgpack.decode(row[0], type=list[ManifestEntry])

    async def injected_files(self, principal: str | None, state_id: int | str) -> dict[str, api.InjectedFile]:
        number = parse_state_id(state_id)
        entries = self.load(principal, number)
        if entries is None:
            raise ToolError(f"Directory state not found: {state_id}")
        with self._lock:
            self._db.execute(
                "UPDATE states SET used_at=? WHERE principal=? AND id=?",
                (time.time(), principal or "", number),
            )
            self._db.commit()
        if not entries:
            raise ToolError(f"Directory state has no files: {state_id}")
        return {e.path: api.InjectedFile(uuid=e.uuid, mode=e.mode) for e in entries}

    def prune(self, older_than_days: float) -> int:
        """Retention by last use (COMPAT §15.39): states nobody used for that long; returns how many."""
        cutoff = time.time() - older_than_days * 86400
        with self._lock:
            gone = self._db.execute("DELETE FROM states WHERE used_at < ?", (cutoff,)).rowcount
            self._db.commit()
        return int(gone)

    def close(self) -> None:
        with self._lock:
            self._db.close()
