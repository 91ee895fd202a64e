"""The ids of a rootless engine: container 0 is the user, 1..N are the user's subordinate ids.

The layout is rootless podman's: the engine's user namespace maps its id 0 to the user and ids
1..min(count, 65536) to the first range of the user in /etc/subuid (gids likewise from /etc/subgid), through
the setuid helpers `newuidmap` / `newgidmap` (Debian package uidmap), which check those files. Layers on
disk therefore hold *shifted* ids: a file of container uid 1000 is host uid start+999, and the engine,
which always reads them from inside its namespace, sees 1000 again (docs/rootless.md "Layer ownership").

Without a subordinate range (or without the helpers) the namespace maps only the user, as id 0: the
*single-id* fallback. Every file of an image then belongs to root, a process can only run as root
(`uid`/`gid` other than 0 are refused), and `chown` to another id fails inside a sandbox.

Each sandbox gets a user namespace of its own inside the engine's (`sandbox_ns.py`), mapping the same ids
onto themselves. Its map has to follow the engine's extents (a range may not straddle two extents of the
parent's map: `0 0 65536` is refused there with EPERM, `0 0 1` + `1 1 65535` is accepted).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from contree.engine.runtime.subids import Entry, parse

MAX_CONTAINER_ID = 65535  # spawn.MAX_ID: a sandbox maps container ids 0..65535 at most
ETC = Path("/etc")


class IdMapError(RuntimeError):
    """The engine's user namespace could not get its id maps; the message names the fix."""


@dataclass(frozen=True)
class IdPlan:
    """The engine namespace's maps: (inside, outside, count) extents for uids and for gids."""
    uid_extents: tuple[tuple[int, int, int], ...]
    gid_extents: tuple[tuple[int, int, int], ...]
    # Why only the user is mapped (None: the subordinate ranges are used).
    single_reason: str | None = None

    @property
    def single(self) -> bool:
        return self.single_reason is not None

    @property
    def size(self) -> int:
        """How many container ids sandboxes get: 0..size-1."""
        return min(sum(n for _, _, n in self.uid_extents), sum(n for _, _, n in self.gid_extents),
                   MAX_CONTAINER_ID + 1)

    def describe(self) -> str:
        if self.single_reason is not None:
            return f"single id (container 0 = uid {self.uid_extents[0][1]}): {self.single_reason}"
        (_, uid, _), (_, sub, count) = self.uid_extents[:2]
        (_, gid, _), (_, gsub, gcount) = self.gid_extents[:2]
        return (f"container 0 = uid {uid}/gid {gid}, 1..{count} = subordinate uids {sub}.., "
                f"1..{gcount} = subordinate gids {gsub}..")


def subordinate_range(path: Path, name: str, uid: int) -> Entry | None:
    """The user's first range in an /etc/subuid-format file (entries name the user or its number)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for entry in parse(text):
        if entry.owner in (name, str(uid)):
            return entry
    return None


def helpers() -> tuple[str | None, str | None]:
    return shutil.which("newuidmap"), shutil.which("newgidmap")


def plan_for(uid: int | None = None, gid: int | None = None, *, etc: Path = ETC) -> IdPlan:
    """The maps the current user's engine namespace gets."""
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    single = ((0, uid, 1),), ((0, gid, 1),)
    newuidmap, newgidmap = helpers()
    if newuidmap is None or newgidmap is None:
        return IdPlan(*single,
                      single_reason="newuidmap/newgidmap not found (install the Debian package uidmap)")
    sub_u = subordinate_range(etc / "subuid", name, uid)
    sub_g = subordinate_range(etc / "subgid", name, uid)
    missing = [str(etc / f) for f, e in (("subuid", sub_u), ("subgid", sub_g)) if e is None]
    if missing or sub_u is None or sub_g is None:
        return IdPlan(*single, single_reason=f"{name} has no subordinate ids in {' and '.join(missing)} "
                      f"(as root: usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {name}, "
                      "with a range no other entry overlaps)")
    u_count = min(sub_u.length, MAX_CONTAINER_ID + 1)
    g_count = min(sub_g.length, MAX_CONTAINER_ID + 1)
    return IdPlan(((0, uid, 1), (1, sub_u.start, u_count)), ((0, gid, 1), (1, sub_g.start, g_count)))


def write_maps(pid: int, plan: IdPlan) -> None:
    """Give the user namespace of process `pid` (a child of ours that has just unshared it) its maps:
    through newuidmap/newgidmap, or, for a single id, by writing them directly (allowed to the
    namespace's owner once setgroups is denied)."""
    if plan.single:
        with open(f"/proc/{pid}/setgroups", "w") as fh:
            fh.write("deny")
        for name, extents in (("gid_map", plan.gid_extents), ("uid_map", plan.uid_extents)):
            with open(f"/proc/{pid}/{name}", "w") as fh:
                fh.write(map_text(extents))
        return
    for tool, extents in zip(helpers(), (plan.uid_extents, plan.gid_extents), strict=True):
        assert tool is not None
        argv = [tool, str(pid), *(str(n) for extent in extents for n in extent)]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        if res.returncode != 0:
            detail = (res.stderr or res.stdout).strip() or f"exit status {res.returncode}"
            raise IdMapError(f"{os.path.basename(tool)} failed: {detail} (check the user's entries in "
                             "/etc/subuid and /etc/subgid, and that newuidmap/newgidmap are setuid root)")


def map_text(extents: tuple[tuple[int, int, int], ...]) -> str:
    return "".join(f"{inside} {outside} {count}\n" for inside, outside, count in extents)


def sandbox_extents(extents: tuple[tuple[int, int, int], ...], size: int) -> tuple[tuple[int, int, int], ...]:
    """A sandbox's map inside the engine's namespace: the engine's ids 0..size-1 onto themselves, cut
    where the engine's own map (`extents`) changes extent (the kernel refuses a range over two)."""
    out = []
    for inside, _, count in extents:
        end = min(inside + count, size)
        if end > inside:
            out.append((inside, inside, end - inside))
    return tuple(out)


def current_plan(proc: Path = Path("/proc/self")) -> IdPlan:
    """The maps of the user namespace this process is in, as an `IdPlan` (single when one id)."""
    extents = []
    for name in ("uid_map", "gid_map"):
        rows = []
        for line in (proc / name).read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
        extents.append(tuple(sorted(rows)))
    single = sum(n for _, _, n in extents[0]) == 1
    return IdPlan(extents[0], extents[1], single_reason="only one id is mapped" if single else None)
