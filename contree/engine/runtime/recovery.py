"""Host clean-up after an engine died (SIGKILL, OOM, power cut) with sandboxes running: all of it here.

The dead engine's containers keep running and pin their overlay mounts, cgroups and network
namespaces. Three entry points, each using the conventions of `paths.py`:

* `recover_host(engine_id)` — the start of an engine on a home whose previous engine died (an engine home
  always uses the same engine id): kill every process of the engine's runtime and cgroup tree, delete the
  runtime's container records and remove the cgroups. Only then can the store unmount and delete the
  sandboxes' directories (`Store.recover`).
* `sweep_dead_engines(info, own)` — any engine's runtime start (`SandboxRuntime.create`): the cgroups,
  runtime state, bundles and rootfs binds of every engine whose id lock nobody holds. The dead engines'
  network namespaces and iptables chains are swept by the network manager as it starts
  (`network.sweep_dead_rules`).
* `release_dead_engine(engine_id, home)` — the engine's watchdog (`watchdog.py`), the moment the engine
  process dies: all of the above at once, plus the overlay mounts in its home.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from contree.engine.runtime import hostcheck, network, rootless
from contree.engine.runtime.cgroups import CgroupManager, sweep_dead_parents
from contree.engine.runtime.hostcheck import HostInfo
from contree.engine.runtime.paths import (
    BUNDLES,
    CGROUP_ROOT_NAME,
    ROOTFS_BINDS,
    RUNTIMES,
    cgroup_parent_for,
    release_binds,
    release_bundles,
    release_engine_lock,
    runtime_root,
    try_engine_lock,
)
from contree.engine.storage.overlay import mounts_under, unmount

log = logging.getLogger(__name__)


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
        for name in cgroups.children():
            cgroups.kill_all(name, signal.SIGKILL)
            actions.append(f"killed sandbox {name}")
        try:
            cgroups.remove(None, timeout=10.0)
            actions.append(f"removed cgroup {cgroups.parent}")
        except OSError as exc:
            log.warning("could not remove %s: %s", cgroups.parent, exc)
    for runtime in RUNTIMES:
        root = runtime_root(runtime, engine_id)
        if root.is_dir():
            binary = shutil.which(runtime)
            for entry in root.iterdir():
                if binary is not None and entry.is_dir():
                    subprocess.run([binary, "--root", str(root), "delete", "-f", entry.name],
                                   capture_output=True, check=False, timeout=30)
            shutil.rmtree(root, ignore_errors=True)
            actions.append(f"removed runtime state {root}")
    return actions


def sweep_dead_engines(info: HostInfo, own: str | None = None) -> list[str]:
    """Kill the sandboxes of engines that died without closing and remove their cgroups and runtime
    state. An engine is alive while it holds its lock file under /run/contree-engine/engines/; `own`
    is the id the caller just locked, so whatever already exists under it is a dead predecessor's."""
    held: dict[str, int] = {}

    def is_dead(name: str) -> bool:
        if name == own:
            held[name] = -1
            return True
        fd = try_engine_lock(name)
        if fd < 0:
            return False
        held[name] = fd  # keep it while cleaning, so a successor waits for us
        return True

    def dead_entries(parent: Path) -> list[Path]:
        """The per-engine entries of `parent` (named by engine id) whose engine is dead."""
        if not parent.is_dir():
            return []
        return [e for e in parent.iterdir() if e.name in held or is_dead(e.name)]

    try:
        done = sweep_dead_parents(info, CGROUP_ROOT_NAME, is_dead)
        for name in held:
            for runtime in RUNTIMES:
                root = runtime_root(runtime, name)
                if root.is_dir():
                    shutil.rmtree(root, ignore_errors=True)
                    done.append(f"removed runtime state {root}")
        for entry in dead_entries(BUNDLES):
            try:
                release_bundles(entry)
                done.append(f"removed bundles {entry}")
            except OSError as exc:
                done.append(f"could not remove bundles {entry}: {exc}")
        for entry in dead_entries(ROOTFS_BINDS):
            try:
                release_binds(entry)
                done.append(f"released rootfs binds {entry}")
            except OSError as exc:  # never block start-up on it: report and go on
                done.append(f"could not release rootfs binds {entry}: {exc}")
        return done
    finally:
        for name, fd in held.items():
            if fd >= 0:
                release_engine_lock(name, fd)


def release_dead_engine(engine_id: str, home: Path, patience: float = 15.0) -> list[str]:
    """Everything the dead engine `engine_id` left on the host, released now: its sandboxes, their
    cgroups, runtime state, bundles, rootfs binds, network namespaces and iptables chains, and the
    overlay mounts in its home (the directories there are left to the next start's recovery).

    The engine's id lock is held meanwhile, so a successor on the same home waits before it starts
    sandboxes of its own. Another engine's start-up may hold it for a moment while it sweeps dead
    engines (not the home's mounts): that is waited for. A holder that keeps it is a successor on the
    same home, which recovers by itself: then nothing is done."""
    deadline = time.monotonic() + patience
    while (fd := try_engine_lock(engine_id)) < 0:
        if time.monotonic() > deadline:
            return []
        time.sleep(0.05)
    try:
        actions = recover_host(engine_id)
        actions += sweep_dead_engines(hostcheck.detect(), own=engine_id)
        actions += asyncio.run(network.sweep_dead_rules())
        for point in mounts_under(home):
            try:
                unmount(point)
                actions.append(f"unmounted {point}")
            except OSError as exc:
                actions.append(f"could not unmount {point}: {exc}")
        return actions
    finally:
        release_engine_lock(engine_id, fd)


def _runtime_processes(engine_id: str) -> list[int]:
    roots = [os.fsencode(runtime_root(runtime, engine_id)) for runtime in RUNTIMES]
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
