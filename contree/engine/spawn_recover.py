"""Host clean-up after an engine died (SIGKILL, OOM, power cut) with sandboxes running.

The dead engine's containers keep running and pin their overlay mounts, cgroups and network
namespaces. An engine home always uses the same engine id (derived from its path), so the next start
finds that state by name: kill every process in the engine's cgroup tree, delete the runtime's
container records and remove the cgroups. Only then can the store unmount and delete the sandboxes'
directories. The dead engine's network namespaces and iptables rules are swept by the network
manager itself when the new runtime starts (`network.sweep_dead_rules`).

The engine's watchdog (`watchdog.py`) does all of it the moment the engine process dies, without
waiting for a next start: `release_dead_engine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from contree.engine import hostcheck, network, rootless, sandbox
from contree.engine.cgroups import CgroupManager
from contree.engine.overlay import mounts_under, unmount

log = logging.getLogger(__name__)

RUN_DIR = Path("/run/contree-engine")


def engine_id_for(home: Path) -> str:
    """A stable id per engine home, so a restart finds what the previous process left behind."""
    return hashlib.sha256(os.fsencode(home.resolve())).hexdigest()[:8]


def cgroup_parent_for(engine_id: str) -> str:
    return f"/contree-engine/{engine_id}"


def recover_host(engine_id: str) -> list[str]:
    """Kill and remove whatever sandboxes of `engine_id` survived their engine; returns what was done."""
    actions: list[str] = []
    if rootless.active():
        return actions  # nothing survives a rootless engine's pid namespace (rootless/namespaces.py)
    # The dead engine's `crun run`/`crun exec` processes survive it (they run in their own session)
    # and may still be creating cgroups: they go first, found by the engine's runtime root.
    for pid in _runtime_processes(engine_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            actions.append(f"killed runtime process {pid}")
    _wait_gone(_runtime_processes, engine_id)
    info = hostcheck.detect()
    cgroups = CgroupManager(info, cgroup_parent_for(engine_id))
    if cgroups.exists():
        for name in _children(cgroups):
            cgroups.kill_all(name, signal.SIGKILL)
            actions.append(f"killed sandbox {name}")
        try:
            cgroups.remove(None, timeout=10.0)
            actions.append(f"removed cgroup {cgroups.parent}")
        except OSError as exc:
            log.warning("could not remove %s: %s", cgroups.parent, exc)
    for runtime in ("crun", "runc", "runsc"):
        root = RUN_DIR / f"{runtime}-{engine_id}"
        if root.is_dir():
            binary = shutil.which(runtime)
            for entry in root.iterdir():
                if binary is not None and entry.is_dir():
                    subprocess.run([binary, "--root", str(root), "delete", "-f", entry.name],
                                   capture_output=True, check=False, timeout=30)
            shutil.rmtree(root, ignore_errors=True)
            actions.append(f"removed runtime state {root}")
    return actions


def release_dead_engine(engine_id: str, home: Path, patience: float = 15.0) -> list[str]:
    """Everything the dead engine `engine_id` left on the host, released now: its sandboxes, their
    cgroups, runtime state, bundles, rootfs binds, network namespaces and iptables chains, and the
    overlay mounts in its home (the directories there are left to the next start's recovery).

    The engine's id lock is held meanwhile, so a successor on the same home waits before it starts
    sandboxes of its own. Another engine's start-up may hold it for a moment while it sweeps dead
    engines (not the home's mounts): that is waited for. A holder that keeps it is a successor on the
    same home, which recovers by itself: then nothing is done."""
    deadline = time.monotonic() + patience
    while (fd := sandbox.try_engine_lock(engine_id)) < 0:
        if time.monotonic() > deadline:
            return []
        time.sleep(0.05)
    try:
        actions = recover_host(engine_id)
        actions += sandbox.sweep_dead_engines(hostcheck.detect(), own=engine_id)
        actions += asyncio.run(network.sweep_dead_rules())
        for point in mounts_under(home):
            try:
                unmount(point)
                actions.append(f"unmounted {point}")
            except OSError as exc:
                actions.append(f"could not unmount {point}: {exc}")
        return actions
    finally:
        sandbox.release_engine_lock(engine_id, fd)


def _runtime_processes(engine_id: str) -> list[int]:
    roots = [os.fsencode(f"{RUN_DIR}/{rt}-{engine_id}") for rt in ("crun", "runc", "runsc")]
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:
            continue
        if any(arg in roots for arg in args):
            found.append(int(entry))
    return found


def _wait_gone(lister: Callable[[str], list[int]], engine_id: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while lister(engine_id) and time.monotonic() < deadline:
        time.sleep(0.02)


def _children(cgroups: CgroupManager) -> list[str]:
    names: set[str] = set()
    for d in cgroups._all_dirs(None):
        with contextlib.suppress(OSError):
            names.update(p.name for p in d.iterdir() if p.is_dir())
    return sorted(names)
