"""Safe extraction of one OCI/Docker layer tarball into an overlay-format layer directory.

OCI whiteouts become overlay whiteouts (`.wh.NAME` → char device 0:0, `.wh..wh..opq` → the opaque xattr,
`trusted.overlay.opaque=y` or a rootless engine's `user.overlay.opaque=y`). Every entry is created relative
to a directory fd obtained with
`openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so neither `..`, nor a symlink planted by an earlier entry,
nor a hardlink can make the extraction touch anything outside the layer directory. Device nodes are
dropped (a sandbox must never inherit host devices from an image), `..` components, hardlinks that leave
the layer and entries under a symlinked parent fail the import, and caps on the decompressed size, the
entry count and path length stop tar bombs. Owners, modes, mtimes and xattrs (PAX `SCHILY.xattr.*`) are
kept. Runs synchronously: call it in a worker thread.
"""

from __future__ import annotations

import errno
import functools
import gzip
import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
import threading
import zlib
from collections.abc import Callable
from typing import IO, Any

import msgspec

from contree.errors import Unprocessable
from contree.layerformat import opaque_xattr
from contree.openat2 import open_dir_beneath

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
COPY_CHUNK = 1024 * 1024
# xattr namespaces an image may not set: overlay's own metadata (trusted.* for a root engine, user.overlay.*
# for a rootless one) and other trusted.* keys change what the kernel does with the layer; SELinux labels
# belong to the host policy.
_FORBIDDEN_XATTR_PREFIXES = ("trusted.", "user.overlay.", "security.selinux")


class UnsafeLayer(Unprocessable):
    """A layer entry that would write outside the layer or is otherwise hostile."""


class LayerTooLarge(Unprocessable):
    """A layer exceeds the size / entry caps (tar bomb protection)."""


class ExtractLimits(msgspec.Struct, frozen=True, kw_only=True):
    max_bytes: int = 16 * 1024**3  # decompressed tar stream
    max_entries: int = 2_000_000
    max_path: int = 4096


class LayerStats(msgspec.Struct, kw_only=True):
    entries: int = 0
    bytes: int = 0  # decompressed tar size
    file_bytes: int = 0  # regular file content
    diff_id: str = ""  # sha256 of the decompressed tar
    skipped_devices: int = 0
    unmapped_owners: int = 0  # rootless engine: owners beyond its ids became nobody (65534) or root
    whiteouts: int = 0
    opaque_dirs: int = 0


class _HashingReader:
    """Counts and hashes the decompressed stream; enforces the decompressed-size cap.

    Seekable forward only (a forward seek reads and hashes the skipped bytes), which is all `tarfile`'s
    random-access mode needs; that mode copies far less than its stream mode.
    """

    def __init__(self, inner: IO[bytes], limit: int) -> None:
        self._inner = inner
        self._limit = limit
        self.total = 0
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.total

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset if whence == 0 else self.total + offset if whence == 1 else -1
        if target < self.total:
            raise UnsafeLayer("layer archive needs a backward seek (malformed tar)")
        while self.total < target:
            if not self.read(min(COPY_CHUNK, target - self.total)):
                break
        return self.total

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size if size is not None and size >= 0 else COPY_CHUNK)
        if data:
            self.total += len(data)
            if self.total > self._limit:
                raise LayerTooLarge(f"layer decompresses to more than {self._limit} bytes")
            self.sha.update(data)
        return data

    def drain(self) -> None:
        # Trailing zero blocks after the end-of-archive marker are part of the diff id.
        while self.read(COPY_CHUNK):
            pass


class _Decompressed:
    """Context manager: a decompressed byte stream for a layer blob (gzip, zstd or plain tar)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._raw: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.stream: Any = None

    def __enter__(self) -> Any:
        raw = open(self.path, "rb")
        self._raw = raw
        magic = raw.read(4)
        raw.seek(0)
        if magic[:2] == GZIP_MAGIC:
            # In-process zlib releases the GIL and measured faster than a `gzip -dc` child.
            self.stream = gzip.GzipFile(fileobj=raw, mode="rb")
        elif magic == ZSTD_MAGIC:
            self.stream = self._zstd(raw)
        else:
            self.stream = raw
        return self.stream

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.path, "rb", buffering=0) as src:  # the child gets its own offset
            return subprocess.Popen(argv, stdin=src, stdout=subprocess.PIPE, bufsize=COPY_CHUNK)

    def _zstd(self, raw: IO[bytes]) -> Any:
        try:
            import zstandard  # optional; the Debian zstd binary is the fallback
        except ImportError:
            pass
        else:
            return zstandard.ZstdDecompressor().stream_reader(raw, read_size=COPY_CHUNK)
        binary = shutil.which("zstd")
        if binary is None:
            raise Unprocessable(
                "zstd-compressed layer: install the Debian package 'zstd' (or Python 'zstandard')"
            )
        self._proc = self._spawn([binary, "-dcq"])
        assert self._proc.stdout is not None
        return self._proc.stdout

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            if self._proc.stdout:
                self._proc.stdout.close()
        if self.stream is not None and self.stream is not self._raw:
            self.stream.close()
        if self._raw is not None:
            self._raw.close()

    def check_ok(self) -> None:
        if self._proc is not None:
            assert self._proc.stdout is not None
            self._proc.stdout.read()
            if self._proc.wait() != 0:
                raise Unprocessable("corrupt compressed layer (decompressor failed)")


def write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (signals, nearly full disks); never drop the rest."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _normalise(name: str, limits: ExtractLimits) -> str:
    """Layer-relative path without leading `/` or `./`; '' for the root; raises on `..`."""
    if "\x00" in name:
        raise UnsafeLayer(f"entry name with NUL byte: {name!r}")
    if len(name) > limits.max_path:
        raise UnsafeLayer(f"entry path longer than {limits.max_path} bytes")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayer(f"entry escapes the layer with '..': {name!r}")
    return "/".join(parts)


class _Extractor:
    def __init__(self, rootfd: int, limits: ExtractLimits, reader: _HashingReader | None = None) -> None:
        self.reader = reader
        self.rootfd = rootfd
        self.limits = limits
        self.is_root = os.geteuid() == 0
        # New entries already belong to us (directories get no setgid bit until `finish`), so
        # a chown to these ids would be a wasted syscall per file.
        self.creator = (os.geteuid(), os.getegid())
        self.stats = LayerStats()
        self._dirfds: dict[str, int] = {}
        self._dir_meta: list[tuple[str, tarfile.TarInfo]] = []

    # ---- directory fds ------------------------------------------------------------------------

    def close(self) -> None:
        for fd in self._dirfds.values():
            os.close(fd)
        self._dirfds.clear()

    def _forget(self, path: str) -> None:
        """Drop cached fds of `path` and below (the tree is being removed)."""
        for key in [k for k in self._dirfds if k == path or k.startswith(path + "/")]:
            os.close(self._dirfds.pop(key))

    def parent_fd(self, parent: str) -> int:
        """An fd of directory `parent`, creating missing components; never through a symlink."""
        fd = self._dirfds.get(parent)
        if fd is not None:
            return fd
        try:
            fd = open_dir_beneath(self.rootfd, parent)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeLayer(f"entry under a symlinked parent: {parent!r}") from None
            if exc.errno == errno.EXDEV:
                raise UnsafeLayer(f"entry escapes the layer: {parent!r}") from None
            if exc.errno == errno.ENOTDIR:
                raise UnsafeLayer(f"entry under a non-directory: {parent!r}") from None
            if exc.errno != errno.ENOENT:
                raise
            fd = self._make_parents(parent)
        if len(self._dirfds) >= 64:
            old = next(iter(self._dirfds))
            os.close(self._dirfds.pop(old))
        self._dirfds[parent] = fd
        return fd

    def _make_parents(self, parent: str) -> int:
        fd = os.dup(self.rootfd)
        try:
            for comp in parent.split("/"):
                try:
                    os.mkdir(comp, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                try:
                    nfd = os.open(
                        comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                    )
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafeLayer(
                            f"entry under a symlinked or non-directory parent: {parent!r}"
                        ) from None
                    raise
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    # ---- entries ------------------------------------------------------------------------------

    def _clear(self, pfd: int, parent: str, base: str, *, keep_dir: bool) -> bool:
        """Remove an existing entry `base` (later tar entries win). → True when a dir was kept."""
        try:
            st = os.lstat(base, dir_fd=pfd)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self._forget(f"{parent}/{base}" if parent else base)
            shutil.rmtree(base, dir_fd=pfd)
        else:
            os.unlink(base, dir_fd=pfd)
        return False

    def entry(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.stats.entries += 1
        if self.stats.entries > self.limits.max_entries:
            raise LayerTooLarge(f"layer has more than {self.limits.max_entries} entries")
        path = _normalise(member.name, self.limits)
        if not path:
            return  # the layer root itself: owned by the store
        parent, _, base = path.rpartition("/")
        if base.startswith(WHITEOUT):
            self._whiteout(parent, base)
            return
        if member.ischr() or member.isblk():
            self.stats.skipped_devices += 1
            return
        pfd = self.parent_fd(parent)
        if member.isdir():
            if not self._clear(pfd, parent, base, keep_dir=True):
                os.mkdir(base, 0o700, dir_fd=pfd)
            self._dir_meta.append((path, member))
            return
        self._clear(pfd, parent, base, keep_dir=False)
        if member.isreg():
            self._file(tf, member, pfd, base)
        elif member.issym():
            os.symlink(member.linkname, base, dir_fd=pfd)
            self._meta_nofollow(pfd, base, member)
        elif member.islnk():
            self._hardlink(member, pfd, base)
        elif member.isfifo():
            os.mkfifo(base, 0o600, dir_fd=pfd)
            self._meta_nofollow(pfd, base, member)
        else:
            raise UnsafeLayer(f"unsupported tar entry type {member.type!r} for {path!r}")

    def _whiteout(self, parent: str, base: str) -> None:
        pfd = self.parent_fd(parent)
        if base == OPAQUE:
            os.setxattr(f"/proc/self/fd/{pfd}", opaque_xattr(), b"y")
            self.stats.opaque_dirs += 1
            return
        if base.startswith(WHITEOUT + WHITEOUT):
            return  # other AUFS metadata (.wh..wh.plnk, …) has no overlay meaning
        target = base[len(WHITEOUT) :]
        if not target:
            raise UnsafeLayer(f"empty whiteout name under {parent!r}")
        self._clear(pfd, parent, target, keep_dir=False)
        try:
            os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=pfd)
        except PermissionError:
            raise Unprocessable(
                "creating overlay whiteouts needs CAP_MKNOD (run the engine as root)"
            ) from None
        self.stats.whiteouts += 1

    def _mode(self, member: tarfile.TarInfo) -> int:
        mode = member.mode & 0o7777
        if not self.is_root:
            mode &= ~(stat.S_ISUID | stat.S_ISGID)  # cannot keep the owner: drop privilege bits
        return mode

    def _xattrs(self, member: tarfile.TarInfo) -> list[tuple[str, bytes]]:
        out = []
        for key, value in member.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            name = key[len("SCHILY.xattr.") :]
            if name.startswith(_FORBIDDEN_XATTR_PREFIXES):
                continue
            out.append((name, value.encode("utf-8", "surrogateescape")))
        return out

    def _file(self, tf: tarfile.TarFile, member: tarfile.TarInfo, pfd: int, base: str) -> None:
        fd = os.open(
            base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd
        )
        try:
            reader = self.reader
            # Plain members are read straight from the decompressed stream (one copy less than
            # tarfile's file object); sparse members go through tarfile, which knows their map.
            direct = reader is not None and member.sparse is None and reader.tell() == member.offset_data
            src: Any = reader if direct else tf.extractfile(member)
            if src is not None:
                remaining = member.size
                while remaining > 0:
                    chunk = src.read(min(COPY_CHUNK, remaining))
                    if not chunk:
                        raise Unprocessable(f"truncated layer: {member.name!r} ends early")
                    write_all(fd, chunk)
                    remaining -= len(chunk)
            self.stats.file_bytes += member.size
            if self.is_root and (member.uid, member.gid) != self.creator:
                self._chown(member, functools.partial(os.fchown, fd))
            os.fchmod(fd, self._mode(member))
            for name, value in self._xattrs(member):
                self._setxattr(f"/proc/self/fd/{fd}", name, value, follow=True)
            os.utime(fd, ns=(int(member.mtime * 1e9), int(member.mtime * 1e9)))
        finally:
            os.close(fd)

    def _chown(self, member: tarfile.TarInfo, chown: Callable[[int, int], None]) -> None:
        """`chown(member.uid, member.gid)`. Inside a rootless engine's user namespace an id it does not map
        is refused (EINVAL): such an owner becomes nobody (65534), as a root engine's sandboxes see it,
        or root when the engine maps no more than that (docs/rootless.md)."""
        try:
            chown(member.uid, member.gid)
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        self.stats.unmapped_owners += 1
        for fallback in (65534, 0):
            try:
                chown(member.uid if member.uid < fallback else fallback,
                      member.gid if member.gid < fallback else fallback)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise

    def _setxattr(self, path: str, name: str, value: bytes, *, follow: bool) -> None:
        try:
            os.setxattr(path, name, value, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.EINVAL):
                raise

    def _meta_nofollow(self, pfd: int, base: str, member: tarfile.TarInfo) -> None:
        if self.is_root and (member.uid, member.gid) != self.creator:
            self._chown(member, lambda uid, gid: os.chown(base, uid, gid, dir_fd=pfd, follow_symlinks=False))
        if not member.issym():
            os.chmod(base, self._mode(member), dir_fd=pfd, follow_symlinks=False)
        mtime = int(member.mtime * 1e9)
        os.utime(base, ns=(mtime, mtime), dir_fd=pfd, follow_symlinks=False)

    def _hardlink(self, member: tarfile.TarInfo, pfd: int, base: str) -> None:
        target = _normalise(member.linkname, self.limits)
        if not target:
            raise UnsafeLayer(f"hardlink {member.name!r} to the layer root")
        tparent, _, tbase = target.rpartition("/")
        try:
            tfd = open_dir_beneath(self.rootfd, tparent)
        except OSError:
            raise UnsafeLayer(
                f"hardlink {member.name!r} points outside the layer: {member.linkname!r}"
            ) from None
        try:
            try:
                st = os.lstat(tbase, dir_fd=tfd)
            except FileNotFoundError:
                raise UnsafeLayer(
                    f"hardlink {member.name!r} points outside the layer: {member.linkname!r}"
                ) from None
            if stat.S_ISDIR(st.st_mode) or (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
                raise UnsafeLayer(f"hardlink {member.name!r} to a directory or whiteout")
            os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(tfd)

    def finish(self) -> None:
        """Apply directory owners, modes, xattrs and mtimes last (children changed them meanwhile)."""
        self.close()
        for path, member in reversed(self._dir_meta):
            try:
                fd = open_dir_beneath(self.rootfd, path)
            except OSError:
                continue  # replaced by a later entry (a file or symlink): nothing to apply
            try:
                if self.is_root:
                    self._chown(member, functools.partial(os.fchown, fd))
                os.fchmod(fd, self._mode(member))
                for name, value in self._xattrs(member):
                    self._setxattr(f"/proc/self/fd/{fd}", name, value, follow=True)
                mtime = int(member.mtime * 1e9)
                os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)


class ExtractionStopped(Exception):
    """`stop` was set while extracting (the import was cancelled)."""


def extract_layer(
    blob_path: str, dest: str, limits: ExtractLimits | None = None, stop: threading.Event | None = None
) -> LayerStats:
    """Unpack the layer blob at `blob_path` into the existing empty directory `dest`.

    `stop` is polled between entries so a cancelled import does not wait for a whole layer.
    """
    limits = limits or ExtractLimits()
    rootfd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    extractor = _Extractor(rootfd, limits)
    try:
        decompressed = _Decompressed(blob_path)
        with decompressed as stream:
            reader = _HashingReader(stream, limits.max_bytes)
            extractor.reader = reader
            try:
                with tarfile.open(fileobj=reader, mode="r:") as tf:  # type: ignore[call-overload]
                    while (member := tf.next()) is not None:
                        tf.members.clear()  # TarFile keeps every header otherwise (millions of entries)
                        if stop is not None and stop.is_set():
                            raise ExtractionStopped("extraction stopped")
                        try:
                            extractor.entry(tf, member)
                        except OSError as exc:
                            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                                raise
                            raise Unprocessable(
                                f"cannot unpack layer entry {member.name!r}: {exc.strerror}"
                            ) from None
                reader.drain()
            except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno is not None:
                    raise
                raise Unprocessable(f"corrupt layer archive: {exc}") from None
            except Exception as exc:
                if type(exc).__name__ == "ZstdError":
                    raise Unprocessable(f"corrupt zstd layer: {exc}") from None
                raise
            decompressed.check_ok()
        extractor.finish()
        extractor.stats.bytes = reader.total
        extractor.stats.diff_id = "sha256:" + reader.sha.hexdigest()
        return extractor.stats
    finally:
        extractor.close()
        os.close(rootfd)
