"""A run stages its sandbox (bundle, cgroup, netns) while its rootfs is being mounted: whichever side
fails, or when the run is cancelled in the middle, nothing staged is left behind."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from contree import api
from contree.engine.local import LocalEngine
from contree.engine.runtime.sandbox import SandboxRuntime
from tests.contract.conftest import local_engine, run, stdout_of
from tests.engine.test_runtime_support import NETNS_DIR

pytestmark = pytest.mark.engine


def staged_leftovers(rt: SandboxRuntime, op_uuid: str) -> list[str]:
    """What of the run `op_uuid` is still there. A spare network its teardown made for the next run is
    not the run's (it is made when the run got as far as starting its sandbox)."""
    spares = {net.netns_name for net in rt._spare_nets}
    found = []
    if rt.cgroups.exists(op_uuid):
        found.append(f"cgroup {op_uuid}")
    if (rt.bundles / op_uuid).exists():
        found.append(f"bundle {op_uuid}")
    if (rt.rootfs_binds / op_uuid).exists():
        found.append(f"rootfs bind {op_uuid}")
    if NETNS_DIR.is_dir():
        found += [f"netns {n}" for n in os.listdir(NETNS_DIR)
                  if n.startswith(f"contree-{rt.network.tag}-") and n not in spares]
    return found


@pytest.fixture
async def engine(tmp_path: Path, busybox_rootfs: Path) -> LocalEngine:
    return await local_engine(tmp_path / "home", busybox_rootfs)


async def test_missing_executable_unstages_cgroup_bundle_and_network(engine: LocalEngine) -> None:
    try:
        image = await engine.resolve_tag("busybox:latest")
        done = await run(engine, image, "/no/such/tool", shell=False)
        assert done.status == "FAILED" and "not found in the image" in (done.error or "")
        await engine.drain()
        assert engine.runtime is not None
        assert staged_leftovers(engine.runtime, done.uuid) == []
    finally:
        await engine.close()


@pytest.mark.parametrize("delay", [0.0, 0.002, 0.005, 0.02])
async def test_cancelling_a_run_while_it_is_staged_leaves_nothing(engine: LocalEngine, delay: float) -> None:
    """The job's task is cancelled (as at engine shutdown) after `delay`: before, during or after the
    rootfs mount and the network setup that run side by side."""
    try:
        image = await engine.resolve_tag("busybox:latest")
        # A 32 MiB injected file keeps the mount side busy for a while.
        blob = await engine.upload_file(os.urandom(32 << 20))
        spawned = await engine.spawn(api.InstanceSpawnRequest(
            command="true", image=image, shell=True, files={"/big": api.InjectedFile(uuid=blob.uuid)}))
        assert engine.queue is not None
        job = engine.queue.get(spawned.uuid)
        assert job is not None and job.task is not None
        await asyncio.sleep(delay)
        job.task.cancel()
        await asyncio.wait({job.task})
        await engine.drain()
        op = await engine.get_operation(spawned.uuid)
        assert op.status in ("CANCELLED", "SUCCESS"), op
        assert engine.runtime is not None
        assert staged_leftovers(engine.runtime, spawned.uuid) == []
        assert not (engine.store.sandboxes_dir / spawned.uuid).exists()  # type: ignore[union-attr]
    finally:
        await engine.close()


async def test_runs_with_networking_get_a_fresh_spare_namespace_each(engine: LocalEngine) -> None:
    """After a run with networking, the teardown sets up the next run's network ahead; every run still
    gets a namespace of its own, and closing the engine removes the spare."""
    rt = engine.runtime
    assert rt is not None
    try:
        if rt.network.mode != "nat":
            pytest.fail(f"this host should give NAT networking, got {rt.network.mode}: {rt.network.error}")
        image = await engine.resolve_tag("busybox:latest")
        # A namespace's inode number is recycled once it is freed, so freshness is told by its own
        # loopback: no packet ever crossed it before this run, which then sends one.
        script = ("awk '/lo:/ {print $3}' /proc/net/dev; nc -w 1 127.0.0.1 9 </dev/null 2>/dev/null; "
                  "ip -o link | cut -d: -f2")
        for n in range(3):
            done = await run(engine, image, script, disposable=True)
            await engine.drain()
            lo_packets, *links = stdout_of(done).split()
            assert {link.split("@")[0] for link in links} == {"eth0", "lo"}, links
            assert lo_packets == "0", f"run {n + 1} got a network namespace that was used before"
            assert len(rt._spare_nets) == 1, "no spare network was set up by the teardown"
        spare = rt._spare_nets[0].netns_name
        assert spare is not None and (NETNS_DIR / spare).exists()
    finally:
        await engine.close()
    assert not (NETNS_DIR / spare).exists(), "the spare network outlived the engine"
