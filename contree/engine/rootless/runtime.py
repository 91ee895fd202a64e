"""`SandboxRuntime.create` for a rootless engine (see `contree/engine/rootless/__init__.py`).

Differences from root mode, all decided here: no idmapped layers (the engine's own namespace already
shows container ids), no engine lock or sweep of dead engines (a private run directory on a tmpfs of the
engine's mount namespace, gone with it), no cgroups unless delegated (`limits.py`), and `RootlessNetwork`
giving every sandbox its own user namespace and, with networking, pasta behind the egress filter.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

from contree.engine import seccomp
from contree.engine.cgroups import CgroupLimits, CgroupManager
from contree.engine.hostcheck import HostInfo, NoRuntimeAvailable
from contree.engine.overlay import mount_tmpfs
from contree.engine.rootless import ids, namespaces
from contree.engine.rootless.limits import RuntimeStateKiller
from contree.engine.rootless.network import RootlessNetwork

if TYPE_CHECKING:
    from contree.engine.sandbox import RuntimeConfig, SandboxRuntime

log = logging.getLogger(__name__)

RUN_TMPFS_SIZE = "64m"  # runtime state, bundles (configs, /etc files) and namespace binds


async def create_rootless(cls: type[SandboxRuntime], config: RuntimeConfig, info: HostInfo, runtime: str,
                          binary: str) -> SandboxRuntime:
    if runtime != "crun":
        raise NoRuntimeAvailable(f"the rootless engine runs crun only, not {runtime} (Debian package crun)")
    plan = namespaces.plan() or ids.current_plan()
    engine_id = config.engine_id or secrets.token_hex(4)
    run_dir = config.state_dir / "run"
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    mount_tmpfs(run_dir, size=RUN_TMPFS_SIZE)
    root_dir = run_dir / f"{runtime}-{engine_id}"
    try:
        network = await RootlessNetwork.create(config.network_mode, run_dir / "ns", plan)
    except BaseException:
        from contree.engine.overlay import unmount

        unmount(run_dir)
        raise
    scope = namespaces.delegated()
    cgroups: CgroupManager | RuntimeStateKiller = RuntimeStateKiller(root_dir)
    if scope is not None:  # limits in the cgroup delegated to us, as the root engine has them
        cgroups = CgroupManager(info, scope.sandboxes)
        cgroups.setup_parent(CgroupLimits(memory_bytes=config.budget_memory_bytes, pids=config.budget_pids,
                                          cpu_quota=config.budget_cpus))
    rt = cls(config, info, runtime, binary, cgroups, network, engine_id)
    rt.rootless = True
    rt.run_dir = run_dir
    rt.root_dir = root_dir
    rt.bundles = run_dir / "bundles"
    rt.rootfs_binds = run_dir / "rootfs"
    try:
        for d in (root_dir, rt.bundles):
            d.mkdir(mode=0o700)
    except BaseException:
        await rt.close()
        raise
    if config.seccomp:
        try:
            rt._seccomp_b64 = seccomp.compiled_bpf_b64()
        except seccomp.SeccompUnavailable as exc:
            log.warning("seccomp precompile unavailable, crun compiles the profile per start: %s", exc)
    limits = (f"cgroup {scope.sandboxes} ({', '.join(scope.controllers)})" if scope is not None
              else "processes per sandbox (no cgroup delegated)")
    log.info("rootless sandbox runtime %s (%s): ids %s; network %s%s; limits: %s", runtime, binary,
             plan.describe(), network.mode, f" ({network.error})" if network.error else "", limits)
    return rt
