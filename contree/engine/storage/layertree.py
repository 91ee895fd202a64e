"""Layer trees on disk: measure them, strip overlay's bookkeeping, remove them safely, fsync.

A layer is an overlay-format directory tree (whiteouts c 0:0, opaque xattrs: `contree/layerformat.py`).
These helpers walk such trees iteratively (layers can be deeper than Python's stack) and never descend
into a mount.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from pathlib import Path

from contree.engine.storage.overlay import mounts_under
from contree.fsutil import walk_entries
from contree.layerformat import is_overlay_xattr, opaque_xattr


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """`rm -rf` that refuses to descend into a mount (it would delete the lower layers' content)."""
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        if mounts_under(path):
            raise OSError(errno.EBUSY, f"refusing to delete {path}: a filesystem is still mounted below it")
        try:
            shutil.rmtree(path)
        except RecursionError:  # deeper than Python's stack: coreutils walks it iteratively
            subprocess.run(["rm", "-rf", "--one-file-system", "--", os.fspath(path)], check=True)
    else:
        path.unlink()


def tree_size(root: Path) -> int:
    """Bytes of regular files below `root`, hardlinked files counted once."""
    return _measure(root, strip=False)


def clean_and_measure(upper: Path) -> int:
    """`clean_upper` and `tree_size` in one walk (a commit is on a run's latency path)."""
    return _measure(upper, strip=True)


def _measure(root: Path, *, strip: bool) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    if strip:
        _strip_overlay_xattrs(os.fspath(root))
    for entry in walk_entries(root):
        if strip:
            _strip_overlay_xattrs(entry.path)
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            if st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            total += st.st_size
        elif stat.S_ISLNK(st.st_mode):
            total += st.st_size
    return total


def _strip_overlay_xattrs(path: str) -> None:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    keep = opaque_xattr()
    for name in names:
        if is_overlay_xattr(name) and name != keep:
            os.removexattr(path, name, follow_symlinks=False)


def clean_upper(upper: Path) -> int:
    """Strip overlay bookkeeping xattrs except `opaque` (RUNTIME §7); returns the number of entries."""
    count = 0
    for path in [os.fspath(upper)] + [e.path for e in walk_entries(upper)]:
        count += 1
        _strip_overlay_xattrs(path)
    return count - 1
