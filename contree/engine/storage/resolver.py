"""Read an image's layer stack without mounting it (RUNTIME §8).

Overlay semantics in userspace: layers are searched top-down; a whiteout (char device 0:0) hides a
name in every lower layer; a non-directory ends the search; a directory marked opaque
(`trusted.overlay.opaque=y`, a rootless engine's `user.overlay.opaque=y`: `contree/layerformat.py`)
stops contributions from lower layers; a listing is the union of the contributing layers minus whiteouts.

Safety: symlinks are resolved here, inside the image (absolute targets restart at the image root, `..`
is clamped at the root, at most 40 links per lookup). Below that, every entry is reached one verified
directory at a time, and every open goes through `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` on
the layer's root with `O_NOFOLLOW`, so no path, symlink or `..` in an image can reach the host.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from contree.layerformat import is_overlay_xattr, opaque_xattr
from contree.openat2 import RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, openat2

MAX_SYMLINKS = 40
_RESOLVE = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
_DIR_CACHE = 4096


class Node(NamedTuple):
    """One entry of the merged image."""

    path: str  # absolute path in the image (the final component may be a symlink)
    layer: int  # index of the layer that provides it (0 = top)
    rel: str  # its path inside that layer ("" for the root)
    st: os.stat_result
    dirs: tuple[int, ...] = ()  # for directories: the layers contributing to the listing, top first

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.st.st_mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.st.st_mode)


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def normalize(path: str) -> str:
    """An image path as an absolute, `..`-clamped string (`a/../../b` → `/b`)."""
    parts: list[str] = []
    for comp in path.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if parts:
                parts.pop()
        else:
            parts.append(comp)
    return "/" + "/".join(parts)


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


class Resolver:
    """The merged view of one layer stack (top first). Thread-safe; layers must be immutable."""

    def __init__(self, layers: Sequence[Path]) -> None:
        self._roots: list[int] = []
        if not layers:
            raise ValueError("a resolver needs at least one layer")
        try:
            for layer in layers:
                self._roots.append(os.open(layer, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        except OSError:
            self.close()
            raise
        self._lock = threading.Lock()
        # resolved directory path → (contributing layers, stat of the top one); immutable layers make it
        # valid forever, so only its size is bounded.
        self._dirs: OrderedDict[str, tuple[tuple[int, ...], os.stat_result]] = OrderedDict()
        root_dirs = self._contributors("", range(len(self._roots)))
        self._root = Node("/", root_dirs[0], "", os.stat(self._roots[root_dirs[0]]), root_dirs)

    def close(self) -> None:
        roots, self._roots = self._roots, []
        for fd in roots:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> Resolver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- primitives on one layer ----------------------------------------------------------------------

    def _lstat(self, layer: int, rel: str) -> os.stat_result | None:
        # `rel`'s parents were verified to be real directories in this layer, so the kernel walk cannot
        # meet a symlink before the final component, which is not followed.
        try:
            return os.stat(rel, dir_fd=self._roots[layer], follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def open_in_layer(self, layer: int, rel: str, flags: int) -> int:
        return openat2(self._roots[layer], rel or ".", flags | os.O_NOFOLLOW | os.O_CLOEXEC, _RESOLVE)

    def _is_opaque(self, layer: int, rel: str) -> bool:
        fd = self.open_in_layer(layer, rel, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return os.getxattr(fd, opaque_xattr()) == b"y"
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP):
                return False
            raise
        finally:
            os.close(fd)

    def _contributors(self, rel: str, layers: Iterator[int] | range | Sequence[int]) -> tuple[int, ...]:
        """Of `layers` holding directory `rel`, those that contribute (down to the first opaque one)."""
        out = []
        for i in layers:
            out.append(i)
            if self._is_opaque(i, rel):
                break
        return tuple(out)

    # ---- lookups -------------------------------------------------------------------------------------------

    def _child(self, parent: Node, name: str) -> Node | None:
        """`name` inside directory `parent` in the union, or None when absent or whited out."""
        rel = _join(parent.rel, name)
        path = f"{parent.path.rstrip('/')}/{name}"
        with self._lock:
            cached = self._dirs.get(path)
            if cached is not None:
                self._dirs.move_to_end(path)
        if cached is not None:
            return Node(path, cached[0][0], rel, cached[1], cached[0])
        found: Node | None = None
        dir_layers: list[int] = []
        for layer in parent.dirs:
            st = self._lstat(layer, rel)
            if st is None:
                continue
            if is_whiteout(st):
                break
            if not stat.S_ISDIR(st.st_mode):
                if found is None:
                    return Node(path, layer, rel, st)
                break  # a non-directory below a directory ends the stack
            if found is None:
                found = Node(path, layer, rel, st)
            dir_layers.append(layer)
            if self._is_opaque(layer, rel):
                break
        if found is None:
            return None
        dirs = tuple(dir_layers)
        with self._lock:
            self._dirs[path] = (dirs, found.st)
            if len(self._dirs) > _DIR_CACHE:
                self._dirs.popitem(last=False)
        return found._replace(dirs=dirs)

    def lookup(self, path: str, *, follow: bool = True) -> Node:
        """The entry at image path `path`; symlinks are resolved inside the image (the last one only with
        `follow`). Raises FileNotFoundError, NotADirectoryError or OSError(ELOOP)."""
        pending = [c for c in reversed(path.split("/")) if c not in ("", ".")]
        stack: list[Node] = [self._root]
        links = 0
        while pending:
            name = pending.pop()
            if name == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            cur = stack[-1]
            if not cur.is_dir:
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", cur.path)
            child = self._child(cur, name)
            if child is None:
                raise FileNotFoundError(errno.ENOENT, "no such file or directory", normalize(path))
            if child.is_symlink and (pending or follow):
                links += 1
                if links > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, "too many levels of symbolic links", normalize(path))
                target = self.readlink(child)
                if target.startswith("/"):
                    del stack[1:]
                pending.extend(c for c in reversed(target.split("/")) if c not in ("", "."))
                continue
            stack.append(child)
        return stack[-1]

    def readlink(self, node: Node) -> str:
        return os.readlink(node.rel, dir_fd=self._roots[node.layer])

    def listdir(self, node: Node) -> list[tuple[str, Node]]:
        """The union listing of directory `node`, sorted by name (whiteouts and hidden entries removed)."""
        if not node.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", node.path)
        seen: set[str] = set()
        out: list[tuple[str, Node]] = []
        base = node.path.rstrip("/")
        for layer in node.dirs:
            fd = self.open_in_layer(layer, node.rel, os.O_RDONLY | os.O_DIRECTORY)
            try:
                with os.scandir(fd) as it:
                    entries = [(e.name, e.stat(follow_symlinks=False)) for e in it]
            finally:
                os.close(fd)
            for name, st in entries:
                if name in seen:
                    continue
                seen.add(name)
                if is_whiteout(st):
                    continue
                out.append((name, Node(f"{base}/{name}", layer, _join(node.rel, name), st)))
        out.sort(key=lambda item: item[0])
        return out

    def child_dir(self, parent: Node, name: str) -> Node:
        """A directory entry from `listdir`, completed with its contributing layers."""
        node = self._child(parent, name)
        if node is None:
            raise FileNotFoundError(errno.ENOENT, "no such file or directory", f"{parent.path}/{name}")
        return node

    def walk(self, top: Node) -> Iterator[Node]:
        """`top` and everything below it, depth first, parents before children, symlinks not followed."""
        yield top
        if not top.is_dir:
            return
        # An explicit stack of listings: images may nest deeper than Python's recursion limit.
        stack = [(top, iter(self.listdir(top)))]
        while stack:
            parent, entries = stack[-1]
            for name, node in entries:
                if node.is_dir:
                    child = self.child_dir(parent, name)
                    yield child
                    stack.append((child, iter(self.listdir(child))))
                    break
                yield node
            else:
                stack.pop()

    # ---- reading ------------------------------------------------------------------------------------

    def open_file(self, node: Node) -> int:
        """A read-only fd of regular file `node` (never a device, fifo or the target of a symlink)."""
        if not node.is_regular:
            raise IsADirectoryError(errno.EISDIR if node.is_dir else errno.EINVAL, "not a regular file",
                                    node.path)
        fd = self.open_in_layer(node.layer, node.rel, os.O_RDONLY)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", node.path)
        return fd

    def read_bytes(self, path: str) -> bytes:
        fd = self.open_file(self.lookup(path))
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def xattrs(self, node: Node) -> dict[str, bytes]:
        """User-visible xattrs of `node` (overlay bookkeeping excluded); empty for symlinks."""
        if node.is_symlink or not (node.is_regular or node.is_dir):
            return {}
        fd = self.open_in_layer(node.layer, node.rel, os.O_RDONLY | (os.O_DIRECTORY if node.is_dir else 0))
        try:
            out = {}
            for name in os.listxattr(fd):
                if not is_overlay_xattr(name):
                    out[name] = os.getxattr(fd, name)
            return out
        except OSError as exc:
            if exc.errno == errno.ENOTSUP:
                return {}
            raise
        finally:
            os.close(fd)
