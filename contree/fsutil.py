"""Private files written atomically: readers see the old content or the new, never a torn or briefly
world-readable file (credentials, tokens, profiles)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def write_private(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` (str is UTF-8). The temp file is created 0600 with O_EXCL|O_NOFOLLOW
    beside the target (so a planted link or file is never written through), fsynced, then renamed;
    on any failure it is removed. Missing parent directories are created 0700."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def exclusive_file(path: str | os.PathLike[str]) -> Iterator[int]:
    """A new file (O_EXCL, 0600) open for writing as a raw fd; closed at the end, removed if the block
    raised, so a failed or cancelled download never leaves a partial file behind."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        yield fd
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    os.close(fd)
