"""`openat2(2)` through ctypes (Python has no wrapper): path walks that can never leave a root directory."""

from __future__ import annotations

import ctypes
import os
import platform

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

_SYSCALL = {"x86_64": 437, "aarch64": 437, "armv7l": 437, "ppc64le": 437, "s390x": 437, "riscv64": 437}


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_NR = _SYSCALL.get(platform.machine(), 437)


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """Open `path` relative to `dirfd` under the `resolve` restrictions; raises OSError."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _libc.syscall(
        ctypes.c_long(_NR),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


def open_dir_beneath(rootfd: int, path: str) -> int:
    """Open directory `path` under `rootfd`, refusing any symlink and any escape (`..` past the root)."""
    if not path or path == ".":
        return os.dup(rootfd)
    return openat2(
        rootfd, path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
    )
