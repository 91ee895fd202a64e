"""The root engine's own host id range for sandboxes, recorded in /etc/subuid and /etc/subgid.

Sandboxes map container ids 0..65535 to a host range. Nobody else may hold that range: a user whose
subordinate ids overlap it becomes those host ids through `newuidmap` (`unshare --map-users`) and can
then signal a sandbox's processes or rewrite a running sandbox's files. So the engine uses the range
recorded under a name of its own, `contree-engine` (as podman uses `containers`); `useradd` and
`usermod` never hand out ids that an entry already holds.

`engine_range()` reads that entry. When it is missing and we are root it is allocated, the way `useradd`
allocates a user's: the lowest SUB_UID_COUNT-sized range at or above SUB_UID_MIN (login.defs) that
overlaps no entry of either file and holds no uid or gid of /etc/passwd or /etc/group, written to both
files atomically while holding shadow's locks (`/etc/.pwd.lock` and `<file>.lock`), so a concurrent
`useradd` waits for us and sees our entry. An entry of ours that overlaps another one is refused with
the fix named. `make install-system` runs `python -m contree.engine.cli subids ensure` for the same entry.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

NAME = "contree-engine"
SIZE = 65536  # container ids 0..65535
ETC = Path("/etc")
_LOCK_PATIENCE = 15.0  # seconds, like shadow's own LOCK_TRIES x LOCK_SLEEP


class SubidError(RuntimeError):
    """The engine's id range is missing, too small or shared; the message names the fix."""


class Entry(NamedTuple):
    owner: str
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length

    def overlaps(self, start: int, count: int) -> bool:
        return self.start < start + count and start < self.end

    def __str__(self) -> str:
        return f"{self.owner}:{self.start}:{self.length}"


class IdRange(NamedTuple):
    uid: int  # container uid u is host uid uid+u
    gid: int
    size: int


def parse(text: str) -> list[Entry]:
    """The entries of an /etc/subuid-format text (`owner:start:count`; malformed lines are skipped,
    as shadow does)."""
    out = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) != 3 or not parts[0] or line.lstrip().startswith("#"):
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if start >= 0 and count > 0:
            out.append(Entry(parts[0], start, count))
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _account_ids(path: Path) -> set[int]:
    """The numeric ids (third field) of /etc/passwd or /etc/group."""
    ids = set()
    for line in _read(path).splitlines():
        parts = line.split(":")
        if len(parts) > 2 and parts[2].isdigit():
            ids.add(int(parts[2]))
    return ids


def _login_defs(etc: Path, kind: str) -> tuple[int, int]:
    """(SUB_UID_MIN, SUB_UID_MAX) or the GID pair, with shadow's defaults."""
    values = {f"SUB_{kind}_MIN": 100000, f"SUB_{kind}_MAX": 600100000}
    for line in _read(etc / "login.defs").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in values and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    return values[f"SUB_{kind}_MIN"], values[f"SUB_{kind}_MAX"]


class _Table:
    """One of the two files, with the account ids that its range must not contain."""

    def __init__(self, etc: Path, kind: str) -> None:
        self.kind = kind  # UID | GID
        self.path = etc / ("subuid" if kind == "UID" else "subgid")
        self.entries = parse(_read(self.path))
        self.accounts = _account_ids(etc / ("passwd" if kind == "UID" else "group"))
        self.minimum, self.maximum = _login_defs(etc, kind)

    def ours(self, size: int) -> Entry | None:
        for e in self.entries:
            if e.owner == NAME and e.length >= size:
                return e
        return None

    def conflicts(self, start: int, size: int) -> list[str]:
        """What [start, start+size) shares with others: entries of other owners, and accounts."""
        found = [str(e) for e in self.entries if e.owner != NAME and e.overlaps(start, size)]
        found += [f"{'uid' if self.kind == 'UID' else 'gid'} {i} of {self.account_file}"
                  for i in sorted(self.accounts) if start <= i < start + size][:3]
        return found

    @property
    def account_file(self) -> str:
        return "/etc/passwd" if self.kind == "UID" else "/etc/group"

    def free(self, start: int, size: int) -> bool:
        return not any(e.overlaps(start, size) for e in self.entries) and not any(
            start <= i < start + size for i in self.accounts)


def _lowest_free(tables: list[_Table], size: int) -> int:
    """The lowest start free in every table, between the tables' SUB_*_MIN and SUB_*_MAX."""
    low = max(t.minimum for t in tables)
    high = min(t.maximum for t in tables)
    busy = sorted({(e.start, e.end) for t in tables for e in t.entries}
                  | {(i, i + 1) for t in tables for i in t.accounts})
    start = low
    moved = True
    while moved:
        moved = False
        for b_start, b_end in busy:
            if b_start < start + size and start < b_end:
                start = b_end
                moved = True
    if start + size - 1 > high:
        raise SubidError(f"no free range of {size} ids left between {low} and {high} "
                         "(SUB_UID_MIN/SUB_UID_MAX in /etc/login.defs)")
    return start


def check(tables: list[_Table], starts: tuple[int, int], size: int) -> None:
    """Refuse a range that another entry or an account shares."""
    for table, start in zip(tables, starts, strict=True):
        shared = table.conflicts(start, size)
        if shared:
            raise SubidError(
                f"the sandboxes' host ids {start}..{start + size - 1} ({table.path}) are shared with "
                f"{', '.join(shared)}: that user could become a sandbox's root on this host. Give "
                f"{NAME} a range of its own: remove its line from {table.path} and restart the engine "
                f"(it allocates a free one), or edit the file so that no entry overlaps it")


def engine_range(size: int = SIZE, *, allocate: bool | None = None, etc: Path = ETC) -> IdRange:
    """The recorded range of `contree-engine` (allocated first when missing and `allocate`, which
    defaults to running as root), checked against every other entry."""
    if allocate is None:
        allocate = os.geteuid() == 0
    tables = [_Table(etc, "UID"), _Table(etc, "GID")]
    found = [t.ours(size) for t in tables]
    if None in found:
        if not allocate:
            raise SubidError(
                f"no range of {size} ids for {NAME} in {etc / 'subuid'} and {etc / 'subgid'}: run "
                f"`make install-system` (or `python -m contree.engine.cli subids ensure`) as root, or "
                f"add a line `{NAME}:<first id>:{size}` that overlaps no other entry to both files")
        found = _allocate(etc, size)
        tables = [_Table(etc, "UID"), _Table(etc, "GID")]
    assert found[0] is not None and found[1] is not None
    check(tables, (found[0].start, found[1].start), size)
    return IdRange(found[0].start, found[1].start, size)


def check_base(base: int, gid_base: int, size: int = SIZE, *, etc: Path = ETC) -> None:
    """Refuse an explicitly configured range that another entry or an account shares."""
    tables = [_Table(etc, "UID"), _Table(etc, "GID")]
    ours = [t.ours(size) for t in tables]
    for table, start, mine in zip(tables, (base, gid_base), ours, strict=True):
        if mine is not None and mine.overlaps(start, size):
            continue  # within (or beside) our own entry: the entry's own check covers it
        shared = table.conflicts(start, size)
        if shared:
            raise SubidError(
                f"the configured sandbox host ids {start}..{start + size - 1} are shared with "
                f"{', '.join(shared)} ({table.path}): that user could become a sandbox's root on this "
                "host. Leave the range unset to use the engine's own entry, or pick one no entry overlaps")


_in_process = threading.Lock()  # fcntl locks do not exclude threads of one process


def _allocate(etc: Path, size: int) -> list[Entry | None]:
    with _in_process, _shadow_locks(etc):
        tables = [_Table(etc, "UID"), _Table(etc, "GID")]
        found = [t.ours(size) for t in tables]
        missing = [t for t, e in zip(tables, found, strict=True) if e is None]
        if not missing:
            return found  # another engine allocated it while we waited for the lock
        present = [e for e in found if e is not None]
        if present and all(t.free(present[0].start, size) for t in missing):
            start = present[0].start  # keeps a container's uid and gid the same number on the host
        else:
            start = _lowest_free(missing if present else tables, size)
        for table in missing:
            entry = Entry(NAME, start, size)
            _append(table.path, f"{entry}\n")
            log.warning("allocated the sandboxes' host ids: added %s to %s", entry, table.path)
    return [_Table(etc, "UID").ours(size), _Table(etc, "GID").ours(size)]


def _append(path: Path, line: str) -> None:
    """Rewrite `path` with `line` appended: a temp file beside it, fsynced, renamed over it."""
    try:
        st = os.stat(path)
        text = path.read_text()
        mode, owner = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
    except FileNotFoundError:
        text, mode, owner = "", 0o644, (0, 0)
    if text and not text.endswith("\n"):
        text += "\n"
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text + line)
            fh.flush()
            os.fchown(fh.fileno(), *owner)
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextlib.contextmanager
def _shadow_locks(etc: Path) -> Iterator[None]:
    """The locks `useradd` takes before it writes /etc/subuid and /etc/subgid: lckpwdf's fcntl lock on
    `.pwd.lock`, then `<file>.lock` made by linking a file holding our pid (a dead holder's is broken)."""
    fd = os.open(etc / ".pwd.lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + _LOCK_PATIENCE
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN) or time.monotonic() > deadline:
                    raise SubidError(f"cannot lock {etc / '.pwd.lock'}: {exc.strerror}") from exc
                time.sleep(0.1)
        held: list[Path] = []
        try:
            for name in ("subuid", "subgid"):
                held.append(_link_lock(etc / name, deadline))
            yield
        finally:
            for lock in held:
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
    finally:
        os.close(fd)


def _link_lock(path: Path, deadline: float) -> Path:
    lock = path.with_name(path.name + ".lock")
    mine = path.with_name(f"{path.name}.{os.getpid()}")
    mine.write_text(str(os.getpid()))
    try:
        while True:
            try:
                os.link(mine, lock)
                return lock
            except FileExistsError:
                if not _holder_alive(lock):
                    with contextlib.suppress(FileNotFoundError):
                        lock.unlink()
                    continue
                if time.monotonic() > deadline:
                    raise SubidError(f"{lock} is held by another process (useradd?); try again") from None
                time.sleep(0.1)
    finally:
        mine.unlink()


def _holder_alive(lock: Path) -> bool:
    """shadow's own test for a stale lock: the pid written in it no longer exists."""
    try:
        pid = int(lock.read_text().strip() or "0")
    except (OSError, ValueError):
        return True  # being written, or unreadable: not ours to break
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
