"""What the images of this backend contain, for guidance that tells the truth.

On the embedded engine the guides, instructions, prompts and docs examples name images that exist here
and say what each holds: a shell, a package manager, Python and pip. That is read from the images
themselves (their directories and /etc/os-release, through the inspect API: no sandbox), never from a
table of names. The Contree cloud's images are not listed here (its `common/` tags vary by account).

An image never changes once made, so what it contains is kept by UUID (`CatalogCache`, a file in the
home's `mcp/` beside the other caches that every session of the home shares): a server starts with one
listing request instead of about ten requests per image.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path

import msgspec

from contree import api
from contree.backend import Backend, ImageQuery
from contree.errors import BackendError, BadRequest, NotFound
from contree.fsutil import write_private

log = logging.getLogger(__name__)

MAX_IMAGES = 20  # tagged images described at most (newest first)
CACHED_IMAGES = 200  # descriptions the cache keeps (the listed ones first)
BIN_DIRS = ("/bin", "/usr/bin", "/sbin", "/usr/sbin", "/usr/local/bin")
PACKAGE_MANAGERS = ("apt-get", "apk", "dnf", "microdnf", "yum", "zypper", "pacman")
INSTALL = {
    "apt-get": "apt-get update && apt-get install -y {}",
    "apk": "apk add --no-cache {}",
    "dnf": "dnf install -y {}",
    "microdnf": "microdnf install -y {}",
    "yum": "yum install -y {}",
    "zypper": "zypper --non-interactive install {}",
    "pacman": "pacman -Sy --noconfirm {}",
}
_PYTHON_DIR = re.compile(r"^python(3\.\d+)$")


class ImageInfo(api.Model):
    tag: str
    uuid: str
    os: str = ""  # PRETTY_NAME of /etc/os-release
    shell: str | None = None  # /bin/sh or /bin/bash
    busybox: bool = False
    package_manager: str | None = None
    python: str | None = None  # "3.11" (from lib/python3.X), or "3" when only the binary was seen
    pip: bool = False

    def summary(self) -> str:
        shell = f"shell {self.shell}" + (" (busybox)" if self.busybox else "") if self.shell else "no shell"
        manager = f"package manager {self.package_manager}" if self.package_manager else "no package manager"
        python = "no python"
        if self.python:
            python = f"python {self.python}" + (" with pip" if self.pip else ", no pip")
        return ", ".join([self.os or "unknown system", shell, manager, python])

    def install(self, packages: str) -> str | None:
        """The command that installs `packages` with this image's package manager (None: it has none)."""
        template = INSTALL.get(self.package_manager or "")
        return template.format(packages) if template else None


class Catalog(api.Model):
    images: list[ImageInfo] = msgspec.field(default_factory=list)

    def with_shell(self) -> ImageInfo | None:
        """The image to show shell examples on: the smallest-looking one with a shell (busybox first)."""
        shells = [i for i in self.images if i.shell]
        return min(shells, key=lambda i: (not i.busybox, i.package_manager is not None, i.tag), default=None)

    def with_python(self) -> ImageInfo | None:
        found = [i for i in self.images if i.python and i.shell]
        return min(found, key=lambda i: (not i.pip, i.tag), default=None)

    def with_package_manager(self) -> ImageInfo | None:
        found = [i for i in self.images if i.package_manager and i.shell]
        return min(found, key=lambda i: i.tag, default=None)

    def table(self) -> str:
        if not self.images:
            return "(no tagged images yet: `contree-mcp images bootstrap` makes busybox and debian:bookworm)"
        rows = ["| Image | System | Shell | Package manager | Python |", "|---|---|---|---|---|"]
        for i in self.images:
            python = f"{i.python}" + (" + pip" if i.pip else " (no pip)") if i.python else "—"
            shell = (i.shell or "—") + (" (busybox)" if i.busybox else "")
            rows.append(f"| `{i.tag}` | {i.os or '—'} | {shell} | {i.package_manager or '—'} | {python} |")
        return "\n".join(rows)


class _CacheFile(api.Model):
    code: str  # the description code that wrote it (`_code()`)
    images: dict[str, ImageInfo]  # by image UUID; `tag` is whichever tag the image had when described


def _code() -> str:
    """This module as it is on disk (path, size, modification time: Python's rule for its own bytecode
    cache): what an image is said to hold is found out here, so descriptions another version of it wrote
    are found out again."""
    try:
        st = os.stat(__file__)
    except OSError:
        return ""
    return f"{__file__}:{st.st_size}:{st.st_mtime_ns}"


class CatalogCache:
    """Descriptions of images by UUID in one private file, replaced atomically: concurrent sessions at
    worst describe an image twice. A file that cannot be read, or that other description code wrote, is
    treated as empty."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.code = _code()

    def load(self) -> dict[str, ImageInfo]:
        try:
            raw = self.path.read_bytes()
            cached = msgspec.json.decode(raw, type=_CacheFile)
        except (OSError, msgspec.MsgspecError):
            return {}
        return cached.images if self.code and cached.code == self.code else {}

    def save(self, images: dict[str, ImageInfo]) -> None:
        if not self.code:
            return
        try:
            write_private(self.path, msgspec.json.encode(_CacheFile(code=self.code, images=images)))
        except OSError as exc:
            log.debug("cannot write the image catalog cache %s: %s", self.path, exc)


async def describe_images(
    backend: Backend, limit: int = MAX_IMAGES, *, shared_only: bool = False, cache: CatalogCache | None = None
) -> Catalog:
    """Inspect the backend's tagged images (newest first, at most `limit`). `shared_only` (a server whose
    clients each see their own images) keeps to images no client's operation made (bootstrapped ones).
    With a `cache`, only images it does not know yet are inspected."""
    try:
        images = await backend.list_images(ImageQuery(limit=limit, tagged=True))
    except BackendError as exc:
        log.warning("cannot list images for the guides: %s", exc)
        return Catalog()
    if shared_only:
        images = [i for i in images if not i.operation_uuid]
    known = cache.load() if cache is not None else {}
    learnt: dict[str, ImageInfo] = {}

    async def describe(image: api.Image) -> ImageInfo | None:
        tag, uuid = image.tag, image.uuid
        if not tag or not uuid:
            return None
        hit = known.get(uuid)
        if hit is not None:
            return msgspec.structs.replace(hit, tag=tag)
        info, complete = await _describe(backend, tag, uuid)
        if complete:  # a description cut short by a failing request is used now, not kept
            learnt[info.uuid] = info
        return info

    found = await asyncio.gather(*(describe(i) for i in images))
    if cache is not None and learnt:
        keep = {**known, **learnt}
        if len(keep) > CACHED_IMAGES:
            keep = dict(list(keep.items())[-CACHED_IMAGES:])  # the oldest entries go first
        await asyncio.to_thread(cache.save, keep)
    return Catalog(images=sorted((i for i in found if i is not None), key=lambda i: i.tag))


class _Reads:
    """Counts the reads that failed for another reason than the path not being there."""

    def __init__(self) -> None:
        self.failed = 0


async def _describe(backend: Backend, tag: str, uuid: str) -> tuple[ImageInfo, bool]:
    """The image's description, and whether every read it took succeeded."""
    info = ImageInfo(tag=tag, uuid=uuid)
    reads = _Reads()
    names: set[str] = set()
    for directory in BIN_DIRS:
        names |= {f"{directory}/{n}" for n in await _names(backend, uuid, directory, reads)}
    info.shell = next((s for s in ("/bin/sh", "/bin/bash", "/usr/bin/bash") if s in names), None)
    info.busybox = "/bin/busybox" in names
    info.package_manager = next(
        (pm for pm in PACKAGE_MANAGERS if any(f"{d}/{pm}" in names for d in BIN_DIRS)), None
    )
    if any(f"{d}/python3" in names for d in BIN_DIRS):
        versions = {
            m.group(1)
            for lib in ("/usr/lib", "/usr/local/lib")
            for n in await _names(backend, uuid, lib, reads)
            if (m := _PYTHON_DIR.match(n))
        }
        info.python = max(versions, key=lambda v: tuple(int(x) for x in v.split("."))) if versions else "3"
        info.pip = any(f"{d}/pip3" in names or f"{d}/pip" in names for d in BIN_DIRS)
    info.os = await _os_name(backend, uuid, reads) or ("BusyBox" if info.busybox else "")
    return info, reads.failed == 0


async def _names(backend: Backend, uuid: str, directory: str, reads: _Reads) -> set[str]:
    try:
        listing = await backend.list_directory(uuid, directory)
    except (NotFound, BadRequest):  # no such directory (or not one) in this image
        return set()
    except BackendError:
        reads.failed += 1
        return set()
    return {f.path.rstrip("/").rsplit("/", 1)[-1] for f in listing.files}


async def _os_name(backend: Backend, uuid: str, reads: _Reads) -> str:
    data = bytearray()
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            async for chunk in backend.download(uuid, path):
                data += chunk
                if len(data) > 16384:
                    break
        except (NotFound, BadRequest):
            continue
        except BackendError:
            reads.failed += 1
            continue
        break
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return ""
