"""The image store: immutable overlay layers plus image records in SQLite (RUNTIME §7, §15.1).

Layout under `home` (one filesystem, so a commit is a rename):

    layers/<id>/        overlay-format tree, immutable (whiteouts c 0:0, opaque xattrs: layerformat.py)
    images.db           SQLite (WAL): images, layers (size, created, source of each layer)
    blobs/              uploaded files and sync chunks (`blobs.py`)
    tmp/                staging; everything is renamed into place when complete
    sandboxes/          scratch area of running sandboxes (upper/, work/, rootfs/)

Crash safety: a layer is renamed into `layers/` before its database row exists and the row is written
in the same transaction as the image that references it, so a crash leaves at worst an unreferenced
directory, which `recover()` removes. Data of committed files is not fsynced (a SIGKILL of the engine
keeps the page cache; only power loss could lose it), and sandbox overlays are mounted `volatile`, so
not even their unmount syncs: it reaches the disk by normal writeback.

Deleting (prune, `delete_image`, `gc`): a layer is deleted only while its directory is locked
exclusively (`flock`); every user of a layer (`pinned`: a running sandbox, an import, a grep) holds a
shared lock on it, in any process, so a layer in use is never deleted and a run never starts on one being
deleted. The image and layer rows go in one transaction that also lists the layers in `layer_trash`; the
directories are removed after the commit. A crash in between leaves trash that `recover()` (or the next
prune) finishes, and `check()` accepts.

Power loss: SQLite runs WAL with synchronous=NORMAL (always consistent; the newest transactions may be
lost). Imports and squashes fsync `layers/` before their row is written; a run's commit does not (it is
on the latency path of every `disposable=false` run), so in the rare case where the filesystem persists
the row but not the rename, `check()` and `recover()` name the layer whose directory is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from contree import api
from contree.backend import ImageQuery
from contree.engine.home import private_dir, private_file
from contree.engine.overlay import MAX_LOWERS, mount_overlay, mounts_under, unmount
from contree.engine.resolver import Resolver
from contree.engine.upperfs import LayerTooLarge, copy_layer
from contree.errors import BadRequest, Conflict, NotFound
from contree.layerformat import is_overlay_xattr, opaque_xattr
from contree.timeparse import isoformat, parse_timestamp

MAX_DEPTH = 64  # squash beyond this (RUNTIME §6.2); the kernel's own limit is 500
KIND_INSTANCE = 0
KIND_IMPORTED = 1
_RESOLVER_CACHE = 64


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


class _Doomed(NamedTuple):
    """A layer in the trash: its id, the fd holding its directory's exclusive lock (-1: no directory)."""

    id: str
    fd: int
    size: int


class Pruned(msgspec.Struct, kw_only=True):
    """What a prune deleted (or, dry run, would delete): images, layers and the bytes of those layers."""

    images: list[ImageRecord]
    layers: list[str]
    bytes: int


def _refuse_to_delete(
    image: ImageRecord, by_uuid: dict[str, ImageRecord], keep: set[str], busy: set[str]
) -> None:
    if image.tag is not None:
        raise Conflict(f"image {image.uuid} is tagged {image.tag!r}: remove the tag first")
    children = [i.uuid for i in by_uuid.values() if i.parent == image.uuid]
    if children:
        raise Conflict(f"image {image.uuid} is the parent of {len(children)} other image(s), e.g. "
                       f"{children[0]}: delete those first")
    if image.uuid in keep:
        why = "queued or running operation" if image.uuid in busy else "sandbox that is starting"
        raise Conflict(f"image {image.uuid} is in use by a {why}")


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
_COLUMNS = "uuid, tag, parent, layers, config, operation_uuid, created_at, size, total_size, kind"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """`rm -rf` that refuses to descend into a mount (it would delete the lower layers' content)."""
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        if mounts_under(path):
            raise OSError(errno.EBUSY, f"refusing to delete {path}: a filesystem is still mounted below it")
        try:
            shutil.rmtree(path)
        except RecursionError:  # deeper than Python's stack: coreutils walks it iteratively
            subprocess.run(["rm", "-rf", "--one-file-system", "--", os.fspath(path)], check=True)
    else:
        path.unlink()


def _walk(root: Path) -> Iterator[os.DirEntry[str]]:
    stack = [os.fspath(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                yield entry
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)


def tree_size(root: Path) -> int:
    """Bytes of regular files below `root`, hardlinked files counted once."""
    return _measure(root, strip=False)


def clean_and_measure(upper: Path) -> int:
    """`clean_upper` and `tree_size` in one walk (a commit is on a run's latency path)."""
    return _measure(upper, strip=True)


def _measure(root: Path, *, strip: bool) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    if strip:
        _strip_overlay_xattrs(os.fspath(root))
    for entry in _walk(root):
        if strip:
            _strip_overlay_xattrs(entry.path)
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            total += st.st_size
        elif stat.S_ISLNK(st.st_mode):
            total += st.st_size
    return total


def _strip_overlay_xattrs(path: str) -> None:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    keep = opaque_xattr()
    for name in names:
        if is_overlay_xattr(name) and name != keep:
            os.removexattr(path, name, follow_symlinks=False)


def clean_upper(upper: Path) -> int:
    """Strip overlay bookkeeping xattrs except `opaque` (RUNTIME §7); returns the number of entries."""
    count = 0
    for path in [os.fspath(upper)] + [e.path for e in _walk(upper)]:
        count += 1
        _strip_overlay_xattrs(path)
    return count - 1


PIN_WAIT = 1.0  # seconds a pin waits for a prune's brief exclusive probe of a layer


def _share_lock(fd: int, layer_id: str) -> None:
    """A shared flock on a layer directory. Callers run on an event loop, so it never blocks for long:
    a prune holds a layer exclusively only while it decides (milliseconds) or deletes it (then it is
    gone anyway)."""
    delay = 0.001
    deadline = time.monotonic() + PIN_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise NotFound(f"layer {layer_id} is being deleted (pruned)") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def _make_scratch(path: Path) -> None:
    """A run's scratch dir: `path` with empty upper/, work/ and rootfs/."""
    for sub in ("upper", "work", "rootfs"):
        (path / sub).mkdir(parents=True)


class Store:
    """Images and layers of one engine home. Thread-safe (one SQLite connection behind a lock)."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.layers_dir = self.home / "layers"
        self.tmp_dir = self.home / "tmp"
        self.blobs_dir = self.home / "blobs"
        self.sandboxes_dir = self.home / "sandboxes"
        for d in (self.home, self.layers_dir, self.tmp_dir, self.blobs_dir, self.sandboxes_dir):
            private_dir(d)  # layers keep setuid files and device nodes: never reachable by other users
        self._lock = threading.RLock()
        self._pins: Counter[str] = Counter()
        # Open layer fds per layer list: what makes a read from a deep image cost microseconds. An evicted
        # resolver closes its fds when its last user drops it.
        self._resolvers: OrderedDict[tuple[str, ...], Resolver] = OrderedDict()
        private_file(self.home / "images.db")
        self._db = sqlite3.connect(self.home / "images.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit costs no fsync and the database stays consistent after power loss
        # (only the newest transactions can be lost); FULL cost ~6 ms per run commit under load.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)
        self._spares: list[Path] = []  # empty scratch dirs made ahead, see `scratch_dir`

    def close(self) -> None:
        with self._lock:
            self._resolvers.clear()
            self._db.close()

    def resolver(self, image: ImageRecord) -> Resolver:
        """A (cached) userspace resolver over the image's layers."""
        key = tuple(image.layers)
        with self._lock:
            found = self._resolvers.get(key)
            if found is not None:
                self._resolvers.move_to_end(key)
                return found
        made = Resolver(self.layer_paths(image))
        with self._lock:
            self._resolvers[key] = made
            while len(self._resolvers) > _RESOLVER_CACHE:
                self._resolvers.popitem(last=False)
        return made

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

    # ---- paths and staging -------------------------------------------------------------------------

    def layer_path(self, layer_id: str) -> Path:
        return self.layers_dir / layer_id

    def layer_paths(self, image: ImageRecord) -> list[Path]:
        """The image's layer directories, top first (what `mount_overlay` takes)."""
        return [self.layers_dir / lid for lid in image.layers]

    def scratch_dir(self, name: str) -> Path:
        """`sandboxes/<name>` with empty `upper/`, `work/` and `rootfs/` for a run.

        A spare made by `make_spare_scratch` is renamed into place when there is one: four mkdirs on the
        layer filesystem cost 0.3-0.8 ms here, on the run's way to its start; a rename costs 10 us.
        """
        target = self.sandboxes_dir / name
        with self._lock:
            spare = self._spares.pop() if self._spares else None
        if spare is not None:
            try:
                os.rename(spare, target)
                return target
            except OSError:
                remove_tree(spare)
        _make_scratch(target)
        return target

    def make_spare_scratch(self, keep: int) -> None:
        """Make spare scratch dirs until `keep` wait (from a run's teardown, off anyone's latency)."""
        while True:
            with self._lock:
                if len(self._spares) >= keep:
                    return
            path = self.sandboxes_dir / f".spare-{uuidlib.uuid4().hex}"
            _make_scratch(path)
            with self._lock:
                self._spares.append(path)

    def staging_dir(self, prefix: str = "stage") -> Path:
        """A fresh empty directory under `tmp/` (same filesystem as the layers, so it can be renamed in)."""
        path = self.tmp_dir / f"{prefix}-{uuidlib.uuid4().hex}"
        path.mkdir(mode=0o755)
        return path

    # ---- records -------------------------------------------------------------------------------------

    @staticmethod
    def _row(row: tuple[Any, ...]) -> ImageRecord:
        uuid, tag, parent, layers, config, op, created, size, total, kind = row
        return ImageRecord(uuid=uuid, tag=tag, parent=parent, layers=json.loads(layers),
                           config=msgspec.json.decode(config, type=ImageConfig), operation_uuid=op,
                           created_at=created, size=size, total_size=total, kind=kind)

    def find(self, image_uuid: str) -> ImageRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM images WHERE uuid = ?", (image_uuid,)).fetchone()
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
        for value, op in ((q.since, ">="), (q.until, "<=")):
            if value:
                try:
                    args.append(parse_timestamp(value))
                except ValueError as exc:
                    raise BadRequest(str(exc)) from None
                where.append(f"created_at {op} ?")
        if q.kind is not None:
            where.append("kind = ?")
            args.append(q.kind)
        sql = f"SELECT {_COLUMNS} FROM images"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, uuid LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._db.execute(sql, [*args, q.limit, q.offset]).fetchall()
        return [self._row(r) for r in rows]

    def all_images(self) -> list[ImageRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM images").fetchall()
        return [self._row(r) for r in rows]

    def layer_sizes(self) -> dict[str, int]:
        """Bytes of every registered layer, by id."""
        with self._lock:
            return {lid: int(size) for lid, size in self._db.execute("SELECT id, size FROM layers")}

    def children(self, image_uuid: str) -> list[ImageRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM images WHERE parent = ? ORDER BY created_at",
                                    (image_uuid,)).fetchall()
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

    # ---- creating images ---------------------------------------------------------------------------------

    def has_layer(self, layer_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM layers WHERE id = ?", (layer_id,)).fetchone() is not None

    def _place_layer(self, directory: Path, layer_id: str, source: str, size: int | None = None,
                     durable: bool = True) -> LayerMeta:
        """Rename a finished tree into `layers/`; the caller writes the DB row from the returned meta.

        `durable` fsyncs `layers/` so that after power loss the row never outlives the rename.
        """
        meta = LayerMeta(size=tree_size(directory) if size is None else size, created=time.time(),
                         source=source)
        dest = self.layers_dir / layer_id
        try:
            os.rename(directory, dest)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise OSError(exc.errno, f"{directory} is not on the store's filesystem ({self.home}); "
                              "stage layers with Store.staging_dir()") from exc
            raise
        if durable:
            fsync_dir(self.layers_dir)
        return meta

    def _insert_image(self, db: sqlite3.Connection, rec: ImageRecord) -> None:
        if rec.tag is not None:
            db.execute("UPDATE images SET tag = NULL WHERE tag = ?", (rec.tag,))
        db.execute(f"INSERT INTO images ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
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

    def create_image_from_layer_dirs(
        self,
        layer_dirs: Sequence[Path | str],
        *,
        config: ImageConfig | None = None,
        tag: str | None = None,
        kind: int = KIND_IMPORTED,
        source: str = "bootstrap",
        operation_id: str | None = None,
        parent: ImageRecord | None = None,
        image_uuid: str | None = None,
    ) -> ImageRecord:
        """Register an image made of finished layer trees (top first) on top of `parent`'s layers.

        A `Path` is a staged tree (see `staging_dir`) that is moved into the store; a `str` is the id of a
        layer already stored (shared layers, e.g. OCI digests). With `image_uuid` given and already
        present, the existing record is returned (idempotent import) and only the tag is moved.
        """
        if image_uuid is not None and (existing := self.find(image_uuid)) is not None:
            return self.set_tag(existing.uuid, tag) if tag else existing
        ids: list[str] = []
        placed: dict[str, LayerMeta] = {}
        for item in layer_dirs:
            if isinstance(item, str):
                if not self.has_layer(item):
                    raise NotFound(f"layer {item} not found")
                ids.append(item)
            else:
                lid = uuidlib.uuid4().hex
                placed[lid] = self._place_layer(Path(item), lid, source)
                ids.append(lid)
        return self._register(ids, placed, config=config or (parent.config if parent else ImageConfig()),
                              tag=tag, kind=kind, operation_id=operation_id, parent=parent,
                              image_uuid=image_uuid)

    def create_image_from_layer_dir(self, layer_dir: Path, **kwargs: Any) -> ImageRecord:
        """`create_image_from_layer_dirs` for one staged tree."""
        return self.create_image_from_layer_dirs([layer_dir], **kwargs)

    def add_layer(self, directory: Path, *, layer_id: str, source: str) -> str:
        """Store one shared layer under a chosen id (e.g. `sha256-<digest>`); a no-op when present.

        Reference it from an image within `gc(min_age)` seconds (or hold `pinned([layer_id])`).
        """
        if self.has_layer(layer_id):
            remove_tree(directory)
            return layer_id
        if os.path.lexists(self.layers_dir / layer_id):
            remove_tree(self.layers_dir / layer_id)  # a leftover of an interrupted add
        meta = self._place_layer(directory, layer_id, source)
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO layers (id, size, created, source) VALUES (?,?,?,?)",
                       (layer_id, meta.size, meta.created, meta.source))
        return layer_id

    def _register(self, ids: list[str], placed: dict[str, LayerMeta], *, config: ImageConfig,
                  tag: str | None, kind: int, operation_id: str | None, parent: ImageRecord | None,
                  image_uuid: str | None) -> ImageRecord:
        """One transaction: rows for the freshly `placed` layers and the image that references them."""
        layers = ids + (list(parent.layers) if parent else [])
        if not layers:
            raise BadRequest("an image needs at least one layer")
        with self._tx() as db:
            for lid, meta in placed.items():
                db.execute("INSERT INTO layers (id, size, created, source) VALUES (?,?,?,?)",
                           (lid, meta.size, meta.created, meta.source))
            sizes = self._sizes(db, layers)
            rec = ImageRecord(uuid=image_uuid or str(uuidlib.uuid4()), tag=tag,
                              parent=parent.uuid if parent else None, layers=layers, config=config,
                              operation_uuid=operation_id, created_at=time.time(),
                              size=sizes[layers[0]] if ids else 0, total_size=sum(sizes.values()), kind=kind)
            self._insert_image(db, rec)
        return rec

    def commit_upper(
        self,
        upper: Path,
        parent: ImageRecord,
        operation_id: str | None,
        max_layer_bytes: int | None = None,
        config_override: ImageConfig | None = None,
    ) -> ImageRecord | None:
        """Turn a sandbox's upper dir (already unmounted, work dir deleted) into a child image of `parent`.

        Returns None when the upper holds nothing ("unchanged": the result is the parent itself). Raises
        `LayerTooLarge` (the upper is left in place for the caller to delete) above `max_layer_bytes`.
        """
        if not any(os.scandir(upper)):
            return None
        if parent.depth >= MAX_LOWERS:
            # The child could never be mounted; callers should have run `squash_if_deep` long before.
            parent = self.squash(parent)
        lid = uuidlib.uuid4().hex
        if os.stat(upper).st_dev != os.stat(self.layers_dir).st_dev:
            # A run's upper is on its own size-limited filesystem (upperfs): copied in, not renamed.
            copied = self.tmp_dir / f"commit-{lid}"
            try:
                size = copy_layer(upper, copied, max_layer_bytes)
            except BaseException:
                remove_tree(copied)
                raise
            meta = self._place_layer(copied, lid, "run", size=size, durable=False)
        else:
            size = clean_and_measure(upper)
            if max_layer_bytes is not None and size > max_layer_bytes:
                raise LayerTooLarge(f"the run changed {size} bytes, above max_layer_bytes={max_layer_bytes}")
            meta = self._place_layer(upper, lid, "run", size=size, durable=False)  # see the module docstring
        return self._register([lid], {lid: meta}, config=config_override or parent.config, tag=None,
                              kind=KIND_INSTANCE, operation_id=operation_id, parent=parent, image_uuid=None)

    # ---- pins, squash, gc ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def pinned(self, layers: Iterable[str]) -> Iterator[None]:
        """Keep these layers from being deleted while a sandbox or reader uses them: from `gc()` of this
        process and, through a shared `flock` on each layer directory, from any other process's prune.

        Raises NotFound when one of them is being deleted (a prune got there first). Layers that do not
        exist yet (an import about to add them) are pinned in this process only."""
        ids = list(layers)
        with self._lock:
            self._pins.update(ids)
        fds: list[int] = []
        try:
            for lid in dict.fromkeys(ids):
                try:
                    fd = os.open(self.layers_dir / lid, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                fds.append(fd)
                _share_lock(fd, lid)
                try:
                    same = os.stat(self.layers_dir / lid).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    raise NotFound(f"layer {lid} was deleted (pruned) while it was being used")
            if fds:
                with self._lock:
                    trashed = [lid for (lid,) in self._db.execute(
                        f"SELECT id FROM layer_trash WHERE id IN ({','.join('?' * len(ids))})", ids)]
                if trashed:
                    raise NotFound(f"layer {trashed[0]} was deleted (pruned) while it was being used")
            yield
        finally:
            for fd in fds:
                os.close(fd)
            with self._lock:
                self._pins.subtract(ids)
                for lid in ids:
                    if self._pins[lid] <= 0:
                        del self._pins[lid]

    def squash_if_deep(self, image: ImageRecord, max_depth: int = MAX_DEPTH) -> ImageRecord | None:
        """Flatten a deep image into one layer (same UUID, same content); None when not deep.

        Blocking and slow (a full copy): run it with `asyncio.to_thread`. Children keep their old lists.
        """
        if image.depth <= max_depth:
            return None
        return self.squash(image)

    def squash(self, image: ImageRecord) -> ImageRecord:
        stage = self.staging_dir("squash")
        merged = self.staging_dir("squash-mnt")
        tree = stage / "tree"
        try:
            with self.pinned(image.layers):
                mount_overlay(self.layer_paths(image), None, None, merged, readonly=True)
                try:
                    # cp -a keeps owners, modes, xattrs, hardlinks, device nodes and fifos; the merged
                    # view already applied every whiteout and opaque dir, so the copy is a flat rootfs.
                    res = subprocess.run(["cp", "-a", "--preserve=all", "--no-target-directory",
                                          f"{merged}/", os.fspath(tree)], capture_output=True, text=True)
                finally:
                    unmount(merged)
                if res.returncode != 0:
                    raise OSError(errno.EIO, f"squash copy failed: {res.stderr.strip()}")
                lid = uuidlib.uuid4().hex
                meta = self._place_layer(tree, lid, "squash")
            with self._tx() as db:
                db.execute("INSERT INTO layers (id, size, created, source) VALUES (?,?,?,?)",
                           (lid, meta.size, meta.created, meta.source))
                cur = db.execute("UPDATE images SET layers = ?, total_size = ? WHERE uuid = ? AND layers = ?",
                                 (json.dumps([lid]), meta.size, image.uuid, json.dumps(image.layers)))
                if cur.rowcount != 1:
                    raise OSError(errno.ESTALE, f"image {image.uuid} changed during the squash")
        finally:
            remove_tree(stage)
            remove_tree(merged)
        return self.get(image.uuid)

    def referenced_layers(self) -> set[str]:
        with self._lock:
            rows = self._db.execute("SELECT layers FROM images").fetchall()
        return {lid for (layers,) in rows for lid in json.loads(layers)}

    def gc(self, min_age: float = 300.0) -> list[str]:
        """Delete registered layers that no image references, no one pins and are older than `min_age`
        seconds (a fresh `add_layer` is about to be referenced); returns the deleted ids.

        Images themselves are never deleted here, so tagged images and their ancestors keep every layer.
        Unregistered directories are left to `recover()` (they may be a commit in progress).
        """
        cutoff = time.time() - min_age
        with self._tx() as db:
            held = self._doom_unreferenced(db, created_before=cutoff)
        self._empty_trash(held)
        return [d.id for d in held]

    def prune(
        self, *, in_use: Callable[[], tuple[set[str], set[str]]] | None = None,
        created_before: float | None = None, dry_run: bool = False, only: str | None = None,
    ) -> Pruned:
        """Delete untagged images (created before `created_before`) and the layers no image then uses.

        Kept: an image with a tag, one `in_use()` names (it returns the input images and the ids of the
        queued or running operations, whose results are kept too; it is read inside the transaction, so
        no image can be committed or spawned from unseen), one whose own layer another process has
        pinned (a sandbox starting from it), and every ancestor of a kept image. `only` limits the
        deletion to that one image (refused, with the reason, when it must be kept). `dry_run` reports
        what would go and deletes nothing.
        """
        with self._tx() as db:
            images = [self._row(r) for r in db.execute(f"SELECT {_COLUMNS} FROM images")]
            by_uuid = {i.uuid: i for i in images}
            busy, busy_ops = in_use() if in_use is not None else (set(), set())
            busy |= {i.uuid for i in images if i.operation_uuid in busy_ops}
            locked: dict[str, int] = {}  # probe locks on own layers, held until the commit
            try:
                keep: set[str] = set()
                for image in images:
                    if (
                        image.tag is not None
                        or image.uuid in busy
                        or (not dry_run and self._pinned_elsewhere(image, locked))  # a dry run blocks no pin
                    ):
                        keep.add(image.uuid)
                    elif created_before is not None and image.created_at >= created_before and only is None:
                        keep.add(image.uuid)
                for uuid in list(keep):  # ancestors of a kept image stay (children name their parent)
                    parent = by_uuid[uuid].parent
                    while parent is not None and parent in by_uuid and parent not in keep:
                        keep.add(parent)
                        parent = by_uuid[parent].parent
                if only is not None:
                    target = by_uuid.get(only)
                    if target is None:
                        raise NotFound(f"image {only} not found")
                    _refuse_to_delete(target, by_uuid, keep, busy)
                doomed = [i for i in images if i.uuid not in keep and (only is None or i.uuid == only)]
                if dry_run:
                    freed = self._exclusive_layers(images, {i.uuid for i in doomed})
                    sizes = dict(db.execute("SELECT id, size FROM layers").fetchall())
                    return Pruned(images=doomed, layers=sorted(freed),
                                  bytes=sum(sizes.get(lid, 0) for lid in freed))
                for image in doomed:
                    db.execute("DELETE FROM images WHERE uuid = ?", (image.uuid,))
                held = self._doom_unreferenced(db, created_before=None, locked=locked,
                                               among=self._exclusive_layers(images, {i.uuid for i in doomed}))
            finally:
                for fd in locked.values():
                    os.close(fd)
        self._empty_trash(held)
        return Pruned(images=doomed, layers=[d.id for d in held], bytes=sum(d.size for d in held))

    def delete_image(
        self, image_uuid: str, *, in_use: Callable[[], tuple[set[str], set[str]]] | None = None
    ) -> Pruned:
        """Delete one image and free its layers; Conflict when it must be kept (tagged, in use, or the
        parent of another image)."""
        return self.prune(in_use=in_use, only=image_uuid)

    def _pinned_elsewhere(self, image: ImageRecord, locked: dict[str, int]) -> bool:
        """Whether another process has pinned the image's own layer (a sandbox of it is starting); the
        probe lock is kept in `locked` until the caller's transaction ends, so no pin can start meanwhile."""
        if not image.size or not image.layers or image.layers[0] in locked:
            return False
        try:
            fd = os.open(self.layers_dir / image.layers[0], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return True
        locked[image.layers[0]] = fd
        return False

    @staticmethod
    def _exclusive_layers(images: list[ImageRecord], doomed: set[str]) -> set[str]:
        """Layers of the doomed images that no other image uses."""
        kept = {lid for i in images if i.uuid not in doomed for lid in i.layers}
        return {lid for i in images if i.uuid in doomed for lid in i.layers} - kept

    def _doom_unreferenced(
        self, db: sqlite3.Connection, *, created_before: float | None, among: set[str] | None = None,
        locked: dict[str, int] | None = None,
    ) -> list[_Doomed]:
        """Inside a transaction: move unreferenced, unpinned layers (of `among`, else all) to the trash,
        each with its directory locked exclusively, for `_empty_trash` after the commit. A lock already
        held in `locked` is taken over (flock locks belong to the open file, not to the process)."""
        rows_layers = db.execute("SELECT layers FROM images")
        referenced = {lid for (layers,) in rows_layers for lid in json.loads(layers)}
        rows = db.execute("SELECT id, created, size FROM layers").fetchall()
        held: list[_Doomed] = []
        now = time.time()
        for lid, created, size in rows:
            if lid in referenced or lid in self._pins or (among is not None and lid not in among):
                continue
            if created_before is not None and created > created_before:
                continue
            fd = locked.pop(lid) if locked is not None and lid in locked else -1
            if fd < 0:
                try:
                    fd = os.open(self.layers_dir / lid, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except FileNotFoundError:
                    fd = -1  # registered without a directory (lost in a power failure): just forget it
                except BlockingIOError:
                    os.close(fd)
                    continue  # pinned by a sandbox or an import in another process: the next prune
            db.execute("DELETE FROM layers WHERE id = ?", (lid,))
            db.execute("INSERT OR REPLACE INTO layer_trash (id, since) VALUES (?, ?)", (lid, now))
            held.append(_Doomed(lid, fd, int(size)))
        return held

    def _empty_trash(self, held: list[_Doomed]) -> None:
        """After the commit: remove the trashed layers' directories, then their trash rows."""
        try:
            for doomed in held:
                remove_tree(self.layers_dir / doomed.id)
                with contextlib.suppress(FileNotFoundError):
                    (self.layers_dir / f"{doomed.id}.json").unlink()
                with self._lock:
                    self._db.execute("DELETE FROM layer_trash WHERE id = ?", (doomed.id,))
        finally:
            for doomed in held:
                if doomed.fd >= 0:
                    os.close(doomed.fd)

    def finish_trash(self) -> list[str]:
        """Finish deletions a crash interrupted (trash rows whose directories may still be there)."""
        with self._lock:
            pending = [r[0] for r in self._db.execute("SELECT id FROM layer_trash")]
        held: list[_Doomed] = []
        for lid in pending:
            fd = -1
            try:
                fd = os.open(self.layers_dir / lid, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except FileNotFoundError:
                pass
            except BlockingIOError:
                os.close(fd)
                continue  # its deleter is still at work
            held.append(_Doomed(lid, fd, 0))
        self._empty_trash(held)
        return [d.id for d in held]

    # ---- recovery and checks ----------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Start-up repair: unmount leftovers, empty tmp/ and sandboxes/, drop half-written layers."""
        actions: list[str] = []
        for point in mounts_under(self.home):
            unmount(point)
            actions.append(f"unmounted {point}")
        actions += [f"finished deleting layer {lid}" for lid in self.finish_trash()]
        for area in (self.tmp_dir, self.sandboxes_dir):
            for entry in area.iterdir():
                remove_tree(entry)
                if not entry.name.startswith(".spare-"):  # a previous engine's spares: nothing to report
                    actions.append(f"removed {entry}")
        with self._lock:
            known = {r[0] for r in self._db.execute("SELECT id FROM layers")}
        for entry in self.layers_dir.iterdir():
            # `<id>.json` sidecars are what older versions wrote beside each layer; rows hold it now.
            name = entry.name.removesuffix(".json")
            if name.startswith(".") or name not in known or entry.name != name:
                remove_tree(entry)
                if name not in known:
                    actions.append(f"removed unregistered layer {entry.name}")
        for lid in sorted(known):
            if not (self.layers_dir / lid).is_dir():
                # Cannot be repaired (the content is gone); `check()` keeps reporting it.
                actions.append(f"layer {lid} is registered but its directory is missing (lost in a power "
                               "failure?): images that use it cannot run")
        return actions

    def check(self) -> list[str]:
        """Consistency problems of the store (empty list = healthy)."""
        problems: list[str] = []
        with self._lock:
            status = self._db.execute("PRAGMA integrity_check").fetchone()[0]
            layer_rows = {r[0]: r[1] for r in self._db.execute("SELECT id, size FROM layers")}
            images = [self._row(r) for r in self._db.execute(f"SELECT {_COLUMNS} FROM images")]
            trash = {r[0] for r in self._db.execute("SELECT id FROM layer_trash")}
        if status != "ok":
            problems.append(f"database integrity: {status}")
        uuids = {i.uuid for i in images}
        for img in images:
            if img.parent is not None and img.parent not in uuids:
                problems.append(f"image {img.uuid}: parent {img.parent} missing")
            if not 1 <= img.depth <= MAX_LOWERS:
                problems.append(f"image {img.uuid}: {img.depth} layers (allowed 1..{MAX_LOWERS})")
            for lid in img.layers:
                if lid not in layer_rows:
                    problems.append(f"image {img.uuid}: layer {lid} not registered")
                elif not (self.layers_dir / lid).is_dir():
                    problems.append(f"image {img.uuid}: layer directory {lid} missing")
        for lid in layer_rows:
            if not (self.layers_dir / lid).is_dir():
                problems.append(f"layer {lid}: directory missing")
        for entry in self.layers_dir.iterdir():
            # a layer in the trash is being (or was, before a crash) deleted: recover() or a prune ends it
            if entry.is_dir() and entry.name not in layer_rows and entry.name not in trash:
                problems.append(f"layer directory {entry.name}: not registered (run recover)")
        for point in mounts_under(self.home):
            problems.append(f"stray mount {point}")
        leftovers = sorted(p.name for p in self.tmp_dir.iterdir())
        if leftovers:
            problems.append(f"tmp/ holds {len(leftovers)} leftover entries (run recover)")
        return problems

    list = list_images  # the brief's name; bound last so annotations above still mean the builtin


def check_main(argv: Sequence[str] | None = None) -> int:
    """`contree-mcp engine check --home DIR`: print the store's problems; exit 1 when there are any."""
    parser = argparse.ArgumentParser(prog="contree-mcp engine check", description=check_main.__doc__)
    parser.add_argument("--home", type=Path, default=default_home(),
                        help="engine state directory (default: $CONTREE_ENGINE_HOME, else "
                        "$XDG_DATA_HOME/contree-mcp)")
    parser.add_argument("--repair", action="store_true", help="run start-up recovery first (engine stopped)")
    args = parser.parse_args(argv)
    if not (args.home / "images.db").exists():
        print(f"no engine store at {args.home}", file=sys.stderr)
        return 1
    store = Store(args.home)
    try:
        if args.repair:
            for action in store.recover():
                print(f"repaired: {action}")
        problems = store.check()
    finally:
        store.close()
    for p in problems:
        print(p)
    if not problems:
        print(f"store at {args.home}: ok")
    return 1 if problems else 0


def default_home() -> Path:
    # One rule for every entry point; CONTREE_HOME is the Contree CLI's auth.ini directory, not this.
    from contree.config import engine_home

    return engine_home(os.environ)
