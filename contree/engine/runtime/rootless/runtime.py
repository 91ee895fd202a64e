"""The parts of a rootless engine's `SandboxRuntime` (see `contree/engine/runtime/rootless/__init__.py`).

Differences from root mode, all decided here: no idmapped layers (the engine's own namespace already
shows container ids), no engine lock or sweep of dead engines (a private run directory on a tmpfs of the
engine's mount namespace, gone with it), no cgroups unless delegated (`limits.py`), and `RootlessNetwork`
giving every sandbox its own user namespace and, with networking, pasta behind the egress filter.
`SandboxRuntime.create` builds the runtime from these parts (`sandbox.py`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from contree.engine.runtime.cgroups import CgroupLimits, CgroupManager
from contree.engine.runtime.hostcheck import HostInfo, NoRuntimeAvailable
from contree.engine.runtime.rootless import ids, namespaces
from contree.engine.runtime.rootless.limits import RuntimeStateKiller
from contree.engine.runtime.rootless.network import RootlessNetwork
from contree.engine.storage.overlay import mount_tmpfs, unmount

RUN_TMPFS_SIZE = "64m"  # runtime state, bundles (configs, /etc files) and namespace binds


@dataclass(frozen=True)
class RootlessParts:
    engine_id: str
    run_dir: Path  # a tmpfs of the engine's mount namespace: runtime state, bundles, namespace binds
    root_dir: Path  # crun's --root
    cgroups: CgroupManager | RuntimeStateKiller
    network: RootlessNetwork
    description: str  # for the start-up log line


async def prepare(info: HostInfo, runtime: str, binary: str, *, state_dir: Path, engine_id: str | None,
                  network_mode: str, budget: CgroupLimits) -> RootlessParts:
    if runtime != "crun":
        raise NoRuntimeAvailable(f"the rootless engine runs crun only, not {runtime} (Debian package crun)")
    plan = namespaces.plan() or ids.current_plan()
    engine_id = engine_id or secrets.token_hex(4)
    run_dir = state_dir / "run"
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    mount_tmpfs(run_dir, size=RUN_TMPFS_SIZE)
    root_dir = run_dir / f"{runtime}-{engine_id}"
    try:
        network = await RootlessNetwork.create(network_mode, run_dir / "ns", plan)
    except BaseException:
        unmount(run_dir)
        raise
    scope = namespaces.delegated()
    cgroups: CgroupManager | RuntimeStateKiller = RuntimeStateKiller(root_dir)
    if scope is not None:  # limits in the cgroup delegated to us, as the root engine has them
        cgroups = CgroupManager(info, scope.sandboxes)
        cgroups.setup_parent(budget)
    limits = (f"cgroup {scope.sandboxes} ({', '.join(scope.controllers)})" if scope is not None
              else "processes per sandbox (no cgroup delegated)")
    description = (f"rootless sandbox runtime {runtime} ({binary}): ids {plan.describe()}; network "
                   f"{network.mode}{f' ({network.error})' if network.error else ''}; limits: {limits}")
    return RootlessParts(engine_id=engine_id, run_dir=run_dir, root_dir=root_dir, cgroups=cgroups,
                         network=network, description=description)
