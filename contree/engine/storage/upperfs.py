"""The filesystem a run's writable layer lives on, sized so the kernel enforces `max_layer_bytes`.

Each sandbox dir is a tmpfs with `size=` (file data) and `nr_inodes=` (entries: files, directories,
links, whiteouts), so a write past the limit fails with ENOSPC as it happens; nothing is polled and the
host's disk is never touched by a run. The price: the upper's pages are memory, charged to the memory
cgroup of the process that writes them, so a run's changes share its memory limit (the effective
layer limit is the smaller of the two) and the engine's total budget bounds every run's changes
together. A commit copies the finished upper into the store (`copy_layer`), checking the size it will
take there before writing anything.

Why tmpfs (docs/contracts.md §4.4 has the measurements): this kernel has no XFS or ext4 quota support,
the store's ext4 has no project quota, and a loop filesystem per run costs a mkfs; btrfs subvolume
quotas keep the commit a rename but need the whole store on a loop image that grows with every metadata
rewrite (a 1 MB-limited run grew it by 275 MB until trimmed).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import Path

import msgspec

from contree.errors import Unprocessable
from contree.fsutil import walk_entries
from contree.layerformat import is_overlay_xattr, opaque_xattr

ENTRY_BYTES = 4096  # an entry costs at least one block of the store's filesystem (a directory: exactly)
# Room for the tmpfs root, upper/, work/, rootfs/ and overlay's own entries in work/ (9 on 6.18) until
# `seal` fixes the count once the overlay is mounted.
RESERVED_INODES = 32
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_REMOUNT = 0x20
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]


MEMORY_HEADROOM = 16 << 20  # at least this much of a run's memory stays for its processes


def limit_for(asked: int, memory: int | None, cap: int | None = None) -> tuple[int, str]:
    """The layer limit of a run that asked for `asked` bytes under a memory limit of `memory` (or, with
    none, under `cap`), and how errors name it. The layer's pages are the run's memory: it gets its
    memory limit minus room for its processes, so a writer that runs out meets ENOSPC, not the OOM
    killer."""
    if memory is not None:
        cap = memory - max(MEMORY_HEADROOM, memory // 8)
    limit = asked if cap is None else max(1, min(asked, cap))
    text = f"max_layer_bytes={limit}"
    if limit < asked:
        text += (f" (of {asked} asked: a run's changes are held in memory and get its memory limit, "
                 f"{memory if memory is not None else cap}, minus room for its processes)")
    return limit, text


class LayerTooLarge(Unprocessable):
    """The run's filesystem changes exceed `max_layer_bytes`."""


class LayerBudget(msgspec.Struct, kw_only=True, frozen=True):
    """What one run may store: `max_bytes` of file data and `max_entries` entries."""

    max_bytes: int
    max_entries: int

    @classmethod
    def for_limit(cls, max_layer_bytes: int) -> LayerBudget:
        return cls(max_bytes=max_layer_bytes, max_entries=max_layer_bytes // ENTRY_BYTES)


class LayerUsage(msgspec.Struct, kw_only=True, frozen=True):
    bytes: int
    entries: int
    bytes_full: bool  # a write of file data was (or would now be) refused
    entries_full: bool  # creating an entry was (or would now be) refused


def mount(path: Path, budget: LayerBudget) -> None:
    """Put a tmpfs sized by `budget` on `path` (an existing directory) with empty `upper/`, `work/` and
    `rootfs/` in it."""
    # size= is rounded up to whole pages; 0 would mean "unlimited" to tmpfs.
    opts = f"size={max(budget.max_bytes, 1)},nr_inodes={budget.max_entries + RESERVED_INODES},mode=0700"
    if _libc.mount(b"contree-layer", os.fsencode(path), b"tmpfs", _MS_NOSUID | _MS_NODEV, opts.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot mount the layer filesystem on {path}: {os.strerror(err)}")
    for sub in ("upper", "work", "rootfs"):
        (path / sub).mkdir()


def seal(path: Path, budget: LayerBudget) -> None:
    """Once the overlay is mounted on the layer filesystem: leave exactly `budget.max_entries` entries
    free (what overlay made in work/ is not the run's)."""
    st = os.statvfs(path)
    opts = f"nr_inodes={st.f_files - st.f_ffree + budget.max_entries}"
    if _libc.mount(None, os.fsencode(path), None, _MS_REMOUNT | _MS_NOSUID | _MS_NODEV, opts.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot resize the layer filesystem on {path}: {os.strerror(err)}")


def usage(path: Path, budget: LayerBudget) -> LayerUsage:
    """How much of the (sealed) layer filesystem on `path` is used (O(1): the kernel's own counters)."""
    st = os.statvfs(path)
    return LayerUsage(bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
                      entries=max(0, budget.max_entries - st.f_ffree),
                      bytes_full=st.f_bfree == 0, entries_full=st.f_ffree == 0)


def over_limit(used: LayerUsage, budget: LayerBudget, limit: str) -> str | None:
    """The run's error when it ran into its layer limit (`limit` says which: "max_layer_bytes=N …")."""
    if used.bytes_full:
        return (f"the run's filesystem changes reached {limit}: {used.bytes} bytes of file data; writes "
                "beyond it failed with ENOSPC")
    if used.entries_full:
        return (f"the run's filesystem changes reached {limit}: {budget.max_entries} entries (files, "
                f"directories, links, deletions; one per {ENTRY_BYTES} bytes of the limit); creating more "
                "failed with ENOSPC")
    return None


# ---- the commit: the finished upper into the store ----


def _keep_xattr(name: str) -> bool:
    """Overlay bookkeeping (origin, impure, uuid, …) is dropped; `opaque` is the layer's content."""
    return not is_overlay_xattr(name) or name == opaque_xattr()


def layer_size(upper: Path) -> tuple[int, int]:
    """(apparent bytes of files and links, hardlinks once; bytes the tree takes on the store's
    filesystem: allocated blocks, holes excluded, plus `ENTRY_BYTES` per directory)."""
    seen: set[tuple[int, int]] = set()
    apparent = stored = 0
    for entry in walk_entries(os.fspath(upper)):
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            stored += ENTRY_BYTES
        elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            apparent += st.st_size
            stored += st.st_blocks * 512
    return apparent, stored


def copy_layer(upper: Path, dest: Path, max_layer_bytes: int | None = None) -> int:
    """Copy a finished upper dir (unmounted overlay, `work/` gone) to `dest` (absent; on the store's
    filesystem) as a layer: owners, modes, times, hardlinks, holes, symlinks, device nodes (whiteouts),
    fifos and xattrs, minus overlay bookkeeping except `opaque`. Returns the apparent size.

    Raises `LayerTooLarge` before writing anything when the layer would take more than `max_layer_bytes`
    there. On any failure `dest` may hold a partial tree: the caller stages it and removes it.
    """
    apparent, stored = layer_size(upper)
    if max_layer_bytes is not None and stored > max_layer_bytes:
        raise LayerTooLarge(f"the run's filesystem changes take {stored} bytes (file blocks plus "
                            f"{ENTRY_BYTES} per directory), above max_layer_bytes={max_layer_bytes}")
    src_root = os.fspath(upper)
    dst_root = os.fspath(dest)
    os.mkdir(dst_root, 0o700)
    links: dict[tuple[int, int], str] = {}
    dirs: list[tuple[str, os.stat_result]] = [(dst_root, os.lstat(src_root))]
    _copy_xattrs(src_root, dst_root)
    for entry in walk_entries(src_root):
        target = dst_root + entry.path[len(src_root):]
        st = entry.stat(follow_symlinks=False)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            os.mkdir(target, 0o700)
            dirs.append((target, st))  # owner, mode and times once its children are in
            _copy_xattrs(entry.path, target)
            continue
        if stat.S_ISREG(mode) and st.st_nlink > 1:
            first = links.setdefault((st.st_dev, st.st_ino), target)
            if first != target:
                os.link(first, target)
                continue
        if stat.S_ISREG(mode):
            _copy_file(entry.path, target, st)
            continue
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(entry.path), target)
        else:  # whiteouts (char 0:0), other device nodes, fifos, sockets
            os.mknod(target, stat.S_IFMT(mode) | 0o600, st.st_rdev)
        _set_owner_mode(target, st)
        _copy_xattrs(entry.path, target)  # after chown, which drops security.capability
        _set_times(target, st)
    for path, st in reversed(dirs):  # deepest first: a parent's times are set after its children
        _set_owner_mode(path, st)
        _set_times(path, st)
    return apparent


def _copy_file(src: str, dst: str, st: os.stat_result) -> None:
    """Data (holes stay holes: SEEK_DATA/SEEK_HOLE), owner, mode, xattrs and times, all on the open
    descriptors: creating files is what a commit spends its time on."""
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if st.st_blocks * 512 >= st.st_size:  # no holes: one stream
                _send(fout, fin, 0, st.st_size)
            else:
                _copy_data_segments(fin, fout, st.st_size)
                os.ftruncate(fout, st.st_size)
            os.fchown(fout, st.st_uid, st.st_gid)
            os.fchmod(fout, stat.S_IMODE(st.st_mode))  # after chown, which clears setuid/setgid
            _copy_xattrs(fin, fout)  # after chown, which drops security.capability
            os.utime(fout, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def _send(fout: int, fin: int, start: int, end: int) -> None:
    while start < end:
        sent = os.sendfile(fout, fin, start, end - start)
        if sent == 0:
            raise OSError(errno.EIO, "the file shrank while the layer was copied")
        start += sent


def _copy_data_segments(fin: int, fout: int, size: int) -> None:
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fin, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        end = os.lseek(fin, start, os.SEEK_HOLE)
        os.lseek(fout, start, os.SEEK_SET)
        _send(fout, fin, start, end)
        pos = end


def _copy_xattrs(src: str | int, dst: str | int) -> None:
    """Paths are not followed (symlinks); descriptors are what they are."""
    nofollow = {} if isinstance(src, int) else {"follow_symlinks": False}
    try:
        names = os.listxattr(src, **nofollow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for name in names:
        if _keep_xattr(name):
            os.setxattr(dst, name, os.getxattr(src, name, **nofollow), **nofollow)


def _set_owner_mode(path: str, st: os.stat_result) -> None:
    os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(path, stat.S_IMODE(st.st_mode))  # after chown, which clears setuid/setgid


def _set_times(path: str, st: os.stat_result) -> None:
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
