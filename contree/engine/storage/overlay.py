"""Overlay mounts through the new mount API (`fsopen` + `fsconfig(lowerdir+)`), see RUNTIME §6.1.

The legacy `mount(2)` option string is silently cut at one page, so a deep layer stack would mount
only part of an image. `lowerdir+` adds one layer per call with no length limit (kernel ≥ 6.8).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path

from contree.layerformat import needs_userxattr

MAX_LOWERS = 500  # the kernel's hard limit (`overlayfs: too many lower directories`)

# Syscall numbers are shared by every architecture for these (unified table since 5.x).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432

_FSOPEN_CLOEXEC = 0x1
_FSCONFIG_SET_FLAG = 0
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
_FSMOUNT_CLOEXEC = 0x1
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MOUNT_ATTR_NOEXEC = 0x8
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_MS_BIND = 0x1000


class OverlayError(OSError):
    """A mount or unmount failed; the message carries the kernel's own explanation when it gave one."""


_empty_lower_fd: int | None = None
_empty_lower_lock = threading.Lock()


def _empty_lower() -> str:
    """An empty layer: the root of a read-only tmpfs of this process's own, detached (never attached
    anywhere), kept open for the process's lifetime. Nothing of it is on disk, so nothing outlives the
    process: the kernel frees it with the last overlay that uses it (an empty dir under /tmp was left
    behind by every process)."""
    global _empty_lower_fd
    with _empty_lower_lock:
        if _empty_lower_fd is None:
            try:
                fsfd = _call(_SYS_FSOPEN, b"tmpfs", ctypes.c_uint(_FSOPEN_CLOEXEC))
            except OSError as exc:
                raise OverlayError(exc.errno, f"fsopen(tmpfs) for an empty layer: {exc.strerror}") from exc
            try:
                _set_string(fsfd, "mode", "0555")
                _set_string(fsfd, "size", "4k")
                _call(_SYS_FSCONFIG, ctypes.c_int(fsfd), ctypes.c_uint(_FSCONFIG_CMD_CREATE), None, None,
                      ctypes.c_int(0))
                _empty_lower_fd = _call(_SYS_FSMOUNT, ctypes.c_int(fsfd), ctypes.c_uint(_FSMOUNT_CLOEXEC),
                                        ctypes.c_uint(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NODEV
                                                      | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NOEXEC))
            except OSError as exc:
                raise OverlayError(exc.errno, f"an empty tmpfs layer: {exc.strerror}") from exc
            finally:
                os.close(fsfd)
        return f"/proc/self/fd/{_empty_lower_fd}"


def _call(nr: int, *args: object) -> int:
    res = int(_libc.syscall(ctypes.c_long(nr), *args))
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res


def _kernel_messages(fsfd: int) -> str:
    """Drain the fs context's log: overlayfs explains EINVAL there (e.g. the 500-layer limit)."""
    lines = []
    while True:
        try:
            msg = os.read(fsfd, 1024)
        except OSError:
            break
        if not msg:
            break
        lines.append(msg.decode(errors="replace").strip())
    return "; ".join(lines)


def _set_string(fsfd: int, key: str, value: str) -> None:
    _call(_SYS_FSCONFIG, ctypes.c_int(fsfd), ctypes.c_uint(_FSCONFIG_SET_STRING), key.encode(),
          value.encode(), ctypes.c_int(0))


def mount_overlay(
    lowers: Sequence[Path],
    upper: Path | None,
    work: Path | None,
    target: Path,
    *,
    readonly: bool = False,
    volatile: bool = True,
) -> None:
    """`open_overlay` attached on `target`."""
    _attach(open_overlay(lowers, upper, work, readonly=readonly, volatile=volatile, target=target), target)


def open_overlay(
    lowers: Sequence[Path],
    upper: Path | None,
    work: Path | None,
    *,
    readonly: bool = False,
    volatile: bool = True,
    target: Path | None = None,
) -> int:
    """A detached overlay mount of `lowers` (top layer first) with an optional upper/work pair: an fd
    usable as `/proc/self/fd/<fd>` (by this process and its children), unmounted when the last user of
    it is gone. `target` only names the mount in errors.

    `volatile` (with an upper): the overlay never syncs. Without it, unmounting syncs the whole
    filesystem that holds the upper (`ovl_sync_fs`), which costs 3 ms idle and 50 ms when other
    writers keep the disk busy, on every committing run. An upper here is a sandbox's scratch dir that
    is never mounted again after a crash (`recover()` deletes it), so syncing it buys nothing; a
    committed layer's data reaches the disk by normal writeback, like every other file the store does
    not fsync.

    Always `nodev` and `nosuid`: device nodes in an image never reach host devices, and a setuid file
    of an image is never setuid on the host, through this mount or any bind of it (binds keep the
    flags; inside a sandbox they change nothing, its processes run with no_new_privs). Without an upper
    the mount is read-only. A single lower without an upper gets an empty second lower, because
    overlayfs refuses a read-only mount of one layer ("at least 2 lowerdir are needed").
    """
    if not lowers:
        raise OverlayError(errno.EINVAL, "an overlay needs at least one lower layer")
    if len(lowers) > MAX_LOWERS:
        raise OverlayError(errno.EINVAL, f"{len(lowers)} lower layers exceed the kernel limit of "
                           f"{MAX_LOWERS}; squash the image first")
    if (upper is None) != (work is None):
        raise OverlayError(errno.EINVAL, "upper and work must be given together")
    if upper is None:
        readonly = True
        if len(lowers) == 1:
            lowers = [lowers[0], Path(_empty_lower())]
    try:
        fsfd = _call(_SYS_FSOPEN, b"overlay", ctypes.c_uint(_FSOPEN_CLOEXEC))
    except OSError as exc:
        raise OverlayError(exc.errno, f"fsopen(overlay) failed: {exc.strerror} "
                           "(needs kernel ≥ 6.8 and root)") from exc
    where = target if target is not None else "a detached mount"
    held: list[int] = []
    try:
        try:
            if needs_userxattr():  # a rootless engine: its metadata in user.overlay.* (layerformat.py)
                _call(_SYS_FSCONFIG, ctypes.c_int(fsfd), ctypes.c_uint(_FSCONFIG_SET_FLAG), b"userxattr",
                      None, ctypes.c_int(0))
            for layer in lowers:
                _set_string(fsfd, "lowerdir+", _by_fd(layer, held))
            if upper is not None and work is not None:
                _set_string(fsfd, "upperdir", _by_fd(upper, held))
                _set_string(fsfd, "workdir", _by_fd(work, held))
                if volatile:
                    _call(_SYS_FSCONFIG, ctypes.c_int(fsfd), ctypes.c_uint(_FSCONFIG_SET_FLAG), b"volatile",
                          None, ctypes.c_int(0))
            _call(_SYS_FSCONFIG, ctypes.c_int(fsfd), ctypes.c_uint(_FSCONFIG_CMD_CREATE), None, None,
                  ctypes.c_int(0))
        except OSError as exc:
            detail = _kernel_messages(fsfd)
            raise OverlayError(exc.errno, f"overlay mount on {where} failed: {exc.strerror}"
                               + (f" ({detail})" if detail else "")) from exc
        attrs = _MOUNT_ATTR_NODEV | _MOUNT_ATTR_NOSUID | (_MOUNT_ATTR_RDONLY if readonly else 0)
        try:
            mfd = _call(_SYS_FSMOUNT, ctypes.c_int(fsfd), ctypes.c_uint(_FSMOUNT_CLOEXEC),
                        ctypes.c_uint(attrs))
        except OSError as exc:
            raise OverlayError(exc.errno, f"fsmount failed: {exc.strerror}") from exc
    finally:
        os.close(fsfd)
        for fd in held:
            os.close(fd)
    return mfd


def _by_fd(path: Path, held: list[int]) -> str:
    """`path` as `/proc/self/fd/N` of an O_PATH fd kept in `held` until the mount is made.

    Overlay shows its layers in mountinfo as they were named, and a sandbox reads its own mountinfo:
    named this way, no path of the engine home (the user's name, the layout) reaches it."""
    name = os.fspath(path)
    if name.startswith("/proc/self/fd/"):
        return name
    try:
        fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise OverlayError(exc.errno or errno.EINVAL, f"overlay layer {name}: {exc.strerror}") from exc
    held.append(fd)
    return f"/proc/self/fd/{fd}"


def _attach(mfd: int, target: Path) -> None:
    """move_mount the detached mount `mfd` onto `target`, then close it."""
    try:
        _call(_SYS_MOVE_MOUNT, ctypes.c_int(mfd), b"", ctypes.c_int(-100), os.fsencode(target),
              ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH))
    except OSError as exc:
        raise OverlayError(exc.errno, f"move_mount to {target} failed: {exc.strerror}") from exc
    finally:
        os.close(mfd)


def mount_tmpfs(target: Path, *, mode: int = 0o700, size: str = "64m") -> None:
    """A fresh tmpfs on `target` (nosuid, nodev, noexec)."""
    try:
        fsfd = _call(_SYS_FSOPEN, b"tmpfs", ctypes.c_uint(_FSOPEN_CLOEXEC))
    except OSError as exc:
        raise OverlayError(exc.errno, f"fsopen(tmpfs) failed: {exc.strerror}") from exc
    try:
        try:
            _set_string(fsfd, "mode", f"{mode:o}")
            _set_string(fsfd, "size", size)
            _call(_SYS_FSCONFIG, ctypes.c_int(fsfd), ctypes.c_uint(_FSCONFIG_CMD_CREATE), None, None,
                  ctypes.c_int(0))
            mfd = _call(_SYS_FSMOUNT, ctypes.c_int(fsfd), ctypes.c_uint(_FSMOUNT_CLOEXEC),
                        ctypes.c_uint(_MOUNT_ATTR_NODEV | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NOEXEC))
        except OSError as exc:
            raise OverlayError(exc.errno, f"tmpfs on {target} failed: {exc.strerror}") from exc
    finally:
        os.close(fsfd)
    _attach(mfd, target)


def bind_mount(source: Path, target: Path) -> None:
    """Bind `source` (not its submounts) on `target`, an existing directory (a file for a file)."""
    if _libc.mount(os.fsencode(source), os.fsencode(target), None, _MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise OverlayError(err, f"bind mount of {source} on {target} failed: {os.strerror(err)}")


def unmount(target: Path) -> None:
    """Unmount `target`; when it is busy, detach it lazily so the caller can go on."""
    path = os.fsencode(target)
    if _libc.umount2(path, 0) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EINVAL and not is_mountpoint(target):
        return
    if err == errno.EBUSY and _libc.umount2(path, _MNT_DETACH) == 0:
        return
    err = ctypes.get_errno()
    raise OverlayError(err, f"umount {target} failed: {os.strerror(err)}")


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below `root`, deepest first (so they can be unmounted in order)."""
    prefix = os.path.realpath(root)
    found: list[Path] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 5:
                continue
            point = _unescape(fields[4])
            if point == prefix or point.startswith(prefix.rstrip("/") + "/"):
                found.append(Path(point))
    found.sort(key=lambda p: len(p.parts), reverse=True)
    return found


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_mountpoint(path: Path) -> bool:
    return Path(os.path.realpath(path)) in mounts_under(path)
