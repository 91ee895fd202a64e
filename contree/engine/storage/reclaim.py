"""Pins and deletion: which layers are in use, in any process, and deleting what nobody needs.

Deleting (prune, `delete_image`, `gc`): a layer is deleted only while its directory is locked
exclusively (`flock`); every user of a layer (`pinned`: a running sandbox, an import, a grep) holds a
shared lock on it, in any process, so a layer in use is never deleted and a run never starts on one being
deleted. The image and layer rows go in one transaction that also lists the layers in `layer_trash`; the
directories are removed after the commit. A crash in between leaves trash that `recover()` (or the next
prune) finishes, and `check()` accepts.

`Reclaimer` is the store's deleting half (`Store` extends it with the layer files' creation); it works
on the records (`ImageDB`) and the layer directories under `layers_dir`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import msgspec

from contree.engine.storage.imagedb import IMAGE_COLUMNS, ImageDB, ImageRecord
from contree.engine.storage.layertree import remove_tree
from contree.errors import Conflict, NotFound


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


class Reclaimer(ImageDB):
    """Pins layers for their users and deletes images and layers nobody uses (gc, prune)."""

    def __init__(self, path: Path, layers_dir: Path) -> None:
        super().__init__(path)
        self.layers_dir = layers_dir
        self._pins: Counter[str] = Counter()  # layers pinned in this process (a count per user)

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
            images = [self._row(r) for r in db.execute(f"SELECT {IMAGE_COLUMNS} FROM images")]
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
