"""Inspect an image without a sandbox (CONTREE-API §12): list, download, archive, grep.

Everything but grep reads through the userspace resolver (`Store.resolver`), so every path and symlink
resolves inside the image. grep runs ripgrep over a detached read-only overlay mount of the image, on search
roots first resolved inside the image (ripgrep itself never follows a symlink); without `rg` a Python
`re` search over the resolver gives the same result shape (regex dialects differ slightly).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fnmatch
import os
import re
import shutil
import stat
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

import msgspec

from contree import api
from contree.backend import GrepQuery
from contree.engine.storage.overlay import open_overlay
from contree.engine.storage.resolver import Node, Resolver, normalize
from contree.engine.storage.store import ImageRecord, Store
from contree.errors import BadRequest, NotFound, Unprocessable
from contree.layerformat import is_overlay_xattr

CHUNK = 256 * 1024
_BLOCK = 512
_RECORD = 20 * _BLOCK


def _lookup(r: Resolver, path: str) -> Node:
    """The entry at `path` (symlinks followed, inside the image) with API errors."""
    if not path or "\x00" in path:
        raise BadRequest(f"invalid path {path!r}")
    try:
        return r.lookup(path, follow=True)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound(f"{normalize(path)}: no such file or directory in the image") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Unprocessable(f"{normalize(path)}: too many levels of symbolic links") from None
        raise


# ---- names of owners ------------------------------------------------------------------------------------


def _id_names(r: Resolver, path: str) -> dict[int, str]:
    """uid/gid → name from the image's own /etc/passwd or /etc/group (never the host's)."""
    try:
        text = r.read_bytes(path)[: 1 << 20].decode(errors="replace")
    except OSError:
        return {}
    out: dict[int, str] = {}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[2].isdigit():
            out.setdefault(int(fields[2]), fields[0])
    return out


# ---- list -----------------------------------------------------------------------------------------------


def _item(r: Resolver, name: str, node: Node, users: dict[int, str], groups: dict[int, str]) -> api.FileItem:
    st = node.st
    mode = st.st_mode
    return api.FileItem(
        size=st.st_size, path=name, owner=users.get(st.st_uid, st.st_uid),
        group=groups.get(st.st_gid, st.st_gid),
        mode=mode, mtime=int(st.st_mtime), nlink=st.st_nlink, uid=st.st_uid, gid=st.st_gid,
        is_dir=stat.S_ISDIR(mode), is_regular=stat.S_ISREG(mode), is_symlink=stat.S_ISLNK(mode),
        is_socket=stat.S_ISSOCK(mode), is_fifo=stat.S_ISFIFO(mode),
        symlink_to=r.readlink(node) if stat.S_ISLNK(mode) else "",
    )


def _listing(store: Store, image: ImageRecord, path: str) -> tuple[Resolver, list[tuple[str, Node]]]:
    r = store.resolver(image)
    node = _lookup(r, path)
    if not node.is_dir:
        raise Unprocessable(f"{normalize(path)} is not a directory")
    return r, r.listdir(node)


def list_directory(store: Store, image: ImageRecord, path: str) -> api.DirectoryList:
    r, entries = _listing(store, image, path)
    users, groups = _id_names(r, "/etc/passwd"), _id_names(r, "/etc/group")
    files = [_item(r, n, node, users, groups) for n, node in entries]
    return api.DirectoryList(path=normalize(path), files=files)


def human_size(n: int) -> str:
    """`ls -lh` style: 512, 4.0K, 1.2M."""
    if n < 1024:
        return str(n)
    value = float(n)
    for unit in "KMGTPE":
        value /= 1024
        if value < 10:
            return f"{value:.1f}{unit}"
        if value < 1024 or unit == "E":
            return f"{value:.0f}{unit}"
    return str(n)


def list_directory_text(store: Store, image: ImageRecord, path: str) -> str:
    """An `ls -l`-like listing: `total <size>`, then one line per entry, owner and group numeric."""
    r, entries = _listing(store, image, path)
    lines = [f"total {human_size(sum(node.st.st_size for _, node in entries))}"]
    rows = []
    for name, node in entries:
        st = node.st
        when = time.strftime("%b %d %H:%M", time.gmtime(st.st_mtime))
        shown = f"{name} -> {r.readlink(node)}" if node.is_symlink else name
        rows.append((stat.filemode(st.st_mode), str(st.st_nlink), str(st.st_uid), str(st.st_gid),
                     human_size(st.st_size), when, shown))
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(5)]
    for row in rows:
        lines.append(f"{row[0]} {row[1]:>{widths[1]}} {row[2]:<{widths[2]}} {row[3]:<{widths[3]}} "
                     f"{row[4]:>{widths[4]}} {row[5]} {row[6]}")
    return "\n".join(lines) + "\n"


# ---- download -------------------------------------------------------------------------------------------


def _regular(store: Store, image: ImageRecord, path: str) -> tuple[Resolver, Node]:
    r = store.resolver(image)
    node = _lookup(r, path)
    if not node.is_regular:
        raise Unprocessable(f"{normalize(path)} is not a regular file")
    return r, node


def check_file(store: Store, image: ImageRecord, path: str) -> None:
    """HEAD download: NotFound / Unprocessable exactly as the download would."""
    _regular(store, image, path)


def read_chunks(store: Store, image: ImageRecord, path: str, chunk: int = CHUNK) -> Iterator[bytes]:
    """The file's bytes in chunks; errors are raised before the first chunk."""
    r, node = _regular(store, image, path)
    fd = r.open_file(node)

    def gen() -> Iterator[bytes]:
        try:
            while data := os.read(fd, chunk):
                yield data
        finally:
            os.close(fd)

    return gen()


def read_bytes(store: Store, image: ImageRecord, path: str) -> bytes:
    return b"".join(read_chunks(store, image, path))


_END = object()


async def _drain(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """Pull a blocking chunk iterator from a worker thread, one chunk at a time."""
    try:
        while True:
            data = await asyncio.to_thread(next, chunks, _END)
            if data is _END:
                return
            yield data  # type: ignore[misc]
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            with contextlib.suppress(ValueError):  # still running in a cancelled worker thread
                close()


async def read_file(store: Store, image: ImageRecord, path: str) -> AsyncIterator[bytes]:
    chunks = await asyncio.to_thread(read_chunks, store, image, path)
    async for data in _drain(chunks):
        yield data


# ---- archive --------------------------------------------------------------------------------------------


def _archive_root(store: Store, image: ImageRecord, path: str) -> tuple[Resolver, Node]:
    r = store.resolver(image)
    node = _lookup(r, path)
    if not (node.is_dir or node.is_regular):
        raise Unprocessable(f"{normalize(path)} is neither a regular file nor a directory")
    return r, node


def check_archive(store: Store, image: ImageRecord, path: str) -> None:
    _archive_root(store, image, path)


def archive_name(path: str) -> str:
    """The download name of an archive: `/bin/true` → `bin_true.tar`, `/` → `root.tar`."""
    stem = normalize(path).strip("/").replace("/", "_")
    return f"{stem or 'root'}.tar"


def _tarinfo(name: str, node: Node, r: Resolver, links: dict[tuple[int, int], str]) -> tarfile.TarInfo | None:
    st = node.st
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.mtime = int(st.st_mtime)
    mode = st.st_mode
    if stat.S_ISREG(mode):
        key = (node.layer, st.st_ino)
        if st.st_nlink > 1 and key in links:
            info.type, info.linkname = tarfile.LNKTYPE, links[key]
            return info
        if st.st_nlink > 1:
            links[key] = name
        info.type, info.size = tarfile.REGTYPE, st.st_size
    elif stat.S_ISDIR(mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(mode):
        info.type, info.linkname = tarfile.SYMTYPE, r.readlink(node)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(mode):
        info.type = tarfile.FIFOTYPE
    else:
        return None  # sockets have no tar form
    return info


def _xattr_headers(fd: int) -> dict[str, str]:
    """A regular file's extended attributes as PAX `SCHILY.xattr.*` records (what GNU tar and bsdtar
    read back with --xattrs): file capabilities, user.* attributes. Overlay's own are not content."""
    headers = {}
    try:
        names = os.listxattr(fd)
    except OSError:
        return {}
    for name in names:
        if is_overlay_xattr(name):
            continue
        try:
            value = os.getxattr(fd, name)
        except OSError:
            continue
        headers[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
    return headers


def archive_chunks(store: Store, image: ImageRecord, path: str) -> Iterator[bytes]:
    """A POSIX PAX tar of `path`, streamed: a directory's content at the archive root, a file as one entry.
    Errors are raised before the first chunk."""
    r, top = _archive_root(store, image, path)
    return _tar_stream(r, top)


def _tar_stream(r: Resolver, top: Node) -> Iterator[bytes]:
    links: dict[tuple[int, int], str] = {}
    written = 0
    base = top.path.rstrip("/")
    nodes: Iterator[Node] = (n for n in r.walk(top) if n.path != top.path) if top.is_dir else iter([top])
    for node in nodes:
        name = node.path.rsplit("/", 1)[-1] if not top.is_dir else node.path[len(base) + 1:]
        info = _tarinfo(name, node, r, links)
        if info is None:
            continue
        fd = r.open_file(node) if info.type == tarfile.REGTYPE and info.size else -1
        try:
            if fd >= 0:
                info.pax_headers = _xattr_headers(fd)
            header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            yield header
            written += len(header)
            remaining = info.size if fd >= 0 else 0
            while remaining > 0:
                data = os.read(fd, min(CHUNK, remaining))
                if not data:
                    break  # the file shrank: pad with zeros, the header already promised the size
                remaining -= len(data)
                written += len(data)
                yield data
            if remaining:
                yield bytes(remaining)
                written += remaining
        finally:
            if fd >= 0:
                os.close(fd)
        if fd >= 0:
            pad = -info.size % _BLOCK
            if pad:
                yield bytes(pad)
                written += pad
    end = 2 * _BLOCK
    end += -(written + end) % _RECORD
    yield bytes(end)


async def archive(store: Store, image: ImageRecord, path: str) -> AsyncIterator[bytes]:
    chunks = await asyncio.to_thread(archive_chunks, store, image, path)
    async for data in _drain(chunks):
        yield data


# ---- grep -----------------------------------------------------------------------------------------------

MAX_PATTERNS = 16
MAX_PATTERN_CHARS = 1024
MAX_PATHS = 16
LINE_CAP = 4096
GREP_DEADLINE = 30.0
FALLBACK_MAX_FILE = 64 * 1024 * 1024
_CASES = ("sensitive", "insensitive", "smart")


def validate_grep(q: GrepQuery) -> None:
    if not 1 <= len(q.pattern) <= MAX_PATTERNS:
        raise BadRequest(f"pattern: give 1..{MAX_PATTERNS} patterns")
    if any(not p or len(p) > MAX_PATTERN_CHARS for p in q.pattern):
        raise BadRequest(f"pattern: each must be 1..{MAX_PATTERN_CHARS} characters")
    if not 1 <= len(q.path) <= MAX_PATHS:
        raise BadRequest(f"path: give 1..{MAX_PATHS} paths")
    if q.max_count is not None and not 1 <= q.max_count <= 10000:
        raise BadRequest("max_count must be 1..10000")
    if not 1 <= q.max_total <= 10000:
        raise BadRequest("max_total must be 1..10000")
    if q.case not in _CASES:
        raise BadRequest(f"case must be one of {', '.join(_CASES)}")
    if not (0 <= q.before <= 50 and 0 <= q.after <= 50):
        raise BadRequest("before and after must be 0..50")


def _line(raw: bytes) -> tuple[str, int]:
    """(line text capped at LINE_CAP bytes on a UTF-8 boundary, real length in bytes)."""
    if len(raw) <= LINE_CAP:
        return raw.decode("utf-8", "replace"), len(raw)
    cut = LINE_CAP
    while cut > 0 and (raw[cut] & 0xC0) == 0x80:
        cut -= 1
    return raw[:cut].decode("utf-8", "replace"), len(raw)


class _Collector:
    """Applies the shared `max_total` cap; keeps the after-context of the last kept match."""

    def __init__(self, max_total: int, after: int) -> None:
        self.matches: list[api.GrepMatch] = []
        self.count = 0
        self.max_total = max_total
        self.after = after
        self.last: tuple[str, int] | None = None
        self.truncated = False

    @property
    def full(self) -> bool:
        return self.count >= self.max_total

    def add(self, m: api.GrepMatch) -> bool:
        """Keep `m` if the caps allow; False once the search can stop (a match beyond the cap)."""
        if m.type == "match":
            if self.full:
                self.truncated = True
                return False
            self.count += 1
            self.last = (m.path, m.line_number)
        elif self.full:
            if self.last is None or m.path != self.last[0] or m.line_number > self.last[1] + self.after:
                return True
        self.matches.append(m)
        return True


def _roots(store: Store, image: ImageRecord, paths: list[str]) -> list[tuple[str, Node]]:
    """(path as asked, node resolved inside the image) per search root; NotFound names a missing one."""
    r = store.resolver(image)
    return [(normalize(p), _lookup(r, p)) for p in paths]


def _display(shown: str, resolved: str, path: str) -> str:
    """Report paths under the root as the caller spelled it (a symlinked root like /bin stays /bin)."""
    rest = path[len(resolved.rstrip("/")):] if resolved != "/" else path
    if shown == "/":
        return rest if rest.startswith("/") else "/" + rest
    return shown.rstrip("/") + rest if rest else shown


async def grep(store: Store, image: ImageRecord, query: GrepQuery, *, rg: str | None = None,
               use_rg: bool = True, deadline: float = GREP_DEADLINE) -> api.GrepResult:
    """Search the image: ripgrep over a read-only mount, or the Python fallback when rg is missing."""
    validate_grep(query)
    rg = rg or (shutil.which("rg") if use_rg else None)
    if rg is None:
        return await asyncio.to_thread(grep_sync, store, image, query)
    roots = await asyncio.to_thread(_roots, store, image, query.path)
    collector = _Collector(query.max_total, query.after)
    with store.pinned(image.layers):
        # Detached: never in the host's mount table, where other processes could reach it or a dead
        # engine would leave it; rg gets it as its cwd and it goes away with the fd and rg.
        mnt = await asyncio.to_thread(open_overlay, store.layer_paths(image), None, None, readonly=True)
        try:
            async with asyncio.timeout(deadline):
                for shown, node in roots:
                    if not await _rg_root(rg, Path(f"/proc/self/fd/{mnt}"), query, shown, node, collector):
                        break
        except TimeoutError:
            collector.truncated = True
        finally:
            os.close(mnt)  # synchronous on purpose: it must happen even when the task is cancelled
    return api.GrepResult(path=normalize(query.path[0]), patterns=list(query.pattern),
                          matches=collector.matches, truncated=collector.truncated)


def _rg_args(rg: str, q: GrepQuery) -> list[str]:
    args = [rg, "--json", "--no-follow", "--hidden", "--no-ignore", "--no-config", "--sort=path",
            "--no-messages", {"sensitive": "--case-sensitive", "insensitive": "--ignore-case",
                              "smart": "--smart-case"}[q.case]]
    if q.before:
        args += ["-B", str(q.before)]
    if q.after:
        args += ["-A", str(q.after)]
    if q.max_count is not None:
        args += ["-m", str(q.max_count)]
    for g in q.glob:
        args += ["-g", g]
    for p in q.pattern:
        args += ["-e", p]
    return args


def _rg_bytes(obj: dict[str, Any]) -> bytes:
    if "text" in obj:
        return str(obj["text"]).encode("utf-8", "surrogateescape")
    return base64.b64decode(obj.get("bytes", ""))


async def _rg_root(rg: str, mnt: Path, q: GrepQuery, shown: str, node: Node, out: _Collector) -> bool:
    """Run rg on one root; False when the shared cap stopped the search."""
    target = "." + node.path if node.path != "/" else "."
    proc = await asyncio.create_subprocess_exec(
        *_rg_args(rg, q), "--", target, cwd=mnt, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, limit=64 * 1024 * 1024)
    assert proc.stdout is not None and proc.stderr is not None
    keep_going = True
    try:
        async for raw in proc.stdout:
            msg = msgspec.json.decode(raw)
            kind = msg.get("type")
            if kind not in ("match", "context"):
                continue
            data = msg["data"]
            path = os.fsdecode(_rg_bytes(data["path"]))
            path = path[1:] if path.startswith("./") else "/" if path == "." else path
            text, size = _line(_rg_bytes(data["lines"]))
            subs = [api.GrepSubmatch(text=_rg_bytes(s["match"]).decode("utf-8", "replace"),
                                     start=s["start"], end=s["end"])
                    for s in data.get("submatches", [])] if kind == "match" else []
            m = api.GrepMatch(path=_display(shown, node.path, path), line_number=data.get("line_number") or 0,
                              absolute_offset=data.get("absolute_offset", 0), line_text=text, line_bytes=size,
                              submatches=subs, type=kind)
            if not out.add(m):
                keep_going = False
                break
        if keep_going:
            err = await proc.stderr.read()
            code = await proc.wait()
            if code == 2 and not out.matches and err:
                raise BadRequest(f"grep: {err.decode(errors='replace').strip()[:500]}")
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return keep_going


# ---- grep without ripgrep -------------------------------------------------------------------------------


def _compile(q: GrepQuery) -> re.Pattern[bytes]:
    insensitive = q.case == "insensitive" or (q.case == "smart" and not any(c.isupper() for p in q.pattern
                                                                            for c in p))
    try:
        return re.compile(b"|".join(b"(?:" + p.encode() + b")" for p in q.pattern),
                          re.IGNORECASE if insensitive else 0)
    except re.error as exc:
        raise BadRequest(f"grep: invalid pattern: {exc}") from None


def _glob_verdict(globs: list[str], rel: str, is_dir: bool) -> bool:
    """ripgrep override globs: the last matching glob decides; with any positive glob, unmatched files
    are excluded; a glob without `/` matches the name at any depth."""
    name = rel.rsplit("/", 1)[-1]
    verdict: bool | None = None
    for g in globs:
        neg = g.startswith("!")
        pat = g[1:] if neg else g
        dir_only = pat.endswith("/")
        pat = pat.rstrip("/")
        if dir_only and not is_dir:
            continue
        subject = rel if "/" in pat else name
        if fnmatch.fnmatchcase(subject, pat.lstrip("/")):
            verdict = not neg
    if verdict is None:
        return is_dir or not any(not g.startswith("!") for g in globs)
    return verdict


def _search_file(r: Resolver, node: Node, rx: re.Pattern[bytes], q: GrepQuery, display: str,
                 out: _Collector) -> bool:
    if node.st.st_size > FALLBACK_MAX_FILE:
        return True  # the fallback holds a file in memory; ripgrep has no such limit
    fd = r.open_file(node)
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    if b"\0" in data:
        return True  # binary files are skipped, as ripgrep does while walking
    lines = data.split(b"\n")
    terminated = data.endswith(b"\n")
    if terminated:
        lines.pop()
    offsets = []
    pos = 0
    for line in lines:
        offsets.append(pos)
        pos += len(line) + 1
    found = 0
    last_emitted = -1
    after_left = 0
    for i, line in enumerate(lines):
        hits = list(rx.finditer(line))
        if hits and (q.max_count is None or found < q.max_count):
            found += 1
            for j in range(max(last_emitted + 1, i - q.before), i):
                if not out.add(_py_match(display, j, lines, offsets, terminated, [], "context")):
                    return False
            subs = [api.GrepSubmatch(text=h.group().decode("utf-8", "replace"), start=h.start(),
                                     end=h.end()) for h in hits if h.end() > h.start()]
            if not out.add(_py_match(display, i, lines, offsets, terminated, subs, "match")):
                return False
            last_emitted = i
            after_left = q.after
        elif after_left > 0:
            after_left -= 1
            if not out.add(_py_match(display, i, lines, offsets, terminated, [], "context")):
                return False
            last_emitted = i
        elif q.max_count is not None and found >= q.max_count:
            break
    return True


def _py_match(path: str, i: int, lines: list[bytes], offsets: list[int], terminated: bool,
              subs: list[api.GrepSubmatch], kind: Literal["match", "context"]) -> api.GrepMatch:
    raw = lines[i] + (b"\n" if terminated or i < len(lines) - 1 else b"")
    text, size = _line(raw)
    return api.GrepMatch(path=path, line_number=i + 1, absolute_offset=offsets[i], line_text=text,
                         line_bytes=size, submatches=subs, type=kind)


def grep_sync(store: Store, image: ImageRecord, query: GrepQuery) -> api.GrepResult:
    """The ripgrep-less search over the resolver (Python `re`, so not Rust-regex-identical)."""
    validate_grep(query)
    rx = _compile(query)
    r = store.resolver(image)
    out = _Collector(query.max_total, query.after)
    started = time.monotonic()
    for shown, top in _roots(store, image, query.path):
        stack = [top]
        while stack:
            node = stack.pop()
            if time.monotonic() - started > GREP_DEADLINE:
                out.truncated = True
                break
            rel = node.path.lstrip("/")
            if node.is_dir:
                if node is not top and not _glob_verdict(query.glob, rel, True):
                    continue
                children = [r.child_dir(node, n) if c.is_dir else c for n, c in r.listdir(node)]
                stack.extend(reversed(children))
            elif node.is_regular and (node is top or _glob_verdict(query.glob, rel, False)):
                if not _search_file(r, node, rx, query, _display(shown, top.path, node.path), out):
                    return api.GrepResult(path=normalize(query.path[0]), patterns=list(query.pattern),
                                          matches=out.matches, truncated=True)
    return api.GrepResult(path=normalize(query.path[0]), patterns=list(query.pattern), matches=out.matches,
                          truncated=out.truncated)
