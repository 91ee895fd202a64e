"""Private files written atomically: readers see the old content or the new, never a torn or briefly
world-readable file (credentials, tokens, profiles); host files opened for reading only when they are
regular files; lock files held through `flock`; a tree walked without following symlinks."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path


def write_private(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` (str is UTF-8). The temp file is created 0600 with O_EXCL|O_NOFOLLOW
    beside the target (so a planted link or file is never written through), fsynced, then renamed;
    on any failure it is removed. Missing parent directories are created 0700."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.urandom(8).hex()}.tmp")
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


def try_lock(path: str | os.PathLike[str], *, make_parents: bool = False) -> int:
    """An fd holding an exclusive `flock` on `path` (created 0600), or -1 when another open file holds
    it. The lock lives as long as the fd: the kernel releases a dead holder's."""
    if make_parents:
        os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return -1
    except BaseException:
        os.close(fd)
        raise
    return fd


class NotRegularFile(OSError):
    """The path names something else than a regular file (now: it may have been one a moment ago)."""

    def __init__(self, path: str | os.PathLike[str], what: str) -> None:
        super().__init__(errno.EINVAL, f"not a regular file ({what})", str(path))
        self.what = what


def open_regular(path: str | os.PathLike[str], *, follow_symlinks: bool = False) -> int:
    """A read-only fd on the regular file at `path`, by default never through a symlink in its last
    component.

    The open itself cannot block: a FIFO swapped in for a file (between a scan and its read) would
    otherwise stall `open()` until a writer appears. What was opened is checked on the descriptor, so no
    later swap can change the answer; the fd is returned in blocking mode."""
    try:
        nofollow = 0 if follow_symlinks else os.O_NOFOLLOW
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | nofollow | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFile(path, "a symbolic link") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, _kind(mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"),
    ):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def walk_entries(root: str | os.PathLike[str]) -> Iterator[os.DirEntry[str]]:
    """Every entry below `root` (not `root` itself), depth first, never following a symlink."""
    stack = [os.fspath(root)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                yield entry
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
