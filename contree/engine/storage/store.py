"""The image store: immutable overlay layers plus their records (RUNTIME §7, §15.1).

`Store` keeps the records (imagedb.py: `ImageDB`, every query about them) and the layer trees on disk
(layertree.py: measure, clean, remove) consistent: images from staged trees, a run's commit, squashing
deep images, start-up recovery and checks. Pins and deleting (gc, prune, `delete_image`) are its base
class's, `Reclaimer` (reclaim.py).

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

Power loss: SQLite runs WAL with synchronous=NORMAL (always consistent; the newest transactions may be
lost). Imports and squashes fsync `layers/` before their row is written; a run's commit does not (it is
on the latency path of every `disposable=false` run), so in the rare case where the filesystem persists
the row but not the rename, `check()` and `recover()` name the layer whose directory is missing.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
import uuid as uuidlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from contree.engine.storage.home import private_dir, private_file
from contree.engine.storage.imagedb import (
    IMAGE_COLUMNS,
    KIND_IMPORTED,
    KIND_INSTANCE,
    ImageConfig,
    ImageRecord,
    LayerMeta,
)
from contree.engine.storage.layertree import clean_and_measure, fsync_dir, remove_tree, tree_size
from contree.engine.storage.overlay import MAX_LOWERS, mount_overlay, mounts_under, unmount
from contree.engine.storage.reclaim import Pruned, Reclaimer
from contree.engine.storage.resolver import Resolver
from contree.engine.storage.upperfs import LayerTooLarge, copy_layer
from contree.errors import BadRequest, NotFound

# Re-exported: the store's callers name its records and helpers through it.
__all__ = [
    "KIND_IMPORTED", "KIND_INSTANCE", "MAX_DEPTH", "ImageConfig", "ImageRecord", "LayerTooLarge", "Pruned",
    "Store", "remove_tree",
]

MAX_DEPTH = 64  # squash beyond this (RUNTIME §6.2); the kernel's own limit is 500
_RESOLVER_CACHE = 64


def _make_scratch(path: Path) -> None:
    """A run's scratch dir: `path` with empty upper/, work/ and rootfs/."""
    for sub in ("upper", "work", "rootfs"):
        (path / sub).mkdir(parents=True)


class Store(Reclaimer):
    """Images and layers of one engine home. Thread-safe (one SQLite connection behind a lock)."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.layers_dir = self.home / "layers"
        self.tmp_dir = self.home / "tmp"
        self.blobs_dir = self.home / "blobs"
        self.sandboxes_dir = self.home / "sandboxes"
        for d in (self.home, self.layers_dir, self.tmp_dir, self.blobs_dir, self.sandboxes_dir):
            private_dir(d)  # layers keep setuid files and device nodes: never reachable by other users
        private_file(self.home / "images.db")
        super().__init__(self.home / "images.db", self.layers_dir)
        # Open layer fds per layer list: what makes a read from a deep image cost microseconds. An evicted
        # resolver closes its fds when its last user drops it.
        self._resolvers: OrderedDict[tuple[str, ...], Resolver] = OrderedDict()
        self._spares: list[Path] = []  # empty scratch dirs made ahead, see `scratch_dir`

    def close(self) -> None:
        with self._lock:
            self._resolvers.clear()
            super().close()

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

    # ---- creating images ---------------------------------------------------------------------------------

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

    # ---- squash ------------------------------------------------------------------------------------------

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
            images = [self._row(r) for r in self._db.execute(f"SELECT {IMAGE_COLUMNS} FROM images")]
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

