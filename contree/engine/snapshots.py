"""Snapshots: a run's root filesystem, prepared from an image, committed into a new image, released.

The shape of containerd's Snapshotter (`Prepare` → mounts, `Commit` → image, `Remove`), over the store's
layers and one run's layer filesystem:

* `snapshot(key, max_layer_bytes, limit)` names the active snapshot of run `key`: `<sandboxes>/<key>`,
  with `upper/`, `work/` and `rootfs/` (nothing happens yet).
* `prepare(snap, image, files=, cwd=, uid=, gid=)` mounts it: a spare scratch dir renamed into place, the
  run's layer filesystem on it (`upperfs`: a tmpfs of `max_layer_bytes`, sealed once overlay made its
  work entries), the image's layers as overlay lowers — through idmapped mounts when sandboxes run in a
  user namespace — then the injected files and the cwd written through the merged dir, and, with a user
  namespace, what was written shifted to the sandbox's ids (`IdMap.shift_in`).
* `full(snap)`: the run's error once its layer filesystem is full (`statvfs`, O(1)).
* `commit(snap, image, operation_id, config)` → the child image, or None when nothing changed: unmount,
  shift the upper back to container ids (`IdMap.shift_out`: layers on disk always hold container ids),
  copy it into the store (`Store.commit_upper`), a config-only image when only the config changed, and
  an image deeper than `squash_depth` flattened.
* `release(snap)`: unmount the overlay and the layer filesystem, remove the dir, make a spare for the
  next run.

All of it blocks (mounts, copies): callers run it in a thread, or inline where it is microseconds.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from contree import api
from contree.engine import spawn
from contree.engine.runtime.userns import IdMap
from contree.engine.spawn import SpawnFailed
from contree.engine.storage import upperfs
from contree.engine.storage.blobs import BlobStore
from contree.engine.storage.overlay import mount_overlay, unmount
from contree.engine.storage.store import MAX_DEPTH, ImageConfig, ImageRecord, Store, remove_tree
from contree.engine.storage.upperfs import LayerBudget, LayerTooLarge
from contree.errors import BadRequest, NotFound
from contree.openat2 import RESOLVE_IN_ROOT, openat2

log = logging.getLogger(__name__)

SPARE_SCRATCH_DIRS = 2  # empty scratch dirs kept ready (Store.scratch_dir): runs waiting beyond that mkdir


@dataclass(frozen=True)
class Snapshot:
    """The active snapshot of one run: its writable root filesystem under `<sandboxes>/<key>`."""

    key: str
    path: Path
    budget: LayerBudget
    limit: str  # how errors name the layer limit: "max_layer_bytes=N …"

    @property
    def rootfs(self) -> Path:
        """The merged dir the sandbox runs on."""
        return self.path / "rootfs"

    @property
    def upper(self) -> Path:
        return self.path / "upper"

    @property
    def work(self) -> Path:
        return self.path / "work"


class Snapshotter:
    """Prepares, commits and releases the snapshots of runs on one store."""

    def __init__(self, store: Store, blobs: BlobStore, idmap: IdMap | None, *,
                 squash_depth: int = MAX_DEPTH) -> None:
        self.store = store
        self.blobs = blobs
        # Set when sandboxes run in a user namespace: lowers are mounted idmapped, writes are shifted.
        self.idmap = idmap
        self.squash_depth = squash_depth

    def snapshot(self, key: str, max_layer_bytes: int, limit: str) -> Snapshot:
        return Snapshot(key=key, path=self.store.sandboxes_dir / key,
                        budget=LayerBudget.for_limit(max_layer_bytes), limit=limit)

    def prepare(self, snap: Snapshot, image: ImageRecord, *, files: Mapping[str, api.InjectedFile],
                cwd: str, uid: int, gid: int) -> None:
        """Mount `image` for the run, with `files` injected and `cwd` created (owned by uid:gid)."""
        self.store.scratch_dir(snap.key)
        upperfs.mount(snap.path, snap.budget)  # over the scratch dir's own subdirs
        if self.idmap is None:
            mount_overlay(self.store.layer_paths(image), snap.upper, snap.work, snap.rootfs)
        else:
            with self.idmap.lowers(self.store.layer_paths(image)) as lowers:
                mount_overlay(lowers, snap.upper, snap.work, snap.rootfs)
        upperfs.seal(snap.path, snap.budget)
        try:
            for path, entry in files.items():
                blob = self.blobs.path_for(entry.uuid)
                if blob is None:
                    raise NotFound(f"file {entry.uuid} for {path} not found")
                self.blobs.inject_file(snap.rootfs, spawn.check_file_path(path), blob,
                                       mode=spawn.parse_mode(entry.mode), uid=entry.uid, gid=entry.gid)
            make_dirs(snap.rootfs, cwd, uid=uid, gid=gid)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise LayerTooLarge(f"the injected files and cwd do not fit in {snap.limit}") from None
        if self.idmap is not None:
            # what was written above, as the sandbox's root sees it
            self.idmap.shift_in(snap.upper, snap.rootfs)

    def full(self, snap: Snapshot) -> str | None:
        """The run's error once its layer filesystem is full, else None."""
        try:
            used = upperfs.usage(snap.path, snap.budget)
        except OSError:
            return None
        return upperfs.over_limit(used, snap.budget, snap.limit)

    def commit(self, snap: Snapshot, image: ImageRecord, operation_id: str,
               config: ImageConfig) -> ImageRecord | None:
        """The run's changes as a child image of `image` with `config`; None when nothing changed."""
        unmount(snap.rootfs)
        if self.idmap is not None:
            self.idmap.shift_out(snap.upper)  # layers hold container ids, never the host range
        # work/ stays behind with the rest of the sandbox dir; only upper/ becomes the layer.
        changed_config = config if config != image.config else None
        child = self.store.commit_upper(
            snap.upper, image, operation_id, snap.budget.max_bytes, changed_config
        )
        if child is None and changed_config is not None:
            child = self.store.create_image_from_layer_dirs(
                [], config=config, kind=0, source="run", operation_id=operation_id, parent=image
            )
        if child is not None and child.depth > self.squash_depth:
            # Each run adds a layer and overlay takes at most 500: flatten now (a full copy, once every
            # `squash_depth` runs) so the next run on this image mounts one layer.
            try:
                child = self.store.squash_if_deep(child, self.squash_depth) or child
            except OSError:
                log.exception("squashing %s failed; it keeps %d layers", child.uuid, child.depth)
        return child

    def release(self, snap: Snapshot) -> None:
        """Unmount and remove whatever `prepare` made (also after a partial prepare, or none)."""
        for point in (snap.rootfs, snap.path):  # the overlay, then its upper's tmpfs
            with contextlib.suppress(OSError):
                unmount(point)
        try:
            remove_tree(snap.path)
        except OSError:
            log.exception("could not remove %s", snap.path)
        with contextlib.suppress(OSError):
            self.store.make_spare_scratch(SPARE_SCRATCH_DIRS)  # for the next run, while nobody waits


# ---------------------------------------------------------------------- inside a mounted rootfs


def make_dirs(rootfs: Path, path: str, *, uid: int, gid: int) -> None:
    """mkdir -p `path` inside `rootfs` without ever following a symlink out of it."""
    parts = [p for p in path.split("/") if p and p != "."]
    fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            if part == "..":
                raise BadRequest(f"cwd {path!r} must not contain '..'")
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
                os.chown(part, uid, gid, dir_fd=fd, follow_symlinks=False)
            except FileExistsError:
                pass
            nxt = openat2(fd, part, os.O_RDONLY | os.O_DIRECTORY, RESOLVE_IN_ROOT)
            os.close(fd)
            fd = nxt
    except NotADirectoryError:
        raise SpawnFailed(f"cwd {path!r} is not a directory in the image") from None
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise SpawnFailed(f"cwd {path!r} is not a directory in the image") from None
        raise
    finally:
        os.close(fd)


def find_executable(rootfs: Path, command: str, path_env: str, cwd: str) -> bool:
    """Whether `command` names an executable file inside `rootfs` (as execvp would find it there).

    Every lookup resolves symlinks inside the image root, so `/bin/sh -> /bin/busybox` works and
    nothing can point the check at the host.
    """
    if "/" in command:
        candidates = [command if command.startswith("/") else posixpath.join(cwd, command)]
    else:
        candidates = [posixpath.join(d or ".", command) for d in path_env.split(":")]
    rootfd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for candidate in candidates:
            try:
                fd = openat2(rootfd, candidate.lstrip("/") or ".", os.O_PATH, RESOLVE_IN_ROOT)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
                return True
        return False
    finally:
        os.close(rootfd)
