"""Where an image's manifest, config and layer blobs come from: a registry, an OCI layout directory, an
OCI archive or a docker archive. Every source resolves to one `ResolvedImage` and fetches layer blobs into
files with their digest verified, so the import pipeline is the same for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tarfile
from collections.abc import Callable
from typing import Protocol

import msgspec

from contree.errors import NotFound, RateLimited, Unavailable, Unprocessable
from contree.fsutil import exclusive_file
from contree.oci.auth import Credentials, TokenCache
from contree.oci.extract import write_all
from contree.oci.manifest import (
    INDEX_TYPES,
    LAYER_TYPES,
    MAX_CONFIG_BYTES,
    MAX_LAYERS,
    MAX_MANIFEST_BYTES,
    Descriptor,
    Index,
    Manifest,
    Platform,
    decode_config,
    decode_manifest,
    pick_manifest,
    unsupported_layer,
)
from contree.oci.reference import LocalSource, Reference
from contree.oci.registry import BlobDigestMismatch, RegistryClient, Timeouts

Progress = Callable[[int], None]
COPY_CHUNK = 1024 * 1024
MAX_INDEX_DEPTH = 4
BLOB_ATTEMPTS = 3


class LayerRef(msgspec.Struct, frozen=True, kw_only=True):
    digest: str  # blob digest (compressed); for docker archives the member path is in `path`
    size: int | None
    diff_id: str  # sha256 of the uncompressed tar (from the config)
    path: str | None = None


class ResolvedImage(msgspec.Struct, frozen=True, kw_only=True):
    key: str  # identity for idempotence: manifest digest (or config digest for docker archives)
    config: bytes
    layers: list[LayerRef]  # bottom first, as in the manifest


class BlobSource(Protocol):
    async def resolve(self, platform: Platform | None) -> ResolvedImage: ...
    async def fetch(self, layer: LayerRef, dest: str, progress: Progress | None) -> None: ...
    async def close(self) -> None: ...


def _sha256_hex(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise Unprocessable(f"unsupported or malformed digest {digest!r}")
    return hexpart


def _layers_of(manifest: Manifest, config: bytes) -> list[LayerRef]:
    cfg = decode_config(config)
    if len(manifest.layers) > MAX_LAYERS:
        raise Unprocessable(f"image has {len(manifest.layers)} layers (limit {MAX_LAYERS})")
    diff_ids = cfg.rootfs.diff_ids
    if len(diff_ids) != len(manifest.layers):
        raise Unprocessable(f"image config lists {len(diff_ids)} diff ids for {len(manifest.layers)} layers")
    out = []
    for desc, diff_id in zip(manifest.layers, diff_ids, strict=True):
        if desc.media_type not in LAYER_TYPES and unsupported_layer(desc.media_type):
            raise Unprocessable(f"unsupported layer media type {desc.media_type!r}")
        _sha256_hex(desc.digest)
        _sha256_hex(diff_id)
        out.append(LayerRef(digest=desc.digest, size=desc.size, diff_id=diff_id))
    return out


# ---- registry ---------------------------------------------------------------------------------------


class RegistrySource:
    def __init__(
        self,
        ref: Reference,
        *,
        credentials: Credentials | None = None,
        insecure_registries: tuple[str, ...] = (),
        timeouts: Timeouts | None = None,
        token_cache: TokenCache | None = None,
    ) -> None:
        self.ref = ref
        self.client = RegistryClient(
            ref.api_host,
            credentials=credentials,
            insecure_registries=insecure_registries,
            timeouts=timeouts,
            token_cache=token_cache,
        )

    async def resolve(self, platform: Platform | None) -> ResolvedImage:
        selector = self.ref.selector
        for _ in range(MAX_INDEX_DEPTH):
            data, media_type, digest = await self.client.get_manifest(self.ref.repository, selector)
            doc = decode_manifest(data, media_type)
            if isinstance(doc, Index):
                selector = pick_manifest(doc, platform).digest
                continue
            config = await self.client.get_blob_bytes(
                self.ref.repository, doc.config.digest, MAX_CONFIG_BYTES
            )
            return ResolvedImage(key=digest, config=config, layers=_layers_of(doc, config))
        raise Unprocessable("image indexes nested too deeply")

    async def fetch(self, layer: LayerRef, dest: str, progress: Progress | None) -> None:
        # Transient failures (5xx, 429, dropped connections) are retried; a digest mismatch is not.
        # Progress only ever grows: a retry reports bytes beyond what the failed attempt reported.
        reported = 0
        for attempt in range(BLOB_ATTEMPTS):
            done = 0

            def counting(n: int) -> None:
                nonlocal done, reported
                done += n
                if done > reported:
                    if progress is not None:
                        progress(done - reported)
                    reported = done

            try:
                await self.client.download_blob(
                    self.ref.repository, layer.digest, dest, size=layer.size, progress=counting
                )
                return
            except (Unavailable, RateLimited) as exc:
                if attempt == BLOB_ATTEMPTS - 1:
                    raise
                delay = exc.retry_after if exc.retry_after is not None else 0.5 * 2**attempt
                await asyncio.sleep(min(delay, 10.0))

    async def close(self) -> None:
        await self.client.close()


# ---- local: OCI layout directory / OCI archive / docker archive -------------------------------------------


def _copy_verified(
    src: os.PathLike[str] | str | object, dest: str, digest: str, size: int | None, progress: Progress | None
) -> None:
    """Copy a blob (a path or a readable file object) into `dest`, checking size and sha256."""
    want = _sha256_hex(digest)
    sha = hashlib.sha256()
    total = 0
    with exclusive_file(dest) as fd:
        reader = open(src, "rb") if isinstance(src, (str, os.PathLike)) else src
        try:
            while chunk := reader.read(COPY_CHUNK):  # type: ignore[attr-defined]
                total += len(chunk)
                if size is not None and total > size:
                    raise BlobDigestMismatch(f"blob {digest} is larger than its descriptor says")
                sha.update(chunk)
                write_all(fd, chunk)
                if progress is not None:
                    progress(len(chunk))
        finally:
            if reader is not src:
                reader.close()  # type: ignore[attr-defined]
        if sha.hexdigest() != want:
            raise BlobDigestMismatch(f"blob digest mismatch: expected {digest}, got sha256:{sha.hexdigest()}")
        if size is not None and total != size:
            raise BlobDigestMismatch(f"blob {digest} has {total} bytes, its descriptor says {size}")


class _LayoutReader(Protocol):
    def read(self, name: str, limit: int) -> bytes: ...
    def copy(
        self, name: str, dest: str, digest: str, size: int | None, progress: Progress | None
    ) -> None: ...
    def close(self) -> None: ...


class _DirReader:
    def __init__(self, root: str) -> None:
        if not os.path.isdir(root):
            raise NotFound(f"OCI layout directory {root!r} not found")
        self.root = root
        self.rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _open(self, name: str) -> int:
        from contree.openat2 import RESOLVE_BENEATH, RESOLVE_NO_SYMLINKS, openat2

        try:
            return openat2(self.rootfd, name, os.O_RDONLY, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
        except FileNotFoundError:
            raise NotFound(f"{name} missing in {self.root}") from None

    def read(self, name: str, limit: int) -> bytes:
        with os.fdopen(self._open(name), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise Unprocessable(f"{name} is larger than {limit} bytes")
        return data

    def copy(self, name: str, dest: str, digest: str, size: int | None, progress: Progress | None) -> None:
        with os.fdopen(self._open(name), "rb") as f:
            _copy_verified(f, dest, digest, size, progress)

    def close(self) -> None:
        os.close(self.rootfd)


class _TarReader:
    """Random access to the members of an (uncompressed or gzip) archive, by normalised name."""

    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise NotFound(f"image archive {path!r} not found")
        try:
            self.tar = tarfile.open(path, "r:*")
            self.members = {
                os.path.normpath(m.name.lstrip("/")): m for m in self.tar.getmembers() if m.isfile()
            }
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise Unprocessable(f"cannot read image archive {path!r}: {exc}") from None
        self.path = path

    def _member(self, name: str) -> tarfile.TarInfo:
        member = self.members.get(os.path.normpath(name.lstrip("/")))
        if member is None:
            raise NotFound(f"{name} missing in archive {self.path}")
        return member

    def read(self, name: str, limit: int) -> bytes:
        member = self._member(name)
        if member.size > limit:
            raise Unprocessable(f"{name} is larger than {limit} bytes")
        f = self.tar.extractfile(member)
        assert f is not None
        return f.read()

    def copy(self, name: str, dest: str, digest: str, size: int | None, progress: Progress | None) -> None:
        f = self.tar.extractfile(self._member(name))
        assert f is not None
        _copy_verified(f, dest, digest, size, progress)

    def close(self) -> None:
        self.tar.close()


async def _copy_in_thread(
    reader: _LayoutReader, name: str, dest: str, layer: LayerRef, progress: Progress | None
) -> None:
    """Copy in a worker thread; progress is delivered on the event loop, and a cancelled caller waits
    for the thread so nothing writes into the staging directory after it is removed."""
    loop = asyncio.get_running_loop()
    report: Progress | None = None
    if progress is not None:
        callback = progress

        def report(n: int) -> None:
            loop.call_soon_threadsafe(callback, n)

    future = asyncio.ensure_future(
        asyncio.to_thread(reader.copy, name, dest, layer.digest, layer.size, report)
    )
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await future
        raise


def _blob_name(digest: str) -> str:
    return f"blobs/sha256/{_sha256_hex(digest)}"


class LocalLayoutSource:
    """An OCI image layout, as a directory (`oci:`) or a tar of one (`oci-archive:`)."""

    def __init__(self, source: LocalSource) -> None:
        self.source = source
        self.reader: _LayoutReader = (
            _DirReader(source.path) if source.kind == "oci-layout" else _TarReader(source.path)
        )
        self._lock = asyncio.Lock()  # tarfile objects are not thread-safe

    def _pick_top(self, index: Index) -> Descriptor:
        wanted = self.source.ref
        if wanted:
            named = [
                d
                for d in index.manifests
                if (d.annotations or {}).get("org.opencontainers.image.ref.name")
                in (wanted, wanted.split(":")[-1])
            ]
            if not named:
                raise NotFound(f"no image named {wanted!r} in {self.source.path}")
            return named[0]
        if len(index.manifests) != 1:
            raise Unprocessable(
                f"{self.source.path} holds {len(index.manifests)} images;"
                f" name one as {self.source.kind}:PATH:REF"
            )
        return index.manifests[0]

    def _resolve(self, platform: Platform | None) -> ResolvedImage:
        index = msgspec.json.decode(self.reader.read("index.json", MAX_MANIFEST_BYTES), type=Index)
        desc = self._pick_top(index)
        for _ in range(MAX_INDEX_DEPTH):
            data = self.reader.read(_blob_name(desc.digest), MAX_MANIFEST_BYTES)
            if "sha256:" + hashlib.sha256(data).hexdigest() != desc.digest:
                raise BlobDigestMismatch(f"manifest {desc.digest} does not match its content")
            doc = decode_manifest(data, desc.media_type)
            if isinstance(doc, Index) or desc.media_type in INDEX_TYPES:
                assert isinstance(doc, Index)
                desc = pick_manifest(doc, platform)
                continue
            config = self.reader.read(_blob_name(doc.config.digest), MAX_CONFIG_BYTES)
            if "sha256:" + hashlib.sha256(config).hexdigest() != doc.config.digest:
                raise BlobDigestMismatch(f"config {doc.config.digest} does not match its content")
            return ResolvedImage(key=desc.digest, config=config, layers=_layers_of(doc, config))
        raise Unprocessable("image indexes nested too deeply")

    async def resolve(self, platform: Platform | None) -> ResolvedImage:
        async with self._lock:
            return await asyncio.to_thread(self._resolve, platform)

    async def fetch(self, layer: LayerRef, dest: str, progress: Progress | None) -> None:
        async with self._lock:
            await _copy_in_thread(self.reader, _blob_name(layer.digest), dest, layer, progress)

    async def close(self) -> None:
        self.reader.close()


class _DockerManifestEntry(msgspec.Struct, kw_only=True, rename="pascal"):
    config: str
    repo_tags: list[str] | None = None
    layers: list[str] = []


class DockerArchiveSource:
    """`docker save` output: manifest.json → config + uncompressed (or compressed) layer tars."""

    def __init__(self, source: LocalSource) -> None:
        self.source = source
        self.reader = _TarReader(source.path)
        self._lock = asyncio.Lock()

    def _resolve(self) -> ResolvedImage:
        try:
            entries = msgspec.json.decode(
                self.reader.read("manifest.json", MAX_MANIFEST_BYTES), type=list[_DockerManifestEntry]
            )
        except msgspec.DecodeError as exc:
            raise Unprocessable(f"malformed manifest.json in {self.source.path}: {exc}") from None
        entry = self._pick(entries)
        config = self.reader.read(entry.config, MAX_CONFIG_BYTES)
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        diff_ids = decode_config(config).rootfs.diff_ids
        if len(diff_ids) != len(entry.layers):
            raise Unprocessable(
                f"docker archive config lists {len(diff_ids)} diff ids for {len(entry.layers)} layers"
            )
        if len(entry.layers) > MAX_LAYERS:
            raise Unprocessable(f"image has {len(entry.layers)} layers (limit {MAX_LAYERS})")
        layers = []
        for path, diff_id in zip(entry.layers, diff_ids, strict=True):
            member = self.reader._member(path)
            # Layer files hold the uncompressed tar (so their sha256 is the diff id) unless compressed;
            # `digest` is checked on copy, the diff id again after extraction.
            digest = self._digest_of(path, diff_id)
            layers.append(LayerRef(digest=digest, size=member.size, diff_id=diff_id, path=path))
        return ResolvedImage(key=config_digest, config=config, layers=layers)

    def _digest_of(self, path: str, diff_id: str) -> str:
        parts = path.split("/")
        if len(parts) == 3 and parts[0] == "blobs" and parts[1] == "sha256":
            return f"sha256:{parts[2]}"
        return diff_id

    def _pick(self, entries: list[_DockerManifestEntry]) -> _DockerManifestEntry:
        wanted = self.source.ref
        if wanted:
            for e in entries:
                if wanted in (e.repo_tags or []) or any(t.endswith("/" + wanted) for t in e.repo_tags or []):
                    return e
            raise NotFound(f"no image tagged {wanted!r} in {self.source.path}")
        if len(entries) != 1:
            raise Unprocessable(
                f"{self.source.path} holds {len(entries)} images; name one as docker-archive:PATH:REPO:TAG"
            )
        return entries[0]

    async def resolve(self, platform: Platform | None) -> ResolvedImage:
        async with self._lock:
            return await asyncio.to_thread(self._resolve)

    async def fetch(self, layer: LayerRef, dest: str, progress: Progress | None) -> None:
        assert layer.path is not None
        async with self._lock:
            await _copy_in_thread(self.reader, layer.path, dest, layer, progress)

    async def close(self) -> None:
        self.reader.close()
