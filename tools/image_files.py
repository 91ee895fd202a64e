"""Reading an image's files and directories through the backend (no sandbox), for the inspect tools and
the image resources alike."""

from __future__ import annotations

import posixpath

from contree.backend import Backend
from contree.errors import BackendError


def normalize_dir(path: str) -> str:
    path = path.strip() or "/"
    if not path.startswith("/"):
        path = "/" + path
    norm = posixpath.normpath(path)
    return "/" if norm in ("/.", "//") else norm


async def read_bounded(
    backend: Backend, image: str, path: str, offset: int, limit: int
) -> tuple[bytes, bool]:
    """Bytes [offset, offset+limit) and whether more follow; memory stays O(limit)."""
    buf = bytearray()
    seen = 0
    more = False
    stream = backend.download(image, path)
    try:
        async for chunk in stream:
            start = max(0, offset - seen)
            seen += len(chunk)
            if start >= len(chunk):
                continue
            buf += chunk[start:]
            if len(buf) > limit:
                more = True
                break
    finally:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()
    return bytes(buf[:limit]), more


def decode_text(data: bytes, truncated: bool) -> str | None:
    """UTF-8 text, tolerating a character cut at the truncation point; None when binary (NUL bytes, or
    not UTF-8), like ripgrep's binary detection."""
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if truncated and exc.start >= len(data) - 3:
            try:
                return data[: exc.start].decode("utf-8")
            except UnicodeDecodeError:
                return None
        return None


async def file_size(backend: Backend, image: str, path: str) -> int | None:
    parent, name = posixpath.split(path)
    try:
        listing = await backend.list_directory(image, parent or "/")
    except BackendError:
        return None
    for item in listing.files:
        if item.path.rstrip("/").rsplit("/", 1)[-1] == name:
            return item.size
    return None
