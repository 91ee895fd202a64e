"""Sandbox memory/CPU/pids limits (issue 17 item 5): on by default, sized from the host, raisable per run
within the engine's maximum, reported by whoami and in the result, bounded by the engine's total budget."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from contree import api
from contree.engine.local import EngineLimits, LocalEngine
from contree.engine.runtime.limits import (
    GIB,
    MIB,
    HostResources,
    LimitConfigError,
    ResourceSettings,
    SandboxLimits,
    add_arguments,
    resolve_policy,
    settings_from,
)
from contree.errors import BadRequest
from tests.contract.conftest import result_of, run, seed_busybox, stdout_of

HOST = HostResources(memory_bytes=24 * GIB, cpus=2.0, pids=32768)


# ---- policy (pure) ----


def test_defaults_are_derived_from_the_host() -> None:
    policy = resolve_policy(ResourceSettings(), HOST)
    assert policy.total == SandboxLimits(memory_bytes=18 * GIB, cpus=2.0, pids=16384)
    assert policy.maximum == policy.total
    assert policy.default == SandboxLimits(memory_bytes=6 * GIB, cpus=1.0, pids=1024)
    small = resolve_policy(ResourceSettings(), HostResources(memory_bytes=1 * GIB, cpus=1.0, pids=4096))
    assert small.default == SandboxLimits(memory_bytes=512 * MIB, cpus=1.0, pids=1024)
    assert small.total.memory_bytes == 768 * MIB


def test_misordered_settings_are_refused() -> None:
    with pytest.raises(LimitConfigError, match="memory limits must satisfy"):
        resolve_policy(ResourceSettings(memory_bytes=2 * GIB, max_memory_bytes=1 * GIB), HOST)
    with pytest.raises(LimitConfigError, match="cpus limits"):
        resolve_policy(ResourceSettings(max_cpus=4.0, total_cpus=2.0), HOST)
    with pytest.raises(LimitConfigError, match="pids limits"):
        resolve_policy(ResourceSettings(pids=4), HOST)


def test_a_limit_the_host_cannot_enforce_is_absent_and_refused_when_configured() -> None:
    policy = resolve_policy(ResourceSettings(), HOST, frozenset({"pids"}))
    assert policy.default == SandboxLimits(pids=1024)
    assert set(policy.whoami()) == {"instance_pids", "instance_max_pids", "engine_pids"}
    with pytest.raises(BadRequest, match="cannot enforce"):
        policy.for_request(api.InstanceResourcesLimits(memory_bytes=64 * MIB))
    with pytest.raises(LimitConfigError, match="no memory cgroup controller"):
        resolve_policy(ResourceSettings(memory_bytes=1 * GIB), HOST, frozenset({"pids", "cpu"}))


def test_a_run_may_ask_for_limits_within_the_maximum() -> None:
    policy = resolve_policy(ResourceSettings(max_memory_bytes=8 * GIB, max_cpus=1.5), HOST)
    asked = policy.for_request(api.InstanceResourcesLimits(memory_bytes=8 * GIB, cpus=1.5, pids=64))
    assert asked == SandboxLimits(memory_bytes=8 * GIB, cpus=1.5, pids=64)
    assert policy.for_request(api.InstanceResourcesLimits()) == policy.default
    with pytest.raises(BadRequest, match=r"memory_bytes must be between .* limits.instance_max_memory_bytes"):
        policy.for_request(api.InstanceResourcesLimits(memory_bytes=9 * GIB))
    with pytest.raises(BadRequest, match=r"cpus must be between 0\.01 and 1\.5"):
        policy.for_request(api.InstanceResourcesLimits(cpus=2))
    with pytest.raises(BadRequest, match="pids must be between 16 and"):
        policy.for_request(api.InstanceResourcesLimits(pids=2))


def test_whoami_entries_are_integers_with_cpus_in_millicpus() -> None:
    got = resolve_policy(ResourceSettings(cpus=0.5), HOST).whoami()
    assert got["instance_millicpus"] == 500 and got["engine_millicpus"] == 2000
    assert got["instance_memory_bytes"] == 6 * GIB and got["engine_pids"] == 16384
    assert all(isinstance(v, int) for v in got.values())


# ---- the engine (root) ----


@pytest.fixture
async def engine(mount_guard: Path, busybox_rootfs: Path) -> AsyncIterator[LocalEngine]:
    eng = LocalEngine(mount_guard / "home", limits=EngineLimits(resources=ResourceSettings(
        memory_bytes=256 * MIB, max_memory_bytes=1 * GIB, total_memory_bytes=2 * GIB,
        cpus=0.5, max_cpus=1.0, total_cpus=1.5, pids=128, max_pids=512, total_pids=2048)))
    await eng.start()
    try:
        seed_busybox(eng, busybox_rootfs)
        yield eng
    finally:
        await eng.close()


@pytest.mark.engine
async def test_whoami_reports_the_limits_and_the_parent_cgroup_holds_the_budget(engine: LocalEngine) -> None:
    who = await engine.whoami()
    assert who.limits["instance_memory_bytes"] == 256 * MIB
    assert who.limits["instance_max_memory_bytes"] == 1 * GIB
    assert who.limits["engine_memory_bytes"] == 2 * GIB
    assert (who.limits["instance_millicpus"], who.limits["instance_max_millicpus"],
            who.limits["engine_millicpus"]) == (500, 1000, 1500)
    assert (who.limits["instance_pids"], who.limits["instance_max_pids"], who.limits["engine_pids"]) == (
        128, 512, 2048)
    assert _cgroup_limits(engine, None) == (2 * GIB, 1.5, 2048)


@pytest.mark.engine
async def test_a_run_gets_the_default_limits_and_its_result_reports_them(engine: LocalEngine) -> None:
    image = await engine.resolve_tag("busybox:latest")
    spawned = await engine.spawn(api.InstanceSpawnRequest(command="sleep 30", image=image, shell=True,
                                                          disposable=True))
    try:
        await _wait_executing(engine, spawned.uuid)
        assert _cgroup_limits(engine, spawned.uuid) == (256 * MIB, 0.5, 128)
    finally:
        await engine.cancel_operation(spawned.uuid)
    done = await run(engine, image, "true", disposable=True)
    # A run's changes are held in memory (upperfs): its layer limit is its memory limit minus 1/8.
    assert result_of(done).limits == api.InstanceLimits(memory_bytes=256 * MIB, cpus=0.5, pids=128,
                                                        max_layer_bytes=224 * MIB)


@pytest.mark.engine
async def test_a_run_raises_its_limits_within_the_maximum(engine: LocalEngine) -> None:
    image = await engine.resolve_tag("busybox:latest")
    asked = api.InstanceResourcesLimits(memory_bytes=1 * GIB, cpus=1.0, pids=512)
    spawned = await engine.spawn(api.InstanceSpawnRequest(command="sleep 30", image=image, shell=True,
                                                          disposable=True, resources_limits=asked))
    try:
        await _wait_executing(engine, spawned.uuid)
        assert _cgroup_limits(engine, spawned.uuid) == (1 * GIB, 1.0, 512)
    finally:
        await engine.cancel_operation(spawned.uuid)
    with pytest.raises(BadRequest, match="instance_max_memory_bytes"):
        await engine.spawn(api.InstanceSpawnRequest(
            command="true", image=image, resources_limits=api.InstanceResourcesLimits(memory_bytes=2 * GIB)))


@pytest.mark.engine
async def test_a_memory_hog_is_oom_killed_and_the_result_says_so(engine: LocalEngine) -> None:
    image = await engine.resolve_tag("busybox:latest")
    # The child is the victim and the shell goes on: the kill is reported even though init exited 0.
    done = await run(engine, image, "head -c 600m /dev/zero | tail > /dev/null; echo rc=$?", disposable=True)
    result = result_of(done)
    assert stdout_of(done) == "rc=137\n"
    assert result.state is not None and result.state.oom_killed and result.state.exit_code == 0
    assert done.consumed_memory is not None and done.consumed_memory * 1024 <= 256 * MIB + 4 * MIB
    killed = await run(engine, image, "exec tail /dev/zero", disposable=True)
    state = result_of(killed).state
    assert state is not None and state.oom_killed and state.signal == 9
    fine = await run(engine, image, "head -c 100m /dev/zero | tail > /dev/null; echo ok", disposable=True)
    assert stdout_of(fine) == "ok\n" and not result_of(fine).state.oom_killed  # type: ignore[union-attr]


@pytest.mark.engine
async def test_a_cpu_bound_run_is_throttled_to_its_quota(engine: LocalEngine) -> None:
    image = await engine.resolve_tag("busybox:latest")
    # Two busy loops for 3-4 s of wall time: unthrottled they would use up to 8 CPU-seconds here.
    busy = "end=$(($(date +%s)+4)); while [ $(date +%s) -lt $end ]; do :; done"
    asked = api.InstanceResourcesLimits(cpus=0.2)
    done = await run(engine, image, f"({busy}) & ({busy}); wait", disposable=True, resources_limits=asked)
    result = result_of(done)
    assert result.limits is not None and result.limits.cpus == 0.2
    wall = result.resources.elapsed_time  # type: ignore[union-attr]
    assert done.consumed_cpu is not None and wall >= 2.9
    # The cgroup's own CPU time: at most 0.2 CPU per second of wall time (plus scheduler slack).
    assert done.consumed_cpu <= 0.2 * wall * 1.25 + 0.1, (done.consumed_cpu, wall)


@pytest.mark.engine
async def test_a_fork_bomb_stops_at_the_pids_limit(engine: LocalEngine) -> None:
    image = await engine.resolve_tag("busybox:latest")
    # The bomb forks sleepers until forks fail; the shell then counts the processes with builtins only.
    script = "(while :; do sleep 100 & done) 2>/dev/null & sleep 3; set -- /proc/[0-9]*; echo procs=$#"
    asked = api.InstanceResourcesLimits(pids=64)
    done = await run(engine, image, script, disposable=True, resources_limits=asked, timeout=60)
    result = result_of(done)
    assert result.state is not None and not result.state.timed_out
    count = int(stdout_of(done).strip().removeprefix("procs="))
    assert 48 < count <= 64, stdout_of(done)  # the bomb filled the sandbox up to its limit, no further


async def _wait_executing(engine: LocalEngine, op: str) -> None:
    for _ in range(400):
        if (await engine.get_operation(op)).status == "EXECUTING":
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"{op} never started")


def _cgroup_limits(engine: LocalEngine, sandbox: str | None) -> tuple[int, float, int]:
    """(memory, cpus, pids) as the kernel holds them for the engine's parent (None) or a sandbox."""
    cg = engine.runtime.cgroups
    if cg.v2:
        path = cg._v2(sandbox)
        quota, period = (path / "cpu.max").read_text().split()
        return (int((path / "memory.max").read_text()), int(quota) / int(period),
                int((path / "pids.max").read_text()))
    mem, cpu, pids = cg._v1("memory", sandbox), cg._v1("cpu", sandbox), cg._v1("pids", sandbox)
    assert mem is not None and cpu is not None and pids is not None
    return (int((mem / "memory.limit_in_bytes").read_text()),
            int((cpu / "cpu.cfs_quota_us").read_text()) / int((cpu / "cpu.cfs_period_us").read_text()),
            int((pids / "pids.max").read_text()))


def test_limit_flags_take_sizes_and_refuse_zero() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--sandbox-memory", "512M", "--sandbox-cpus", "0.5", "--engine-pids", "4096"])
    assert settings_from(args) == ResourceSettings(memory_bytes=512 * MIB, cpus=0.5, total_pids=4096)
    for bad in (["--sandbox-memory", "0"], ["--sandbox-cpus", "-1"], ["--sandbox-pids", "lots"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


@pytest.mark.engine
async def test_the_engine_total_bounds_all_sandboxes_together(mount_guard: Path,
                                                            busybox_rootfs: Path) -> None:
    """Two runs, each well within its own 256 MiB, together beyond the engine's 320 MiB: the OOM killer
    of the engine's parent cgroup ends one of them, and its result says so."""
    eng = LocalEngine(mount_guard / "home", limits=EngineLimits(resources=ResourceSettings(
        memory_bytes=256 * MIB, total_memory_bytes=320 * MIB)))
    await eng.start()
    try:
        image = seed_busybox(eng, busybox_rootfs)
        hold = "exec awk 'BEGIN { s = sprintf(\"%150000000s\", \"\"); system(\"sleep 4\") }'"
        runs = await asyncio.gather(*(run(eng, image, hold, disposable=True, timeout=60) for _ in range(2)))
        states = [result_of(r).state for r in runs]
        assert all(s is not None for s in states)
        killed = [s for s in states if s is not None and s.oom_killed]
        assert killed and all(s.signal == 9 for s in killed), states
        assert all(r.consumed_memory is not None and r.consumed_memory * 1024 < 256 * MIB for r in runs)
    finally:
        await eng.close()
