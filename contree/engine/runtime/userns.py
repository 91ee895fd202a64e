"""User namespace support: root in a sandbox is an unprivileged uid range on the host (RUNTIME §9).

Layers stay on disk with their real (container) owners, so stores, inspect, import and archives need
no translation. A sandbox gets:

* a user namespace mapping container ids 0..SIZE-1 to host ids BASE..BASE+SIZE-1 (gids to their own
  base), the engine's own range from /etc/subuid and /etc/subgid (`subids.py`), which no user holds;
* its lower layers as *idmapped* detached mounts (`open_tree(OPEN_TREE_CLONE)` +
  `mount_setattr(MOUNT_ATTR_IDMAP)`), so a layer file owned by 0 shows up as host BASE, i.e. root
  inside. The overlay itself cannot be idmapped (EINVAL), and an idmapped upper fails (the mounter's
  uid 0 is unmapped there), so the upper stays plain: what the sandbox writes lands on disk as BASE+uid;
* `shift_in(upper)` before start (the engine's own writes: injected files, the cwd, the upper root) and
  `shift_out(upper)` before commit (back to container ids), so committed layers never hold host ids.

Whiteouts (char 0:0, made by overlay with the mounter's credentials) are never shifted. Layer ids at or
above SIZE show as 65534 inside and cannot be changed there; a process uid at or above SIZE is refused
by the runtime (setresuid: EINVAL). File capabilities set inside (v3, rootid BASE) are not translated.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from contree.fsutil import walk_entries

DEFAULT_SIZE = 65536

_SYS_OPEN_TREE = 428
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 0x1
_OPEN_TREE_CLOEXEC = 0o2000000
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_AT_FDCWD = -100
_MOUNT_ATTR_IDMAP = 0x00100000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class UsernsUnavailable(OSError):
    """The host cannot give sandboxes a user namespace; the message says why."""


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _syscall(nr: int, *args: object) -> int:
    res = int(_libc.syscall(ctypes.c_long(nr), *args))
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return res


def _userns_fd(base: int, gid_base: int, size: int) -> int:
    """An fd of a fresh user namespace mapping ids 0..size-1 to base.. (gids to gid_base..); it lives as
    long as the fd.

    A helper (`unshare -U sh`, util-linux) creates it and waits; we write its maps and keep
    /proc/<pid>/ns/user. A Python-level fork of this threaded process could deadlock in the child
    while holding copies of our fds (the engine's flock among them), so none is used.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        raise UsernsUnavailable(errno.ENOENT, "unshare not found: install the Debian package util-linux")
    proc = subprocess.Popen([unshare, "--user", "--", "/bin/sh", "-c", "echo ready; read x"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        if proc.stdout.readline() != b"ready\n":
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            raise UsernsUnavailable(errno.EPERM, f"cannot create a user namespace: {err or 'unshare failed'} "
                                    "(user.max_user_namespaces = 0?)")
        write_id_maps(proc.pid, base, gid_base, size)
        return os.open(f"/proc/{proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def write_id_maps(pid: int, base: int, gid_base: int, size: int) -> None:
    """Map ids 0..size-1 of the user namespace of process `pid` (made by us, so root may write any
    mapping) to host uids base.. and host gids gid_base.. ."""
    for name, start in (("uid_map", base), ("gid_map", gid_base)):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(f"0 {start} {size}\n")


def idmapped_clone(path: Path | str, userns_fd: int) -> int:
    """A detached, idmapped copy of the mount at `path`; usable as `/proc/self/fd/<fd>` until closed."""
    fd = _syscall(_SYS_OPEN_TREE, ctypes.c_int(_AT_FDCWD), os.fsencode(path),
                  ctypes.c_uint(_OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC))
    try:
        attr = _MountAttr(attr_set=_MOUNT_ATTR_IDMAP, userns_fd=userns_fd)
        _syscall(_SYS_MOUNT_SETATTR, ctypes.c_int(fd), b"", ctypes.c_uint(_AT_EMPTY_PATH),
                 ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class IdMap:
    """The engine's host id ranges for sandboxes plus the user namespace that idmaps lower layers."""
    base: int  # container uid u is host uid base+u
    gid_base: int  # container gid g is host gid gid_base+g
    size: int
    userns_fd: int

    @classmethod
    def create(cls, base: int, size: int = DEFAULT_SIZE,
               probe_dir: Path | None = None, gid_base: int | None = None) -> IdMap:
        """Detect support (user namespaces, and idmapped mounts on the filesystem of `probe_dir`, which
        should be where the layers live) and build the map (`gid_base` defaults to `base`)."""
        gid_base = base if gid_base is None else gid_base
        for start in (base, gid_base):
            if start <= 0 or size <= 0 or start + size > 2**32 - 2:
                raise UsernsUnavailable(errno.EINVAL, f"bad id range {start}+{size}")
        fd = _userns_fd(base, gid_base, size)
        try:
            if probe_dir is not None:
                probe_dir.mkdir(parents=True, exist_ok=True)
            probe = tempfile.mkdtemp(prefix="contree-idmap-probe-", dir=probe_dir)
            try:
                try:
                    os.close(idmapped_clone(probe, fd))
                except OSError as exc:
                    raise UsernsUnavailable(exc.errno or errno.EINVAL,
                                            f"idmapped mounts unsupported here: {exc.strerror}") from exc
            finally:
                os.rmdir(probe)
        except BaseException:
            os.close(fd)
            raise
        return cls(base=base, gid_base=gid_base, size=size, userns_fd=fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.userns_fd)

    @contextlib.contextmanager
    def lowers(self, paths: list[Path]) -> Iterator[list[Path]]:
        """Idmapped views of `paths` (as /proc/self/fd paths) while the overlay is being mounted.

        Overlay keeps its own private clones of the layers, so the fds may close right after mounting.
        """
        fds: list[int] = []
        try:
            for p in paths:
                fds.append(idmapped_clone(p, self.userns_fd))
            yield [Path(f"/proc/self/fd/{fd}") for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)

    def shift_in(self, upper: Path, merged: Path) -> int:
        """Move the engine's own writes (injected files, the cwd, the upper root: ids below `size`) into
        the sandbox's host range.

        The upper is walked to find them but each is chowned through the mounted `merged` view: overlay
        caches owners, so a change made behind its back would not be seen in the sandbox. Every path
        comes from a directory walk of the upper, so no symlink in the image is ever followed.
        """
        changed = 0
        for rel, st in _entries(upper):
            if _is_whiteout(st):
                continue
            uid = self.base + st.st_uid if st.st_uid < self.size else None
            gid = self.gid_base + st.st_gid if st.st_gid < self.size else None
            if uid is not None or gid is not None:
                _chown(os.path.join(merged, rel) if rel else os.fspath(merged), st, uid, gid)
                changed += 1
        return changed

    def shift_out(self, upper: Path) -> int:
        """Back to container ids before commit: BASE+u → u; ids outside the range are left alone."""
        return _shift(upper, _back(self.base, self.size), _back(self.gid_base, self.size))


def _back(base: int, size: int) -> Callable[[int], int | None]:
    return lambda i: i - base if base <= i < base + size else None


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _entries(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(path relative to root, lstat) for root ("") and everything below it."""
    top = os.fspath(root)
    yield "", os.lstat(top)
    for e in walk_entries(top):
        yield os.path.relpath(e.path, top), e.stat(follow_symlinks=False)


_FCAPS = "security.capability"
_FCAPS_V3 = 0x03000000  # VFS_CAP_REVISION_3: the xattr ends with the uid of the namespace's root


def _chown(path: str, st: os.stat_result, uid: int | None, gid: int | None,
           fn: Callable[[int], int | None] | None = None) -> None:
    caps = _file_caps(path, st)
    os.lchown(path, st.st_uid if uid is None else uid, st.st_gid if gid is None else gid)
    if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        os.chmod(path, stat.S_IMODE(st.st_mode))  # chown cleared setuid/setgid
    if caps is not None:
        os.setxattr(path, _FCAPS, _shift_caps_root(caps, fn), follow_symlinks=False)  # chown dropped them too


def _file_caps(path: str, st: os.stat_result) -> bytes | None:
    if not stat.S_ISREG(st.st_mode):
        return None
    try:
        return os.getxattr(path, _FCAPS, follow_symlinks=False)
    except OSError:
        return None


def _shift_caps_root(caps: bytes, fn: Callable[[int], int | None] | None) -> bytes:
    """File capabilities set inside a sandbox are v3 and name its root by host id (BASE+0): move that id
    like the owners (the kernel stores a root of 0 as v2, which every sandbox's root then owns)."""
    if fn is None or len(caps) != 24 or int.from_bytes(caps[:4], "little") & 0xFF000000 != _FCAPS_V3:
        return caps
    root = fn(int.from_bytes(caps[20:], "little"))
    return caps if root is None else caps[:20] + root.to_bytes(4, "little")


def _shift(root: Path, fn: Callable[[int], int | None], gid_fn: Callable[[int], int | None]) -> int:
    """lchown `root` and everything below it through `fn` (uids) and `gid_fn`; returns how many entries
    changed."""
    changed = 0
    for rel, st in _entries(root):
        if _is_whiteout(st):
            continue
        uid, gid = fn(st.st_uid), gid_fn(st.st_gid)
        if uid is not None or gid is not None:
            _chown(os.path.join(root, rel) if rel else os.fspath(root), st, uid, gid, fn)
            changed += 1
    return changed
