"""upload, download, rsync: moving files between the host and images, inside the allowed roots only."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import os
import secrets
from typing import TYPE_CHECKING, Annotated

import msgspec
from msgspec import Meta

from contree.api import Model
from contree.sync import DEFAULT_EXCLUDES
from protocol.errors import ToolError
from protocol.registry import Registry, RequestContext, ToolAnnotations
from tools.errors import backend_errors
from tools.models import DownloadOutput, DownloadSource, UploadOutput
from tools.roots import expand, require_inside
from tools.state import ServerState
from tools.stores.dirstate import ManifestEntry, ensure_blob, sha256_file

if TYPE_CHECKING:
    from contree.sync import StateCache


class RsyncParams(Model):
    source: Annotated[
        str, Meta(description="Absolute host directory (or single file) to sync; '~' is expanded.")
    ]
    destination: Annotated[str, Meta(description="Absolute directory in the sandbox, e.g. '/app'.")]
    exclude: Annotated[
        list[str] | None,
        Meta(description="gitignore-style patterns added to the built-in excludes; '!pattern' re-includes."),
    ] = None
    default_excludes: Annotated[
        bool, Meta(description="Apply the built-in excludes (.git, node_modules, ...); false turns them off.")
    ] = True
    gitignore: Annotated[
        bool, Meta(description="Also apply the .gitignore files found in the source tree.")
    ] = False


class UploadParams(Model):
    path: Annotated[
        str | None, Meta(description="Absolute host path of a file to upload ('~' expanded).")
    ] = None
    content: Annotated[str | None, Meta(description="UTF-8 text to upload as a file ('' = empty file).")] = (
        None
    )
    content_base64: Annotated[str | None, Meta(description="Base64 bytes to upload as a file.")] = None


class DownloadParams(Model):
    image: Annotated[str, Meta(description="Image UUID, 'tag:<tag>' or a bare tag.")]
    path: Annotated[str, Meta(description="Absolute path of the file inside the image.")]
    destination: Annotated[str, Meta(description="Absolute host path to write ('~' expanded).")]
    executable: Annotated[bool, Meta(description="Make the written file executable (0755).")] = False
    # The safe default (COMPAT §14 suggests true): an existing file is never clobbered silently.
    overwrite: Annotated[
        bool,
        Meta(description="Replace an existing file atomically (default, as 0.5.0); false refuses one."),
    ] = True


async def write_download(
    state: ServerState, image: str, path: str, destination: str, executable: bool, overwrite: bool
) -> tuple[int, str]:
    """Stream into an O_EXCL temp file beside the destination, then rename it into place."""
    parent, name = os.path.split(destination)
    await asyncio.to_thread(_make_parents, parent, state)
    real_parent = require_inside(parent, state.allowed_roots, "destination")
    dir_fd = os.open(real_parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    tmp = f".{name}.{secrets.token_hex(8)}.part"
    try:
        try:
            existing = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None:
            if not overwrite:
                raise ToolError(f"destination {destination} exists; pass overwrite=true to replace it")
            if existing.st_mode & 0o170000 not in (0o100000, 0o120000):
                raise ToolError(f"destination {destination} exists and is not a regular file")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in state.backend.download(image, path):
                    digest.update(chunk)
                    size += len(chunk)
                    await asyncio.to_thread(out.write, chunk)
                await asyncio.to_thread(out.flush)
                await asyncio.to_thread(os.fsync, out.fileno())
            os.chmod(tmp, 0o755 if executable else 0o644, dir_fd=dir_fd)
            if overwrite:
                # rename replaces a symlink at the destination itself, never the file it points to
                os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            else:
                # link() never replaces: a file that appeared since the check above is still refused
                try:
                    os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
                except FileExistsError:
                    raise ToolError(
                        f"destination {destination} exists; pass overwrite=true to replace it"
                    ) from None
                os.unlink(tmp, dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        return size, digest.hexdigest()
    except OSError as exc:
        raise ToolError(f"cannot write {destination}: {exc.strerror or exc}") from None
    finally:
        os.close(dir_fd)


def _make_parents(parent: str, state: ServerState) -> None:
    # Find the deepest existing ancestor and check it before creating anything below it.
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    require_inside(probe, state.allowed_roots, "destination")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise ToolError(f"cannot create {parent}: {exc.strerror}") from None


SYNC_CACHE_RETENTION = 60 * 86400.0  # seconds; a pruned entry only costs one re-read


class _SyncCache:
    """The sync state cache (stat + chunk lists, blob map), opened on first use so servers that never
    rsync create no file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._cache: StateCache | None = None

    def get(self) -> StateCache:
        from contree.sync import StateCache

        if self._cache is None:
            self._cache = StateCache(self.path)
            self._cache.prune(SYNC_CACHE_RETENTION)  # by last use (COMPAT §15.39)
        return self._cache


def register_rsync_upload(registry: Registry, state: ServerState) -> None:
    builtins = ", ".join(DEFAULT_EXCLUDES)
    sync_cache = _SyncCache(str(state.cache_dir / "sync.db"))

    @registry.tool(
        name="rsync",
        title="Sync a host directory",
        description=f"""Sync local files to Contree for use in container instances. Free (no VM).

TL;DR: PURPOSE: make a host directory available to run(). COST: free; only new content is uploaded.

USAGE:
- rsync(source="/abs/project", destination="/app") → an integer directory_state_id; then
  run(..., directory_state_id=<id>, cwd="/app").
- The id names an immutable snapshot: re-sync after editing files to get a new id (unchanged content
  returns the
  same id). Works for a single file too (synced to <destination>/<name>).
- Built-in excludes: {builtins} (default_excludes=false turns them off; gitignore=true also applies the tree's
  .gitignore files). 'exclude' adds gitignore-style patterns (a bare name matches at any depth,
  'dir/' only directories, '/x' anchors at the source root, '**' spans directories, '!x' re-includes).
- Only paths inside the server's allowed roots can be read; symlinks leaving the source are skipped.
- Only changed content is read and sent; a report (files scanned/changed/uploaded, bytes hashed/sent, time)
  arrives as a log notification (logger contree.rsync).

RETURNS: the directory_state_id (integer)

GUIDES:
- [ESSENTIAL] contree://guide/workflow
- [USEFUL] contree://guide/reference""",
        annotations=ToolAnnotations(read_only=False, destructive=False, idempotent=True, open_world=False),
    )
    async def rsync(params: RsyncParams, ctx: RequestContext) -> int:
        # the sync machinery (chunker, scanner, transfers) loads with the first sync, not at start-up
        from contree.sync import Excludes, SyncError, sync_tree, transfer_for
        from contree.sync.chunker import FileChangedError

        source = expand(params.source, "source")
        if not await asyncio.to_thread(os.path.lexists, source):
            raise ToolError(f"source path does not exist: {source}")
        real = await asyncio.to_thread(require_inside, source, state.allowed_roots, "source")
        destination = params.destination.strip().rstrip("/")
        if not destination.startswith("/"):
            raise ToolError(f"destination must be an absolute path, got: {params.destination}")
        excludes = Excludes(params.exclude, defaults=params.default_excludes)
        cache = await asyncio.to_thread(sync_cache.get)

        async def progress(done: int, total: int, message: str) -> None:
            await ctx.progress(done, total, message)

        try:
            with backend_errors("rsync"):
                manifest, report = await sync_tree(
                    real,
                    destination,
                    cache=cache,
                    transfer=transfer_for(state.backend),
                    excludes=excludes,
                    gitignore=params.gitignore,
                    progress=progress,
                )
        except (SyncError, FileChangedError) as exc:
            raise ToolError(str(exc)) from None
        entries = [ManifestEntry(e.path, e.sha256, e.uuid, e.mode) for e in manifest.entries]
        state_id = await asyncio.to_thread(state.dirstates.save, ctx.principal, entries, (real, destination))
        # The result stays a bare integer (COMPAT §2.1: its outputSchema allows nothing else).
        await ctx.log(
            "info",
            {"rsync": source, "directory_state_id": state_id, "manifest": manifest.id,
             **msgspec.to_builtins(report)},
            "contree.rsync",
        )
        return state_id

    @registry.tool(
        name="upload",
        title="Upload a file",
        description="""Upload file to Contree for use in containers. Free (no VM).

TL;DR: PURPOSE: make one file available to run(files=...). COST: free; identical content is not re-sent.

USAGE:
- upload(content="print('hi')") or upload(content_base64="...") or upload(path="/abs/host/file").
- Then run(..., files={"/app/main.py": "<uuid>"}). Files are nameless blobs: the path comes from 'files'.
- 'path' must be absolute and inside the server's allowed roots.

RETURNS: {uuid, sha256, size}

GUIDES:
- [USEFUL] contree://guide/reference""",
        annotations=ToolAnnotations(read_only=False, destructive=False, idempotent=True, open_world=False),
    )
    async def upload(params: UploadParams, ctx: RequestContext) -> UploadOutput:
        if params.path is not None:
            path = expand(params.path, "path")
            if not await asyncio.to_thread(os.path.isfile, path):
                raise ToolError(f"File not found: {path}")
            real = require_inside(path, state.allowed_roots, "path")
            sha = await asyncio.to_thread(sha256_file, real)
            with backend_errors("upload"):
                uuid, size = await ensure_blob(state.backend, sha, real)
            return UploadOutput(
                uuid=uuid,
                sha256=sha,
                size=size if size >= 0 else await asyncio.to_thread(os.path.getsize, real),
            )
        if params.content_base64 is not None:
            try:
                data = base64.b64decode(params.content_base64, validate=True)
            except (binascii.Error, ValueError):
                raise ToolError("content_base64 is not valid base64") from None
        elif params.content is not None:
            data = params.content.encode()
        else:
            raise ToolError("One of 'path', 'content', or 'content_base64' is required")
        sha = hashlib.sha256(data).hexdigest()
        with backend_errors("upload"):
            uuid, _ = await ensure_blob(state.backend, sha, None, data)
        return UploadOutput(uuid=uuid, sha256=sha, size=len(data))


def register_download(registry: Registry, state: ServerState) -> None:
    @registry.tool(
        name="download",
        title="Download a file to the host",
        description="""Download file from container image to local filesystem. Free (no VM).

TL;DR: PURPOSE: copy a build artifact or log from an image to the host. COST: free.

USAGE:
- download(image="<uuid>", path="/app/dist/app.whl", destination="/abs/host/out/app.whl").
- destination must be absolute and inside the server's allowed roots; parent directories are created.
  The file is written atomically and replaces an existing one (overwrite=false refuses it instead);
  executable=true sets 0755.

RETURNS: {success, source: {image, path}, destination, size, executable, sha256}

GUIDES:
- [USEFUL] contree://guide/reference""",
        annotations=ToolAnnotations(read_only=False, destructive=True, idempotent=True, open_world=False),
    )
    async def download(params: DownloadParams, ctx: RequestContext) -> DownloadOutput:
        destination = expand(params.destination, "destination")
        path = params.path if params.path.startswith("/") else "/" + params.path
        with backend_errors(f"{params.image}:{path}"):
            image = await state.images.resolve(params.image, ctx.principal)
            size, sha = await write_download(
                state, image, path, destination, params.executable, params.overwrite
            )
        return DownloadOutput(
            success=True,
            source=DownloadSource(image=image, path=path),
            destination=destination,
            size=size,
            executable=params.executable,
            sha256=sha,
        )
