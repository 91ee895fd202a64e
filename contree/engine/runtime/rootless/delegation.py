"""A cgroup delegated to the rootless engine: memory, CPU and process limits as the root engine has them.

A user may manage a cgroup v2 subtree that was delegated to them: with systemd, `systemd-run --user
--scope -p Delegate=yes contree-mcp engine serve --cgroup-scope` starts the service in a scope of its own
whose directory the user owns. The kernel lets controllers be enabled for a cgroup's children only while
the cgroup itself holds no process, so the engine splits its scope S:

    S/supervisor   every process that was in S when it started (the service's starter, then the outer
                   process that waits for the engine's pid namespace)
    S/engine       the engine, its pid namespace's init and whatever the engine starts outside sandboxes
    S/sandboxes    the parent of every sandbox's cgroup (`CgroupManager`), with memory, pids and cpu
                   enabled as far as S has them

Only on request (`--cgroup-scope`): a cgroup the user owns may also be, say, the scope of their terminal,
whose processes the engine must not move.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from contree.engine.runtime.hostcheck import CGROUP_ROOT, CgroupMode, cgroup_mode

CONTROLLERS = ("memory", "pids", "cpu")


class DelegationError(RuntimeError):
    """The process's cgroup cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Delegation:
    path: Path  # the delegated cgroup's directory
    rel: str  # its path in the hierarchy ("/user.slice/…/run-r1.scope")
    controllers: tuple[str, ...]  # of CONTROLLERS, those it has

    @property
    def sandboxes(self) -> str:
        """The cgroup parent of the sandboxes, as `CgroupManager` takes it."""
        return f"{self.rel.rstrip('/')}/sandboxes"


def own_cgroup(proc_self: Path = Path("/proc/self")) -> str:
    for line in (proc_self / "cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise DelegationError("this process is in no cgroup v2 hierarchy")


def find(root: Path = CGROUP_ROOT, proc_self: Path = Path("/proc/self")) -> Delegation:
    """This process's cgroup, when it is delegated to us (else DelegationError naming why)."""
    fix = "start the service with systemd-run --user --scope -p Delegate=yes"
    mode, unified = cgroup_mode(root)
    if mode is not CgroupMode.V2 or unified is None:
        raise DelegationError(f"cgroups here are {mode.value}, not a pure v2 hierarchy")
    rel = own_cgroup(proc_self)
    path = unified / rel.lstrip("/")
    if path == unified or not all(os.access(path / f, os.W_OK) for f in ("cgroup.procs",
                                                                          "cgroup.subtree_control")):
        raise DelegationError(f"the cgroup {rel} is not delegated to this user ({fix})")
    available = set((path / "cgroup.controllers").read_text().split())
    controllers = tuple(c for c in CONTROLLERS if c in available)
    if not controllers:
        raise DelegationError(f"the cgroup {rel} has none of {', '.join(CONTROLLERS)} ({fix})")
    return Delegation(path=path, rel=rel, controllers=controllers)


def take_over(d: Delegation) -> None:
    """Before the engine's namespaces exist: move every process of the scope into `supervisor/`."""
    supervisor = d.path / "supervisor"
    supervisor.mkdir(exist_ok=True)
    for pid in (d.path / "cgroup.procs").read_text().split():
        try:
            _write(supervisor / "cgroup.procs", pid)
        except ProcessLookupError:
            continue  # it exited meanwhile


def settle(d: Delegation) -> None:
    """In the engine (pid 2 of its pid namespace): the engine and its init into `engine/`, then the
    controllers enabled for the scope's children and for `sandboxes/`'s."""
    engine = d.path / "engine"
    engine.mkdir(exist_ok=True)
    for pid in ("1", "0"):  # init, then this process ("0": the writer)
        _write(engine / "cgroup.procs", pid)
    enable = " ".join(f"+{c}" for c in d.controllers)
    _write(d.path / "cgroup.subtree_control", enable)
    sandboxes = d.path / "sandboxes"
    sandboxes.mkdir(exist_ok=True)
    _write(sandboxes / "cgroup.subtree_control", enable)


def _write(path: Path, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)
