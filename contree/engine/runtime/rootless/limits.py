"""What stands in for cgroups in a rootless engine that has none delegated to it.

A user may create cgroups only where systemd (or an administrator) delegated a subtree to them; an
engine started from an ordinary login session, a container or a host without systemd has none. Then:

* **processes**: each sandbox's user namespace is created by a helper running with RLIMIT_NPROC = the
  sandbox's pids limit and a user id of its own (`sandbox_ns.py`). The kernel charges every task of that
  namespace, whatever its uid, to that id in the engine's namespace and refuses a fork past the limit
  (ucounts, kernel >= 5.14): a real per-sandbox task limit, like `pids.max`. Tasks running directly under
  one container uid are also capped by the process's own RLIMIT_NPROC (the same number);
* **time**: the engine kills a sandbox at its deadline, its watchdog five seconds later if the engine
  cannot (`watchdog.py`);
* **memory and CPU**: not enforced. They are reported as absent, never as a number (`enforced()`);
* **killing**: the sandbox's init is pid 1 of its pid namespace, so a SIGKILL to it ends every process
  of the sandbox. It is reached through a pidfd opened from the runtime's record and checked against the
  start time the runtime recorded, so a recycled pid is never signalled.

`RuntimeStateKiller` offers the part of `CgroupManager`'s interface that the runtime uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

from contree.engine.runtime.cgroups import CgroupLimits, CgroupStats

ENFORCED = ("pids",)  # what a rootless engine without a delegated cgroup enforces


def enforced() -> tuple[str, ...]:
    return ENFORCED


class RuntimeStateKiller:
    """A `CgroupManager` stand-in: no cgroup exists, so there is nothing to create, remove or measure;
    `kill_all` signals the sandbox's init found in the runtime's state under `runtime_root`."""

    v2 = False
    enforces_total = False  # each sandbox has its limit, the engine's budget has none (no parent cgroup)

    def __init__(self, runtime_root: Path, parent: str = "") -> None:
        self.runtime_root = runtime_root
        self.parent = parent

    def runtime_path(self, name: str) -> str:
        return ""  # no cgroup: the runtime gets no cgroupsPath

    def enforceable(self) -> frozenset[str]:
        """The limits really applied to sandboxes (the rest are reported as absent)."""
        return frozenset(ENFORCED)

    def oom_killed(self, stats: CgroupStats, *, died_of_sigkill: bool) -> bool:
        return False  # no memory limit, so no OOM kill of the sandbox's own

    def setup_parent(self, budget: CgroupLimits | None = None) -> None:
        return None

    def create(self, name: str, limits: CgroupLimits) -> None:
        return None

    def adopt(self, made: str, name: str) -> bool:
        return False

    def remove(self, name: str | None, *, timeout: float = 5.0) -> None:
        return None

    def exists(self, name: str | None = None) -> bool:
        return name is not None and (self.runtime_root / name).is_dir()

    def stats(self, name: str) -> CgroupStats:
        return CgroupStats()

    def procs(self, name: str) -> list[int]:
        return []

    def pids_state(self, name: str) -> tuple[int | None, int | None]:
        return None, None

    def kill_all(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the sandbox's init (SIGKILL: with it, everything in its pid namespace)."""
        pidfd = init_pidfd(self.runtime_root / name)
        if pidfd is None:
            return
        try:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, sig)
        finally:
            os.close(pidfd)


def init_pidfd(state_dir: Path) -> int | None:
    """A pidfd of the container init recorded in crun's `status` file, or None when it is gone. The pid
    is checked against the start time crun recorded with it, after the pidfd pins the process."""
    try:
        status = json.loads((state_dir / "status").read_text())
        pid, started = int(status["pid"]), int(status["process-start-time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        if int(fields[19]) == started:  # field 22 of stat, counted after the command's ")"
            return pidfd
    except (OSError, ValueError, IndexError):
        pass
    os.close(pidfd)
    return None
