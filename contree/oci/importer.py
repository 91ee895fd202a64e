"""Import an image into the store: resolve the source, fetch and extract the missing layers concurrently,
then register one image whose layers are shared by diff id.

Idempotent: the image UUID is derived from the manifest digest (the config digest for docker archives),
so re-importing an unchanged image returns the same UUID without downloading anything, and only layers
the store lacks (`sha256-<diff id>`) are fetched. Nothing is half-stored: layers are extracted under the
store's `tmp/`, checked against the config's diff ids, and moved into the store only once every layer is
ready; any failure or cancellation removes the staging directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from contree import api
from contree.engine.storage.store import KIND_IMPORTED, ImageConfig, ImageRecord, Store, remove_tree
from contree.errors import BadRequest, Forbidden, Unprocessable
from contree.oci.auth import Credentials, TokenCache
from contree.oci.extract import ExtractLimits, LayerStats, extract_layer
from contree.oci.manifest import ImageDefaults, Platform, decode_config, defaults_of
from contree.oci.reference import LocalSource, Reference, parse_source
from contree.oci.registry import Timeouts
from contree.oci.sources import (
    BlobSource,
    DockerArchiveSource,
    LayerRef,
    LocalLayoutSource,
    RegistrySource,
    ResolvedImage,
)

# Image UUIDs of imports are uuid5(namespace, manifest digest): the same manifest → the same UUID.
IMPORT_NAMESPACE = uuidlib.UUID("9d7c1f0e-3a52-4c55-9b8e-0c6f1b7e2d41")
DOWNLOAD_CONCURRENCY = 3
# Two imports of the same image may race to register it; registration is short, so serialise it.
_COMMIT_LOCK = threading.Lock()
EXTRACT_CONCURRENCY = 2


class ImportCancelled(Exception):
    """The import was cancelled through `cancel_event`; nothing was stored."""


class ImportProgress(msgspec.Struct, kw_only=True):
    phase: str  # resolving | downloading | extracting | committing | done
    layers_total: int = 0
    layers_done: int = 0
    layers_cached: int = 0
    bytes_total: int = 0  # compressed bytes to fetch (known after resolving)
    bytes_done: int = 0
    message: str = ""


class ImportOptions(msgspec.Struct, frozen=True, kw_only=True):
    insecure_registries: tuple[str, ...] = ()
    platform: Platform | None = None
    limits: ExtractLimits = ExtractLimits()
    max_image_bytes: int = 64 * 1024**3
    timeouts: Timeouts = Timeouts()
    # Directories local sources (archives, layout dirs) must resolve into; None allows any path the
    # engine can read. Front ends serving remote users should pass their allowed roots.
    local_roots: tuple[str, ...] | None = None


def default_options() -> ImportOptions:
    """Options from the environment: `CONTREE_INSECURE_REGISTRIES=host:port,host2` (plain HTTP / unverified
    TLS allowed for those registries; loopback registries always are)."""
    raw = os.environ.get("CONTREE_INSECURE_REGISTRIES", "")
    return ImportOptions(insecure_registries=tuple(h.strip() for h in raw.split(",") if h.strip()))


# Called synchronously from the event loop thread; must not block (record an event, set a field).
ProgressCallback = Callable[[ImportProgress], None]


def layer_id(diff_id: str) -> str:
    """Store id of an imported layer: content-addressed by the uncompressed tar's digest."""
    return diff_id.replace(":", "-", 1)


def image_uuid_for(key: str) -> str:
    return str(uuidlib.uuid5(IMPORT_NAMESPACE, key))


def image_config(defaults: ImageDefaults) -> ImageConfig:
    return ImageConfig(
        env=list(defaults.env),
        cwd=defaults.cwd or "/",
        user=defaults.user or "",
        entrypoint=defaults.entrypoint,
        cmd=defaults.cmd,
        labels=dict(defaults.labels) or None,
    )


def open_source(
    text: str,
    *,
    credentials: Credentials | None,
    options: ImportOptions,
    token_cache: TokenCache | None = None,
) -> BlobSource:
    source = parse_source(text)
    if isinstance(source, Reference):
        return RegistrySource(
            source,
            credentials=credentials,
            insecure_registries=options.insecure_registries,
            timeouts=options.timeouts,
            token_cache=token_cache,
        )
    assert isinstance(source, LocalSource)
    _check_local_path(source.path, options.local_roots)
    if source.kind == "docker-archive":
        return DockerArchiveSource(source)
    return LocalLayoutSource(source)


def _check_local_path(path: str, roots: tuple[str, ...] | None) -> None:
    if not os.path.isabs(path):
        raise BadRequest(f"local image sources need an absolute path, got {path!r}")
    if roots is None:
        return
    real = os.path.realpath(path)
    for root in roots:
        base = os.path.realpath(root)
        if real == base or real.startswith(base.rstrip("/") + "/"):
            return
    raise Forbidden(f"{path!r} is outside the directories allowed for local image sources")


class _Reporter:
    """Throttled progress reports (at most ~5 per second, always the phase changes)."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.state = ImportProgress(phase="resolving")
        self._last = 0.0

    def emit(self, *, force: bool = False, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self.state, key, value)
        if self.callback is None:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        self.callback(msgspec.structs.replace(self.state))

    def add_bytes(self, n: int) -> None:
        self.state.bytes_done += n
        self.emit()


async def import_image(
    store: Store,
    request: api.ImageImportRequest,
    *,
    progress: ProgressCallback | None = None,
    cancel_event: asyncio.Event | None = None,
    credentials: Credentials | None = None,
    operation_id: str | None = None,
    options: ImportOptions | None = None,
    token_cache: TokenCache | None = None,
) -> ImageRecord:
    """Import `request.registry.url` into `store`; returns the image record (tagged with `request.tag`).

    `credentials` override those in the request. Raises `ImportCancelled` when `cancel_event` is set,
    `contree.errors.BackendError` subclasses for registry / content errors; stores nothing on failure.
    """
    options = options or default_options()
    if credentials is None and request.registry.credentials is not None:
        rc = request.registry.credentials
        if rc.username or rc.password:
            credentials = Credentials(username=rc.username or "", password=rc.password or "")
    source = open_source(
        request.registry.url, credentials=credentials, options=options, token_cache=token_cache
    )
    work = asyncio.ensure_future(
        _run(store, source, request.tag, progress, operation_id, options, threading.Event())
    )
    waiter = asyncio.ensure_future(cancel_event.wait()) if cancel_event is not None else None
    try:
        if waiter is None:
            return await work
        done, _ = await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        if work.cancelled() or work.exception() is None:
            if not work.cancelled():
                return work.result()  # finished in the same instant: keep the result
            raise ImportCancelled("import cancelled")
        raise work.exception()  # type: ignore[misc]
    except asyncio.CancelledError:
        work.cancel()
        with contextlib.suppress(BaseException):
            await work
        raise
    finally:
        if waiter is not None:
            waiter.cancel()
        await source.close()


async def _run(
    store: Store,
    source: BlobSource,
    tag: str | None,
    progress: ProgressCallback | None,
    operation_id: str | None,
    options: ImportOptions,
    stop: threading.Event,
) -> ImageRecord:
    reporter = _Reporter(progress)
    reporter.emit(force=True, message="resolving image")
    resolved = await source.resolve(options.platform)
    cfg = decode_config(resolved.config)
    config = image_config(defaults_of(cfg))
    uuid = image_uuid_for(resolved.key)
    existing = await asyncio.to_thread(store.find, uuid)
    if existing is not None:
        reporter.emit(
            force=True,
            phase="done",
            layers_total=len(resolved.layers),
            layers_cached=len(resolved.layers),
            message="image already imported",
        )
        return await asyncio.to_thread(store.set_tag, uuid, tag) if tag else existing

    ids = [layer_id(layer.diff_id) for layer in resolved.layers]
    with store.pinned(ids):  # layers we find present must survive a concurrent gc until registered
        return await _import_layers(
            store, source, resolved, ids, tag, config, uuid, reporter, operation_id, options, stop
        )


async def _import_layers(
    store: Store,
    source: BlobSource,
    resolved: ResolvedImage,
    ids: list[str],
    tag: str | None,
    config: ImageConfig,
    uuid: str,
    reporter: _Reporter,
    operation_id: str | None,
    options: ImportOptions,
    stop: threading.Event,
) -> ImageRecord:
    have = await asyncio.to_thread(lambda: {lid for lid in ids if store.has_layer(lid)})
    missing: dict[str, LayerRef] = {}
    for layer, lid in zip(resolved.layers, ids, strict=True):
        if lid not in have:
            missing.setdefault(lid, layer)
    reporter.emit(
        force=True,
        phase="downloading",
        layers_total=len(resolved.layers),
        layers_cached=len(resolved.layers) - len(missing),
        bytes_total=sum(layer.size or 0 for layer in missing.values()),
        message=f"fetching {len(missing)} of {len(resolved.layers)} layers",
    )
    stage = await asyncio.to_thread(store.staging_dir, "import")
    try:
        staged = await _fetch_all(source, missing, Path(stage), reporter, options, stop)
        reporter.emit(force=True, phase="committing", message="registering the image")
        # Registration moves trees out of the staging dir: let it finish even if we are cancelled
        # meanwhile (the image is then complete), so the cleanup below never races it.
        commit = asyncio.ensure_future(
            asyncio.to_thread(_commit, store, staged, ids, config, tag, uuid, operation_id, resolved.key)
        )
        try:
            record = await asyncio.shield(commit)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await commit
            raise
    except BaseException:
        stop.set()
        raise
    finally:
        await asyncio.to_thread(remove_tree, Path(stage))
    reporter.emit(force=True, phase="done", message="imported")
    return record


async def _fetch_all(
    source: BlobSource,
    missing: dict[str, LayerRef],
    stage: Path,
    reporter: _Reporter,
    options: ImportOptions,
    stop: threading.Event,
) -> dict[str, Path]:
    downloads = asyncio.Semaphore(DOWNLOAD_CONCURRENCY)
    extracts = asyncio.Semaphore(EXTRACT_CONCURRENCY)
    staged: dict[str, Path] = {}
    total_bytes = 0

    async def one(index: int, lid: str, layer: LayerRef) -> None:
        nonlocal total_bytes
        blob = str(stage / f"blob-{index}")
        tree = stage / f"layer-{index}"
        async with downloads:
            await source.fetch(layer, blob, reporter.add_bytes)
        async with extracts:
            if stop.is_set():
                raise asyncio.CancelledError
            tree.mkdir(mode=0o755)
            try:
                stats: LayerStats = await _extract_in_thread(blob, str(tree), options.limits, stop)
            finally:
                os.unlink(blob)
        if stats.diff_id != layer.diff_id:
            raise Unprocessable(
                f"layer {layer.digest} unpacks to {stats.diff_id}, but the image config says {layer.diff_id}"
            )
        total_bytes += stats.file_bytes
        if total_bytes > options.max_image_bytes:
            raise Unprocessable(f"image is larger than {options.max_image_bytes} bytes uncompressed")
        staged[lid] = tree
        reporter.emit(force=True, phase="extracting", layers_done=reporter.state.layers_done + 1)

    tasks = [asyncio.ensure_future(one(i, lid, layer)) for i, (lid, layer) in enumerate(missing.items())]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        stop.set()
        for t in tasks:
            t.cancel()
        # Let worker threads notice `stop` and finish before the staging dir is removed.
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return staged


async def _extract_in_thread(
    blob: str, tree: str, limits: ExtractLimits, stop: threading.Event
) -> LayerStats:
    """Extraction in a worker thread that survives task cancellation until it has stopped."""
    future = asyncio.ensure_future(asyncio.to_thread(extract_layer, blob, tree, limits, stop))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(BaseException):
            await future
        raise


def _commit(
    store: Store,
    staged: dict[str, Path],
    ids: list[str],
    config: ImageConfig,
    tag: str | None,
    uuid: str,
    operation_id: str | None,
    key: str,
) -> ImageRecord:
    with _COMMIT_LOCK:
        source = f"oci({key})"
        for lid, tree in staged.items():
            store.add_layer(tree, layer_id=lid, source=source)
        # Manifests list layers bottom first; the store wants the top first. A layer repeated in the
        # manifest (empty layers often are) is kept once, at its topmost position.
        top_first: list[str] = []
        for lid in reversed(ids):
            if lid not in top_first:
                top_first.append(lid)
        return store.create_image_from_layer_dirs(
            top_first,
            config=config,
            tag=tag,
            kind=KIND_IMPORTED,
            source=source,
            operation_id=operation_id,
            image_uuid=uuid,
        )
