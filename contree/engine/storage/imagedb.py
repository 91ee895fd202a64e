"""Image and layer records of one engine home: the store's metadata, in SQLite (`images.db`, WAL).

`ImageDB` holds the records (`ImageRecord`: layers top first, config, parent, tag, sizes) and the layer
rows (size, created, source), answers every query about them (get, list with the API's filters, children,
lineage, tags) and writes them in transactions. It knows nothing of the files: `Store` (store.py) is an
`ImageDB` plus the layer trees, and keeps the two consistent.

Thread-safe: one connection behind a lock. WAL with synchronous=NORMAL: always consistent, the newest
transactions may be lost on power loss.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from contree import api
from contree.backend import ImageQuery
from contree.engine.storage.overlay import MAX_LOWERS
from contree.errors import BadRequest, NotFound
from contree.sqlitedb import open_wal
from contree.timeparse import isoformat, time_bounds

KIND_INSTANCE = 0
KIND_IMPORTED = 1


class ImageConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    env: list[str] = msgspec.field(default_factory=list)  # KEY=VALUE, applied only with shell=true
    cwd: str = "/"
    user: str = ""
    entrypoint: list[str] | None = None  # kept for information only (the API drops them)
    cmd: list[str] | None = None
    labels: dict[str, str] | None = None


class ImageRecord(msgspec.Struct, kw_only=True, frozen=True):
    uuid: str
    layers: list[str]  # top first
    config: ImageConfig
    created_at: float
    kind: int
    tag: str | None = None
    parent: str | None = None
    operation_uuid: str | None = None
    size: int = 0  # bytes of the image's own (top) layer
    total_size: int = 0  # bytes of all its layers

    @property
    def depth(self) -> int:
        return len(self.layers)

    def to_api(self) -> api.Image:
        return api.Image(uuid=self.uuid, tag=self.tag, created_at=isoformat(self.created_at),
                         operation_uuid=self.operation_uuid)


class LayerMeta(msgspec.Struct, kw_only=True):
    size: int
    created: float
    source: str  # run | oci(sha256:…) | bootstrap | squash


_SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    id TEXT PRIMARY KEY, size INTEGER NOT NULL, created REAL NOT NULL, source TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    uuid TEXT PRIMARY KEY, tag TEXT UNIQUE, parent TEXT, layers TEXT NOT NULL, config TEXT NOT NULL,
    operation_uuid TEXT, created_at REAL NOT NULL, size INTEGER NOT NULL, total_size INTEGER NOT NULL,
    kind INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS images_created ON images(created_at);
CREATE INDEX IF NOT EXISTS images_parent ON images(parent);
CREATE TABLE IF NOT EXISTS layer_trash (id TEXT PRIMARY KEY, since REAL NOT NULL);
"""
IMAGE_COLUMNS = "uuid, tag, parent, layers, config, operation_uuid, created_at, size, total_size, kind"


class ImageDB:
    """The image and layer records of one engine home."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.RLock()
        # synchronous=NORMAL: FULL cost ~6 ms per run commit under load
        self._db = open_wal(path, _SCHEMA, busy_timeout=10.0)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ---- records -------------------------------------------------------------------------------------

    @staticmethod
    def _row(row: tuple[Any, ...]) -> ImageRecord:
        uuid, tag, parent, layers, config, op, created, size, total, kind = row
        return ImageRecord(uuid=uuid, tag=tag, parent=parent, layers=json.loads(layers),
                           config=msgspec.json.decode(config, type=ImageConfig), operation_uuid=op,
                           created_at=created, size=size, total_size=total, kind=kind)

    def find(self, image_uuid: str) -> ImageRecord | None:
        with self._lock:
            sql = f"SELECT {IMAGE_COLUMNS} FROM images WHERE uuid = ?"
            row = self._db.execute(sql, (image_uuid,)).fetchone()
        return None if row is None else self._row(row)

    def get(self, image_uuid: str) -> ImageRecord:
        record = self.find(image_uuid)
        if record is None:
            raise NotFound(f"image {image_uuid} not found")
        return record

    def list_images(self, query: ImageQuery | None = None) -> list[ImageRecord]:
        """Newest first, with the filters of `GET /images` (tag is a prefix and implies tagged)."""
        q = query or ImageQuery()
        if not 1 <= q.limit <= 1000 or q.offset < 0:
            raise BadRequest("limit must be 1..1000 and offset ≥ 0")
        where: list[str] = []
        args: list[object] = []
        if q.tagged or q.tag is not None:
            where.append("tag IS NOT NULL")
        if q.tag:
            where.append("substr(tag, 1, ?) = ?")
            args += [len(q.tag), q.tag]
        if q.uuid:
            where.append("substr(uuid, 1, ?) = ?")
            args += [len(q.uuid), q.uuid.lower()]
        bounds, bound_args = time_bounds("created_at", q.since, q.until)
        where += bounds
        args += bound_args
        if q.kind is not None:
            where.append("kind = ?")
            args.append(q.kind)
        sql = f"SELECT {IMAGE_COLUMNS} FROM images"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, uuid LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._db.execute(sql, [*args, q.limit, q.offset]).fetchall()
        return [self._row(r) for r in rows]

    def all_images(self) -> list[ImageRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {IMAGE_COLUMNS} FROM images").fetchall()
        return [self._row(r) for r in rows]

    def layer_sizes(self) -> dict[str, int]:
        """Bytes of every registered layer, by id."""
        with self._lock:
            return {lid: int(size) for lid, size in self._db.execute("SELECT id, size FROM layers")}

    def children(self, image_uuid: str) -> list[ImageRecord]:
        with self._lock:
            sql = f"SELECT {IMAGE_COLUMNS} FROM images WHERE parent = ? ORDER BY created_at"
            rows = self._db.execute(sql, (image_uuid,)).fetchall()
        return [self._row(r) for r in rows]

    def parent(self, image_uuid: str) -> ImageRecord | None:
        parent = self.get(image_uuid).parent
        return None if parent is None else self.find(parent)

    def lineage(self, image_uuid: str) -> list[ImageRecord]:
        """The image and its ancestors, nearest first."""
        out: list[ImageRecord] = []
        record: ImageRecord | None = self.get(image_uuid)
        while record is not None and len(out) <= MAX_LOWERS * 2:
            out.append(record)
            record = self.find(record.parent) if record.parent else None
        return out

    # ---- tags ------------------------------------------------------------------------------------------

    def resolve_tag(self, tag: str) -> str:
        with self._lock:
            row = self._db.execute("SELECT uuid FROM images WHERE tag = ?", (tag,)).fetchone()
        if row is None:
            raise NotFound(f"tag {tag!r} not found")
        return str(row[0])

    def set_tag(self, image_uuid: str, tag: str) -> ImageRecord:
        """Tag the image; a tag is unique, so it moves from whichever image held it."""
        tag = tag.strip()
        if not tag or len(tag) > 255 or any(c.isspace() for c in tag):
            raise BadRequest(f"invalid tag {tag!r}: 1..255 characters without whitespace")
        with self._tx() as db:
            if db.execute("SELECT 1 FROM images WHERE uuid = ?", (image_uuid,)).fetchone() is None:
                raise NotFound(f"image {image_uuid} not found")
            db.execute("UPDATE images SET tag = NULL WHERE tag = ?", (tag,))
            db.execute("UPDATE images SET tag = ? WHERE uuid = ?", (tag, image_uuid))
        return self.get(image_uuid)

    def delete_tag(self, image_uuid: str, tag: str | None = None) -> None:
        """Remove the image's tag (`tag` given: only if it is that tag, else NotFound)."""
        with self._tx() as db:
            row = db.execute("SELECT tag FROM images WHERE uuid = ?", (image_uuid,)).fetchone()
            if row is None:
                raise NotFound(f"image {image_uuid} not found")
            if tag is not None and row[0] != tag:
                raise NotFound(f"image {image_uuid} has no tag {tag!r}")
            db.execute("UPDATE images SET tag = NULL WHERE uuid = ?", (image_uuid,))

    # ---- layer rows ----------------------------------------------------------------------------------

    def has_layer(self, layer_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM layers WHERE id = ?", (layer_id,)).fetchone() is not None

    def _insert_image(self, db: sqlite3.Connection, rec: ImageRecord) -> None:
        if rec.tag is not None:
            db.execute("UPDATE images SET tag = NULL WHERE tag = ?", (rec.tag,))
        db.execute(f"INSERT INTO images ({IMAGE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (rec.uuid, rec.tag, rec.parent, json.dumps(rec.layers), msgspec.json.encode(rec.config),
                    rec.operation_uuid, rec.created_at, rec.size, rec.total_size, rec.kind))

    def _sizes(self, db: sqlite3.Connection, layers: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for lid in layers:
            row = db.execute("SELECT size FROM layers WHERE id = ?", (lid,)).fetchone()
            if row is None:
                raise NotFound(f"layer {lid} not found")
            out[lid] = int(row[0])
        return out

    def referenced_layers(self) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT layers FROM images").fetchall()
        return {lid for (layers,) in rows for lid in json.loads(layers)}

    list = list_images  # the brief's name; bound last so annotations above still mean the builtin
