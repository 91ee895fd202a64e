"""The parts of a started engine, each typed and present: what the façade and the runs work with.

`EngineParts.open(home, limits, runtime_config)` is the engine's start after the home lock: host
recovery after a dead predecessor (`runtime.recovery`), the store (recovered, garbage-collected), the
operation log (interrupted operations finished FAILED), the sandbox runtime with its parent cgroup
carrying the engine's total budget, the sandbox limits, the watchdog, the blobs, the snapshotter and the
queue. A part that fails to come up takes the ones before it down again. `close()` stops them in order:
running work first, then the runtime, the watchdog and the databases.

Runs get the parts, never the engine (podman gives a container a typed runtime handle, not the runtime):
`InstanceRun(parts, …)`, `ImportRun(parts, …)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import msgspec

from contree.engine.eventlog import DEFAULT_OUTPUT_QUOTA
from contree.engine.operations import OperationQueue
from contree.engine.oplog import OperationLog
from contree.engine.runtime.limits import (
    HostResources,
    LimitPolicy,
    ResourceSettings,
    SandboxLimits,
    resolve_policy,
)
from contree.engine.runtime.paths import engine_id_for
from contree.engine.runtime.recovery import recover_host
from contree.engine.runtime.sandbox import RuntimeConfig, SandboxRuntime
from contree.engine.runtime.watchdog import Watchdog
from contree.engine.snapshots import SPARE_SCRATCH_DIRS, Snapshotter
from contree.engine.storage.blobs import BlobStore
from contree.engine.storage.store import MAX_DEPTH, Store

log = logging.getLogger(__name__)

# The network mode of an engine without a RuntimeConfig: auto | nat | slirp | pasta (rootless) | none.
NETWORK_ENV = "CONTREE_ENGINE_NETWORK"


class EngineLimits(msgspec.Struct, kw_only=True):
    squash_depth: int = MAX_DEPTH  # an image deeper than this many layers is flattened after its run
    instance_max_timeout: int = 3600
    instance_max_concurrency: int = max(4, 2 * (os.cpu_count() or 1))
    images_import_max_concurrency: int = 2
    images_import_max_timeout: int = 3600
    output_quota_bytes: int = DEFAULT_OUTPUT_QUOTA  # stdout+stderr one run may store (the rest is counted)
    sandbox_max_count: int = 16  # long-lived sandboxes running at once (beside instance_max_concurrency)
    sandbox_max_ttl: int = 24 * 3600  # the longest idle lifetime a sandbox may ask for (seconds)
    # Sandbox memory/CPU/pids: defaults, per-run maxima and the engine's total (None = from the host).
    resources: ResourceSettings = msgspec.field(default_factory=ResourceSettings)


@dataclass(eq=False)
class EngineParts:
    """A started engine's parts (live objects, not a wire shape: a dataclass, not a Struct)."""

    home: Path
    engine_id: str
    limits: EngineLimits
    store: Store
    oplog: OperationLog
    blobs: BlobStore
    runtime: SandboxRuntime
    snapshots: Snapshotter
    watchdog: Watchdog
    queue: OperationQueue
    sandbox_limits: LimitPolicy  # resolved from `limits.resources` and what the host can enforce
    layer_cap: int  # a run's changes are held in memory (upperfs): its bound without a memory limit

    @classmethod
    async def open(
        cls, home: Path, limits: EngineLimits, runtime_config: RuntimeConfig | None
    ) -> EngineParts:
        """Start every part (the caller holds the home's lock)."""
        engine_id = engine_id_for(home)
        # A previous engine on this home may have died with sandboxes running: they pin mounts,
        # cgroups and netns, so they go first, then the store can unmount and clean its scratch space.
        actions = await asyncio.to_thread(recover_host, engine_id)
        if actions:
            log.warning("recovered after an unclean stop: %s", "; ".join(actions))
        async with contextlib.AsyncExitStack() as undo:
            store = await asyncio.to_thread(Store, home)
            undo.callback(store.close)
            await asyncio.to_thread(store.recover)
            await asyncio.to_thread(store.gc)  # layers orphaned by a crash mid-import or mid-squash
            await asyncio.to_thread(store.make_spare_scratch, SPARE_SCRATCH_DIRS)
            oplog = OperationLog(home, output_quota=limits.output_quota_bytes)
            undo.callback(oplog.close)
            interrupted = oplog.recover()
            if interrupted:
                log.warning("marked %d interrupted operations FAILED", len(interrupted))
            runtime, sandbox_limits, layer_cap = await _start_runtime(home, engine_id, limits, runtime_config)
            undo.push_async_callback(_close_runtime, runtime)
            # Kills the sandboxes at their deadline and releases everything at once if this process dies.
            watchdog = Watchdog.start(engine_id=engine_id, cgroup_parent=runtime.cgroups.parent, home=home,
                                      runtime_root=runtime.root_dir)
            undo.callback(watchdog.stop)
            blobs = BlobStore(home / "blobs")
            undo.callback(blobs.close)
            queue = OperationQueue({
                "instance": limits.instance_max_concurrency,
                "image_import": limits.images_import_max_concurrency,
                "sandbox": limits.sandbox_max_count,
            })
            snapshots = Snapshotter(store, blobs, runtime.idmap, squash_depth=limits.squash_depth)
            parts = cls(home=home, engine_id=engine_id, limits=limits, store=store, oplog=oplog, blobs=blobs,
                        runtime=runtime, snapshots=snapshots, watchdog=watchdog, queue=queue,
                        sandbox_limits=sandbox_limits, layer_cap=layer_cap)
            undo.pop_all()
        return parts

    async def close(self) -> None:
        """Cancel running work, stop the runtime and the watchdog, close the databases."""
        await self.queue.close()
        await _close_runtime(self.runtime)
        self.watchdog.stop()
        self.oplog.close()
        self.store.close()
        self.blobs.close()


async def _close_runtime(runtime: SandboxRuntime) -> None:
    try:
        await runtime.close()
    except Exception:  # keep closing: the databases (and the caller's home lock) must be released
        log.exception("closing the sandbox runtime failed")


async def _start_runtime(
    home: Path, engine_id: str, limits: EngineLimits, runtime_config: RuntimeConfig | None
) -> tuple[SandboxRuntime, LimitPolicy, int]:
    """The runtime, its parent cgroup carrying the engine's total budget, the sandbox limits and the
    layer cap."""
    host = await asyncio.to_thread(HostResources.detect)
    config = msgspec.structs.replace(
        runtime_config or RuntimeConfig(state_dir=home / "runtime",
                                        network_mode=os.environ.get(NETWORK_ENV) or "auto"),
        engine_id=engine_id)
    wanted = limits.resources
    # A runtime_config that names a budget (tests, embedders) wins over the settings' totals.
    settings = msgspec.structs.replace(
        wanted, total_memory_bytes=config.budget_memory_bytes or wanted.total_memory_bytes,
        total_cpus=config.budget_cpus or wanted.total_cpus,
        total_pids=config.budget_pids or wanted.total_pids)
    total = resolve_policy(settings, host).total  # refuses a misordered configuration before any setup
    runtime = await SandboxRuntime.create(msgspec.structs.replace(
        config, budget_memory_bytes=total.memory_bytes, budget_cpus=total.cpus, budget_pids=total.pids))
    try:
        sandbox_limits = resolve_policy(settings, host, runtime.cgroups.enforceable())
        if not runtime.cgroups.enforces_total:  # rootless, no delegated cgroup
            sandbox_limits = msgspec.structs.replace(sandbox_limits, total=SandboxLimits())
    except BaseException:
        await runtime.close()
        raise
    # A run's changes are held in memory (upperfs): without a memory limit, bound them by the host.
    layer_cap = sandbox_limits.maximum.memory_bytes or host.memory_bytes // 4
    return runtime, sandbox_limits, layer_cap
