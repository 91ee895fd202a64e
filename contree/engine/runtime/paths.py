"""Where the runtime keeps its host state, and the engine-id lock: every path convention in one place.

An engine home always runs under the same engine id (`engine_id_for`), so a successor finds what a dead
predecessor left by name. Host-global state lives under RUN_DIR, one entry per engine id:

  /run/contree-engine/engines/<id>.lock       held (flock) while the engine with that id lives
  /run/contree-engine/<runtime>-<id>/         the OCI runtime's state (crun, runc, runsc --root)
  /run/contree-engine/bundles/<id>/           a tmpfs of the engine's own: each sandbox's config, /etc files
  /run/contree-engine/rootfs/<id>/<sandbox>   each sandbox's rootfs bind (user namespaces, see ROOTFS_BINDS)
  /run/contree-engine/{ipam,tags,userns}/     network slots, iptables chain tags, netns owners (network.py)
  cgroup /contree-engine/<id>/<sandbox>       each sandbox's limits cgroup (cgroups.py)

`recovery.py` releases all of it for an engine that died.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import stat
import time
from pathlib import Path

from contree.engine.storage.overlay import mounts_under, unmount
from contree.fsutil import try_lock

RUN_DIR = Path("/run/contree-engine")
RUNTIMES = ("crun", "runc", "runsc")
CGROUP_ROOT_NAME = "/contree-engine"
ENGINE_LOCKS = RUN_DIR / "engines"
# With a user namespace the runtime reaches the rootfs as the remapped root, which cannot traverse a
# home under /root or a 0700 temporary dir; the merged dir is bound here (world-traversable) instead.
ROOTFS_BINDS = RUN_DIR / "rootfs"
# Bundles (config.json, the /etc files, exec process files) are small and per run: tmpfs, not the disk,
# where creating them cost 0.1-0.3 ms per run.
BUNDLES = RUN_DIR / "bundles"
NETNS_DIR = Path("/run/netns")
USERNS_DIR = RUN_DIR / "userns"  # the owner of `NETNS_DIR/<name>` is `USERNS_DIR/<name>`
IPAM_DIR = RUN_DIR / "ipam"
TAG_DIR = RUN_DIR / "tags"


def engine_id_for(home: Path) -> str:
    """A stable id per engine home, so a restart finds what the previous process left behind."""
    return hashlib.sha256(os.fsencode(home.resolve())).hexdigest()[:8]


def cgroup_parent_for(engine_id: str) -> str:
    return f"{CGROUP_ROOT_NAME}/{engine_id}"


def runtime_root(runtime: str, engine_id: str) -> Path:
    """The `--root` of `runtime` for the engine `engine_id`."""
    return RUN_DIR / f"{runtime}-{engine_id}"


# ---------------------------------------------------------------------- the engine-id lock


def _engine_lock_path(engine_id: str) -> Path:
    return ENGINE_LOCKS / f"{engine_id}.lock"


def try_engine_lock(engine_id: str) -> int:
    """An fd holding `engine_id`'s lock (the engine is alive while someone holds it), or -1."""
    return try_lock(_engine_lock_path(engine_id), make_parents=True)


def release_engine_lock(engine_id: str, fd: int) -> None:
    with contextlib.suppress(OSError):
        _engine_lock_path(engine_id).unlink()  # one file per engine id would pile up
    os.close(fd)


async def lock_engine(engine_id: str, patience: float = 10.0) -> int:
    """Hold `engine_id` for the runtime's life. Another engine may briefly hold it while sweeping up
    after a dead predecessor with the same id, so wait a little before giving up."""
    deadline = time.monotonic() + patience
    while True:
        fd = try_engine_lock(engine_id)
        if fd >= 0:
            return fd
        if time.monotonic() > deadline:
            raise RuntimeError(f"engine id {engine_id} is held by another live engine")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------- per-engine dirs


def make_run_dir(path: Path, group: int | None) -> None:
    """A per-engine dir under RUN_DIR that no other local user may enter: 0700, or root:`group` 0710
    when the sandbox's remapped root (host gid `group`) must traverse it (the rootfs binds: the
    runtime reaches the rootfs as that root). Either way no other user reaches a running sandbox's
    files, setuid binaries included, or its config. The dirs above are 0711: traversable by every
    engine's sandboxes, listable by no one."""
    for shared in reversed(path.parents):
        if shared == RUN_DIR or RUN_DIR in shared.parents:
            shared.mkdir(mode=0o711, exist_ok=True)
            if stat.S_IMODE(shared.stat().st_mode) & 0o066:
                shared.chmod(0o711)
    path.mkdir(mode=0o700, exist_ok=True)
    os.chown(path, os.geteuid(), os.getegid() if group is None else group)
    path.chmod(0o700 if group is None else 0o710)


def release_bind(point: Path) -> None:
    if not point.exists():
        return  # a successor engine's sweep got there first
    unmount(point)
    with contextlib.suppress(FileNotFoundError):
        point.rmdir()


def release_bundles(path: Path) -> None:
    """Unmount an engine's bundles tmpfs (and anything mounted below it), then remove the dir."""
    for point in mounts_under(path):
        unmount(point)
    shutil.rmtree(path, ignore_errors=True)


def release_binds(parent: Path) -> None:
    """Unmount every bind below `parent`, then remove it; never deletes through a mount."""
    if not parent.is_dir():
        return
    for point in mounts_under(parent):
        unmount(point)
    for entry in parent.iterdir():
        entry.rmdir()  # empty mount points only: anything else is not ours to delete
    parent.rmdir()
