"""One sync: scan, diff against the local cache, read only what changed, transfer only what the backend
lacks, and build the directory-state manifest. Returns the manifest and a report."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec

from contree.sync.chunker import FileChangedError, FileDigest, digest_file
from contree.sync.excludes import Excludes
from contree.sync.manifest import Manifest, ManifestEntry, build_manifest, mode_string
from contree.sync.scanner import Found, ScanResult, SyncError, scan
from contree.sync.state import BlobRef, Known, Snapshot, StateCache, StatKey
from contree.sync.transfer import Transfer

ProgressCallback = Callable[[int, int, str], Awaitable[None]]
DEFAULT_CONCURRENCY = 4
_SAVE_EVERY = 16384  # read files per cache transaction while reading: a large sync keeps what it learnt
_PROGRESS_EVERY = 0.25
# Blobs a sync reuses without reading are re-confirmed with the target this often (as 0.5.0's 24 h
# revalidation); in between, run re-uploads a vanished blob on demand (COMPAT §15.38).
REVALIDATE_AFTER = 24 * 3600.0
_BATCH_FILES = 64
_BATCH_BYTES = 4 * 1024 * 1024  # seconds between progress callbacks (the last one is always sent)


class SyncReport(msgspec.Struct, kw_only=True):
    files_scanned: int = 0
    files_changed: int = 0  # stat changed or unknown: content read and hashed
    files_uploaded: int = 0  # content the backend lacked (renames and duplicates never count)
    files_removed: int = 0  # previously synced paths that are gone
    bytes_hashed: int = 0
    bytes_sent: int = 0
    elapsed_ms: float = 0.0
    skipped: list[str] = msgspec.field(default_factory=list)


@dataclass
class _Plan:
    files: list[Found]
    known: dict[str, tuple[int, str]]  # host path → (size, xxh128) of content the target holds
    to_read: list[Found]
    renamed: list[tuple[Found, FileDigest]]
    blobs: dict[str, BlobRef]
    removed: list[str]
    skipped: list[str]
    cached: dict[str, Known]
    from_snapshot: bool
    checked_at: float


def _plan(
    source: str, scanned: ScanResult, snap: Snapshot | None, cache: StateCache, target: str, need_sha: bool
) -> _Plan:
    if snap is not None:
        cached, blobs = snap.files, snap.blobs
    else:
        cached = cache.files_under(scanned.root if os.path.isdir(source) else source)
        blobs = cache.blobs(target)
    known: dict[str, tuple[int, str]] = {}
    to_read: list[Found] = []
    renamed: list[tuple[Found, FileDigest]] = []
    unseen: list[Found] = []
    get = cached.get
    for found in scanned.files:
        hit = get(found.path)
        # Unchanged stat and content the target already holds: neither a read nor a backend call.
        if hit is not None and hit[:4] == found.stat and hit[4] in blobs and (hit[5] or not need_sha):
            known[found.path] = (hit[0], hit[4])
        elif hit is None:
            unseen.append(found)
        else:
            to_read.append(found)
    if unseen:
        # Same inode, size and mtime under a new path: a rename, no read needed.
        moves = cache.by_inodes(f.stat for f in unseen)
        for found in unseen:
            size, mtime_ns, inode, _ = found.stat
            moved = moves.get((inode, size, mtime_ns))
            if moved is not None and moved.xxh128 in blobs and (moved.sha256 or not need_sha):
                known[found.path] = (moved.size, moved.xxh128)
                renamed.append((found, moved))
            else:
                to_read.append(found)
    removed: list[str] = []
    if os.path.isdir(source):
        seen = {f.path for f in scanned.files}
        removed = [p for p in cached if p not in seen]
    return _Plan(
        scanned.files, known, to_read, renamed, blobs, removed, scanned.skipped, cached, snap is not None,
        snap.checked_at if snap is not None else 0.0,
    )


def _read(found: Found, need_sha: bool) -> FileDigest:
    try:
        return digest_file(found.path, with_sha256=need_sha, size_hint=found.stat[0])
    except FileChangedError:
        raise
    except OSError as exc:
        raise SyncError(f"cannot read {found.path}: {exc.strerror or exc}") from None


_Read = list[tuple[Found, FileDigest]]


def _read_all(
    batches: list[list[Found]],
    need_sha: bool,
    post: Callable[[_Read | BaseException], object],
    stop: threading.Event,
) -> None:
    """The reading thread: every batch in turn, each result posted to the event loop at once, so reading
    never waits for the loop or for transfers. One thread, because hashing holds the GIL (measured:
    two or four reading threads were slower than one on 2 cores)."""
    for batch in batches:
        if stop.is_set():
            return
        try:
            read = [(found, _read(found, need_sha)) for found in batch]
        except BaseException as exc:  # handed to the loop, which raises it
            post(exc)
            return
        post(read)


def _ignore_result(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a reader that ends after its sync gave up is not an error


def _batches(files: list[Found]) -> list[list[Found]]:
    out: list[list[Found]] = []
    current: list[Found] = []
    size = 0
    for found in files:
        current.append(found)
        size += found.stat[0]
        if len(current) >= _BATCH_FILES or size >= _BATCH_BYTES:
            out.append(current)
            current, size = [], 0
    if current:
        out.append(current)
    return out


async def sync_tree(
    source: str,
    destination: str,
    *,
    cache: StateCache,
    transfer: Transfer,
    excludes: Excludes | None = None,
    gitignore: bool = False,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: ProgressCallback | None = None,
    uid: int = 0,
    gid: int = 0,
) -> tuple[Manifest, SyncReport]:
    """Sync `source` (a real absolute path: directory or regular file) to `destination` (absolute path in
    the sandbox). Raises SyncError for expected failures (unreadable file, nothing to sync)."""
    started = time.perf_counter()
    need_sha = transfer.needs_sha256
    # The walk (syscalls) and the snapshot load (SQLite) overlap.
    scanned, snap = await asyncio.gather(
        asyncio.to_thread(scan, source, excludes or Excludes(), gitignore=gitignore),
        asyncio.to_thread(cache.snapshot, source, transfer.target),
    )
    plan = await asyncio.to_thread(_plan, source, scanned, snap, cache, transfer.target, need_sha)
    if not plan.files:
        shown = "; ".join(plan.skipped[:5]) + ("; …" if len(plan.skipped) > 5 else "")
        why = f" (skipped: {shown})" if shown else ""
        raise SyncError(f"Nothing to sync in {source}: every file is excluded or not a regular file{why}")
    report = SyncReport(
        files_scanned=len(plan.files), files_removed=len(plan.removed), skipped=plan.skipped
    )
    known = plan.known
    checked_at = plan.checked_at
    if not known or time.time() - checked_at > REVALIDATE_AFTER:
        if known:
            await _revalidate(plan, transfer, cache)
        checked_at = time.time()  # every blob this sync uses is now confirmed or freshly sent
    sem = asyncio.Semaphore(max(1, concurrency))  # transfers in flight
    claimed: set[str] = set()  # contents some batch is already sending (duplicates send nothing)
    new_blobs: list[tuple[str, BlobRef]] = []
    fresh: list[tuple[Found, FileDigest]] = list(plan.renamed)
    work = plan.to_read
    total, done, last_note = len(work), 0, 0.0
    failures: list[BaseException] = []

    async def send(items: list[tuple[str, FileDigest]], count: int) -> None:
        nonlocal done, last_note
        try:
            if items:
                for (_, digest), sent in zip(items, await transfer.ensure_batch(items), strict=True):
                    if sent.bytes_sent or digest.size == 0:
                        report.files_uploaded += 1
                    report.bytes_sent += sent.bytes_sent
                    new_blobs.append((digest.xxh128, BlobRef(sent.sha256, sent.uuid)))
        finally:
            sem.release()
        done += count
        now = time.perf_counter()
        if progress is not None and (done == total or now - last_note >= _PROGRESS_EVERY):
            last_note = now
            await progress(done, total, f"{done}/{total} files, {report.bytes_sent} bytes sent")

    def finished(task: asyncio.Task[None]) -> None:
        sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]

    loop = asyncio.get_running_loop()
    results: asyncio.Queue[_Read | BaseException] = asyncio.Queue()
    stop = threading.Event()
    batches = _batches(work)
    sending: set[asyncio.Task[None]] = set()
    reading = loop.run_in_executor(
        None, _read_all, batches, need_sha, lambda item: loop.call_soon_threadsafe(results.put_nowait, item),
        stop,
    )
    # Read files are remembered while reading goes on (SQLite runs without the GIL), so what was read
    # stays learnt even when a later file fails.
    unsaved: list[tuple[str, StatKey, FileDigest]] = [(f.path, f.stat, d) for f, d in plan.renamed]
    saves: list[asyncio.Future[None]] = []
    try:
        for _ in batches:
            item = await results.get()
            if isinstance(item, BaseException):
                raise item
            if failures:
                raise failures[0]
            items: list[tuple[str, FileDigest]] = []
            for found, digest in item:
                known[found.path] = (digest.size, digest.xxh128)
                fresh.append((found, digest))
                report.files_changed += 1
                report.bytes_hashed += digest.size
                unsaved.append((found.path, found.stat, digest))
                if digest.xxh128 not in plan.blobs and digest.xxh128 not in claimed:
                    claimed.add(digest.xxh128)
                    items.append((found.path, digest))
            if len(unsaved) >= _SAVE_EVERY:
                saves.append(loop.run_in_executor(None, cache.remember, unsaved))
                unsaved = []
            await sem.acquire()
            task = asyncio.create_task(send(items, len(item)))
            sending.add(task)
            task.add_done_callback(finished)
        await reading
        await asyncio.gather(*list(sending), *saves)
    except BaseException:
        stop.set()
        for task in list(sending):  # a failed or cancelled sync abandons its transfers in flight
            task.cancel()
        # The reading thread is not waited for: it stops at the next batch, but it may be stuck in a
        # syscall (a hung network filesystem), and a cancelled sync must answer at once.
        reading.add_done_callback(_ignore_result)
        # Whatever was learnt stays learnt, even when one file failed.
        await asyncio.gather(*list(sending), *saves, return_exceptions=True)
        await asyncio.to_thread(cache.save, unsaved, transfer.target, list(new_blobs), plan.removed)
        raise
    held = plan.blobs
    held.update(new_blobs)
    unchanged = (
        plan.from_snapshot and checked_at == plan.checked_at and not fresh and not plan.removed
        and len(plan.cached) == len(known)
    )
    snapshot = None
    if not unchanged:
        files: dict[str, Known] = {}
        used: dict[str, BlobRef] = {}
        for found in plan.files:
            xxh = known[found.path][1]
            files[found.path] = (*found.stat, xxh, held[xxh].sha256)
            used[xxh] = held[xxh]
        snapshot = Snapshot(files, used, checked_at)
    # SQLite writes run in a thread while this one builds the manifest.
    saving = loop.run_in_executor(  # starts now, not at the next await
        None, _finish, cache, source, transfer.target, unsaved, new_blobs, plan.removed, snapshot
    )
    try:
        manifest = _manifest(plan, known, held, destination, uid, gid)
    finally:
        await saving
    report.elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
    return manifest, report


def _manifest(
    plan: _Plan, known: dict[str, tuple[int, str]], held: dict[str, BlobRef], destination: str, uid: int,
    gid: int,
) -> Manifest:
    base = destination.rstrip("/") + "/"
    modes: dict[int, str] = {}
    entries = []
    for rel, path, st in plan.files:
        size, xxh = known[path]
        ref = held[xxh]
        mode = modes.get(st[3])
        if mode is None:
            mode = modes[st[3]] = mode_string(st[3])
        entries.append(ManifestEntry(base + rel, ref.sha256, ref.uuid, size, mode, uid, gid))
    return build_manifest(entries)


async def _revalidate(plan: _Plan, transfer: Transfer, cache: StateCache) -> None:
    """Ask the target whether the blobs reused without reading still exist; files whose blob vanished
    are read and sent again in this sync."""
    used = {xxh: (plan.blobs[xxh].sha256, plan.blobs[xxh].uuid) for _, xxh in plan.known.values()}
    gone = await transfer.missing(used)
    if not gone:
        return
    for xxh in gone:
        del plan.blobs[xxh]
        await asyncio.to_thread(cache.forget_blob, transfer.target, xxh)
    stale = [f for f in plan.files if f.path in plan.known and plan.known[f.path][1] in gone]
    for found in stale:
        del plan.known[found.path]
    plan.to_read.extend(stale)
    # A renamed file whose content vanished is read like any other: drop its shortcut.
    plan.renamed[:] = [(f, d) for f, d in plan.renamed if f.path in plan.known]


def _finish(
    cache: StateCache,
    source: str,
    target: str,
    rows: list[tuple[str, StatKey, FileDigest]],
    blobs: list[tuple[str, BlobRef]],
    removed: list[str],
    snapshot: Snapshot | None,
) -> None:
    cache.save(rows, target, blobs, removed)
    if snapshot is None:
        cache.touch_snapshot(source, target)
    else:
        cache.save_snapshot(source, target, snapshot)
