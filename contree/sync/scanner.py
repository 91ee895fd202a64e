"""Walk a source tree (blocking: run it in a worker thread): regular files that survive the excludes,
with their stat. Excluded directories are pruned, symlinks that leave the source are never followed
(they are reported), in-tree file symlinks are synced as the content they point to.

Also reported and skipped: names that are not UTF-8 (no sandbox path or JSON document can carry them),
and files with hard links the walk did not meet. Such a file is the same inode as a name elsewhere,
possibly outside the allowed roots (e.g. a link to a private file in another directory): its content
is not the source tree's to give away. Links that all lie inside the synced files are synced as usual."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import NamedTuple

from contree.fsutil import NotRegularFile, open_regular
from contree.sync.excludes import Excludes
from contree.sync.state import StatKey


class SyncError(Exception):
    """An expected failure with a message for the user (an unreadable file, a vanished source...)."""


class Found(NamedTuple):  # a tuple, not a frozen dataclass: a warm sync builds 10,000s of them
    rel: str  # path relative to the source, "/"-separated
    path: str  # host path that is read (an in-tree symlink's resolved target)
    stat: StatKey


@dataclass
class ScanResult:
    root: str
    files: list[Found] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "rel (reason)"


def _key(st: os.stat_result) -> StatKey:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode)


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip("/") + "/")


def _read_gitignore(path: str) -> list[str]:
    try:
        with open(open_regular(path, follow_symlinks=True), encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except (FileNotFoundError, NotRegularFile):
        return []  # a FIFO named .gitignore is not read: opening it would wait for a writer
    except OSError as exc:
        raise SyncError(f"cannot read {path}: {exc.strerror}") from None


def scan(source: str, excludes: Excludes, *, gitignore: bool = False) -> ScanResult:
    """`source` must be a real (symlink-free) absolute path: a directory or a regular file."""
    if not _representable(source):
        raise SyncError(f"cannot sync {_printable(source)}: its path is not UTF-8")
    try:
        st = os.stat(source, follow_symlinks=False)
    except OSError as exc:
        raise SyncError(f"cannot read {source}: {exc.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        single = ScanResult(os.path.dirname(source), [Found(os.path.basename(source), source, _key(st))])
        if st.st_nlink > 1:
            _drop_outside_hardlinks(single, {(st.st_dev, st.st_ino): (st.st_nlink, {source})})
        return single
    if not stat.S_ISDIR(st.st_mode):
        raise SyncError(f"{source} is neither a directory nor a regular file")
    out = ScanResult(source)
    files = out.files
    # (device, inode) → (link count, paths met) of the regular files with more than one link
    linked: dict[tuple[int, int], tuple[int, set[str]]] = {}
    stack: list[tuple[str, str, Excludes]] = [(source, "", excludes)]
    while stack:
        directory, rel_dir, rules = stack.pop()
        if gitignore:
            lines = _read_gitignore(os.path.join(directory, ".gitignore"))
            if lines:
                rules = rules.child(rel_dir, lines)
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as exc:
            raise SyncError(f"cannot read directory {directory}: {exc.strerror}") from None
        screen = rules.file_screen()
        for entry in entries:
            name = entry.name
            rel = rel_dir + name
            if not name.isascii() and not _representable(name):
                out.skipped.append(f"{_printable(rel)} (file name is not UTF-8, not synced)")
                continue
            if entry.is_dir(follow_symlinks=False):
                if not rules.excluded(rel, True):
                    stack.append((entry.path, rel + "/", rules))
                continue
            if entry.is_symlink():
                _symlink(entry.path, rel, source, rules, out, linked)
                continue
            # The warm path walks 10,000s of files: most are decided by one regex call.
            if (screen is None or screen.fullmatch(name) is not None) and rules.excluded(rel, False):
                continue
            try:
                est = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted while we walked
            except OSError as exc:
                raise SyncError(f"cannot read {entry.path}: {exc.strerror}") from None
            if est.st_mode & 0o170000 == stat.S_IFREG:
                files.append(Found(rel, entry.path, (est.st_size, est.st_mtime_ns, est.st_ino, est.st_mode)))
                if est.st_nlink > 1:
                    _met(linked, est, entry.path)
            else:
                out.skipped.append(f"{rel} (not a regular file)")
    _drop_outside_hardlinks(out, linked)
    return out  # unordered: the manifest sorts


def _printable(rel: str) -> str:
    """A path for a report: bytes that are not UTF-8 shown as \\xNN escapes."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def _representable(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates (surrogateescape)
        return False
    return True


def _drop_outside_hardlinks(out: ScanResult, linked: dict[tuple[int, int], tuple[int, set[str]]]) -> None:
    """Skip the files whose inode has more links than the walk found among the synced files."""
    outside: set[str] = set()
    for nlink, paths in linked.values():
        if len(paths) < nlink:
            outside.update(paths)
    if not outside:
        return
    kept = []
    for found in out.files:
        if found.path in outside:
            out.skipped.append(f"{found.rel} (hard link to a file outside the synced files, not synced)")
        else:
            kept.append(found)
    out.files[:] = kept


def _met(linked: dict[tuple[int, int], tuple[int, set[str]]], st: os.stat_result, path: str) -> None:
    key = (st.st_dev, st.st_ino)
    entry = linked.get(key)
    if entry is None:
        linked[key] = (st.st_nlink, {path})
    else:
        entry[1].add(path)


def _symlink(
    path: str, rel: str, root: str, rules: Excludes, out: ScanResult,
    linked: dict[tuple[int, int], tuple[int, set[str]]],
) -> None:  # fmt: skip
    real = os.path.realpath(path)
    is_dir = os.path.isdir(real)
    if rules.excluded(rel, is_dir):
        return
    if not _inside(real, root):
        out.skipped.append(f"{rel} (symlink leaving the source, not followed)")
        return
    if is_dir:
        out.skipped.append(f"{rel} (symlink to a directory, not followed)")
        return
    try:
        st = os.stat(real)
    except OSError:
        out.skipped.append(f"{rel} (dangling symlink)")
        return
    if not stat.S_ISREG(st.st_mode):
        out.skipped.append(f"{rel} (symlink to a non-regular file)")
        return
    # Read through the resolved target (inside the source): its stat keys the cache, so editing it counts.
    out.files.append(Found(rel, real, _key(st)))
    if st.st_nlink > 1:
        _met(linked, st, real)
