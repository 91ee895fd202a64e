"""The engine home is private: no other local user may reach anything in it.

Layers keep what sandboxes made, setuid-root binaries and device nodes included, and blobs, databases
and event logs hold the users' data, so the home is 0700 and everything the engine creates in it is
owner-only (directories 0700, files 0600). `prepare_home` runs before anything else at start:

* a missing home is created 0700 (its missing parents with the usual 0755);
* a home of ours that other users can reach (one made 0755 by an earlier version) is repaired: it and
  the directories and databases the engine keeps in it are made owner-only, and the repair is logged.
  Refusing would only make every upgraded user type the same chmod; nothing in the home can have been
  written by another user, because its contents were only ever writable by the owner;
* a home owned by another user, or below a directory another user can write to (and so could swap the
  home for a tree of their own), is refused with the fix named: the engine runs as root and would
  otherwise mount, chown and execute what that user placed there.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

_GROUP_OTHER = 0o077
# The home whose ancestors were checked with the host's ids: a rootless engine checks before it enters its
# user namespace, where the host's owners of those directories (root, other users) all show as the
# overflow id and cannot be told apart.
_checked_on_host: str | None = None


class UnsafeHome(PermissionError):
    """The engine home cannot be made private; the message names the fix."""


def prepare_home(home: Path, *, before_userns: bool = False) -> list[str]:
    """Create or check the home; returns the repairs made (also logged). `before_userns`: the caller is
    about to enter the rootless engine's user namespace, so this check of the ancestors is remembered."""
    global _checked_on_host
    home = Path(home)
    home.parent.mkdir(parents=True, exist_ok=True)
    try:
        home.mkdir(mode=0o700)
    except FileExistsError:
        pass
    real = Path(os.path.realpath(home))
    if os.fspath(real) != _checked_on_host:
        _check_ancestors(real)
        if before_userns:
            _checked_on_host = os.fspath(real)
    st = os.stat(real)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeHome(f"the engine home {home} is not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafeHome(
            f"the engine home {home} belongs to uid {st.st_uid}, not to the engine's user "
            f"(uid {os.geteuid()}): another user could place files there that the engine would mount and "
            "execute. Use a home of your own (--home or CONTREE_ENGINE_HOME), or "
            f"`chown -R {os.geteuid()} {home}` if it is yours")
    repaired = []
    if private_dir(real):
        repaired.append(f"{home} was mode {stat.S_IMODE(st.st_mode):04o}")
    if repaired:
        log.warning("the engine home was reachable by other users; made it owner-only: %s",
                    "; ".join(repaired))
    return repaired


def _check_ancestors(real: Path) -> None:
    """Every directory above the home must be writable only by root or by us (or be sticky, like /tmp)."""
    me = os.geteuid()
    for parent in real.parents:
        st = os.stat(parent)
        if st.st_uid not in (0, me):
            raise UnsafeHome(
                f"{parent} (above the engine home {real}) belongs to uid {st.st_uid}, who could replace "
                "the home with a tree of their own: put the home under a directory of root or of the "
                "engine's user (the default is ~/.local/share/contree-mcp)")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise UnsafeHome(
                f"{parent} (above the engine home {real}) is writable by other users, who could replace the "
                f"home with a tree of their own: `chmod go-w {parent}`, or put the home elsewhere "
                "(the default is ~/.local/share/contree-mcp)")


def private_dir(path: Path) -> bool:
    """mkdir `path` 0700 (parents too), or take group/other access away from an existing one;
    returns whether an existing directory had to be repaired."""
    try:
        os.mkdir(path, 0o700)
        return False
    except FileExistsError:
        pass
    except FileNotFoundError:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return False
    return _restrict(path)


def private_file(path: Path) -> bool:
    """Create `path` empty 0600 unless it exists, or take group/other access away from an existing one
    (SQLite gives its -wal and -shm files the database file's mode, so a database made here is private
    with its journals). Returns whether an existing file had to be repaired."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        return False
    except FileExistsError:
        pass
    repaired = _restrict(path)
    for journal in ("-wal", "-shm", "-journal"):
        other = path.with_name(path.name + journal)
        if os.path.lexists(other):
            repaired = _restrict(other) or repaired
    return repaired


def _restrict(path: Path) -> bool:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & _GROUP_OTHER:
        return False
    os.chmod(path, stat.S_IMODE(st.st_mode) & ~_GROUP_OTHER)
    return True
