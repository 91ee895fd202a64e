"""Reclaiming disk in an engine home, and what the home holds.

`prune(home, …)` deletes what nothing needs any more: untagged images (only when asked), the layers no
image uses, the output spills of runs that ended long enough ago, and uploads and sync chunks as old.
It runs beside a live engine on the same home (another process) without harming it: the image store
decides under its write lock and never deletes a layer a sandbox, an import or a reader has pinned
(`Store.pinned`, a shared `flock`); queued and running operations are read from the operation log inside
that transaction. A SIGKILL at any point leaves a store `engine check` accepts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from contree.backend import DiskUsage
from contree.engine.oplog import OperationLog
from contree.engine.storage.blobs import BlobStore
from contree.engine.storage.store import Store

DEFAULT_KEEP = 7 * 86400.0  # seconds: output spills, uploads and chunks younger than this stay
SAFE_AGE = 60.0  # seconds: uploads and chunks younger than this always stay (a sync may be using them)
LAYER_MIN_AGE = 300.0  # seconds: an unreferenced layer this fresh may be an import about to register it


class PruneReport(msgspec.Struct, kw_only=True):
    dry_run: bool
    images: list[str]  # UUIDs of the deleted untagged images
    layers: int
    layer_bytes: int
    outputs: int  # runs whose output spill was deleted
    output_bytes: int
    uploads: int
    upload_bytes: int
    chunks: int
    chunk_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.layer_bytes + self.output_bytes + self.upload_bytes + self.chunk_bytes


def prune(
    home: Path, *, older_than: float | None = None, untagged: bool = False, dry_run: bool = False
) -> PruneReport:
    """Delete untagged images older than `older_than` seconds (any age when None; only with `untagged`),
    unused layers, and output spills, uploads and chunks older than `older_than` (default 7 days)."""
    now = time.time()
    keep_for = DEFAULT_KEEP if older_than is None else older_than
    store = Store(home)
    oplog = OperationLog(home)
    blobs = BlobStore(home / "blobs")
    try:
        images: list[str] = []
        layer_count = layer_bytes = 0
        if untagged:
            before = None if older_than is None else now - older_than
            pruned = store.prune(in_use=oplog.busy, created_before=before, dry_run=dry_run)
            images = [i.uuid for i in pruned.images]
            layer_count, layer_bytes = len(pruned.layers), pruned.bytes
        if not dry_run:
            store.finish_trash()
            orphans = store.gc(min_age=LAYER_MIN_AGE)
            layer_count += len(orphans)
        outputs, output_bytes = oplog.prune_output(finished_before=now - keep_for, dry_run=dry_run)
        uploads = blobs.prune(
            uploaded_before=now - max(keep_for, SAFE_AGE), keep=_queued_files(oplog), dry_run=dry_run
        )
        return PruneReport(
            dry_run=dry_run,
            images=images,
            layers=layer_count,
            layer_bytes=layer_bytes,
            outputs=outputs,
            output_bytes=output_bytes,
            uploads=len(uploads.sha256s),
            upload_bytes=uploads.bytes,
            chunks=uploads.chunks,
            chunk_bytes=uploads.chunk_bytes,
        )
    finally:
        blobs.close()
        oplog.close()
        store.close()


def _queued_files(oplog: OperationLog) -> set[str]:
    """File uuids that queued or running runs still have to inject."""
    _, busy = oplog.busy()
    found: set[str] = set()
    for op_uuid in busy:
        files = oplog.get(op_uuid).metadata.get("files") or {}
        found |= {str(f.get("uuid")) for f in files.values() if isinstance(f, dict)}
    return found


def disk_usage(
    home: Path, store: Store, in_use: Callable[[], tuple[set[str], set[str]]] | None = None
) -> DiskUsage:
    """Sizes of what `home` holds (walks output/, blobs/ and operations/: call it off the event loop)."""
    images = store.all_images()
    layer_sizes = store.layer_sizes()
    reclaim = store.prune(in_use=in_use, dry_run=True)
    output = _tree_bytes(home / "output")
    uploads = _tree_bytes(home / "blobs" / "sha256")
    chunks = _tree_bytes(home / "blobs" / "chunks")
    total = _tree_bytes(home, skip={home / "layers"}) + sum(layer_sizes.values())
    known = output + uploads + chunks + sum(layer_sizes.values())
    return DiskUsage(
        home=str(home),
        total_bytes=total,
        images=len(images),
        tagged_images=sum(1 for i in images if i.tag is not None),
        layers=len(layer_sizes),
        layer_bytes=sum(layer_sizes.values()),
        reclaimable_images=len(reclaim.images),
        reclaimable_bytes=reclaim.bytes,
        output_bytes=output,
        uploads_bytes=uploads,
        chunks_bytes=chunks,
        other_bytes=max(0, total - known),
    )


def _tree_bytes(root: Path, skip: set[Path] | None = None) -> int:
    """Bytes of the regular files below `root` (not following symlinks, not into `skip`)."""
    total = 0
    stack = [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        if skip is None or Path(entry.path) not in skip:
                            stack.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
        except (FileNotFoundError, NotADirectoryError):
            continue
    return total
