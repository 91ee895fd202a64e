"""Crash safety: SIGKILL the engine process at random points during runs and commits, then restart.

After each kill a fresh engine on the same home must find a clean store (`Store.check()`), no mounts,
cgroups or network namespaces left by the dead one, every interrupted operation FAILED with the
restart reason (and its event log closed by `completion`), and must still run commands.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contree import api
from contree.backend import OperationQuery
from contree.engine.local import LocalEngine
from contree.engine.oplog import INTERRUPTED
from contree.engine.runtime.paths import cgroup_parent_for, engine_id_for
from contree.engine.storage.bootstrap import build_busybox_rootfs
from contree.engine.storage.overlay import mounts_under

pytestmark = [pytest.mark.engine, pytest.mark.slow]

SEEDS = (11, 23, 37, 41, 59)
REPO = Path(__file__).resolve().parents[2]

# The child: an engine that keeps three runs going, each writing files so that commits happen all the
# time; it prints "ready" once the first run was accepted.
CHILD = r"""
import asyncio, random, shutil, sys
from pathlib import Path
from contree import api
from contree.engine.local import LocalEngine
from contree.engine.storage.store import ImageConfig

async def main(home, tree, seed):
    rng = random.Random(seed)
    engine = LocalEngine(Path(home))
    await engine.start()
    store = engine.store
    try:
        base = store.resolve_tag("busybox:latest")
    except Exception:
        stage = store.staging_dir("seed")
        shutil.copytree(tree, stage / "layer", symlinks=True)
        base = store.create_image_from_layer_dirs([stage / "layer"], config=ImageConfig(),
                                                  tag="busybox:latest").uuid
    announced = False

    async def worker(n):
        nonlocal announced
        image = base
        while True:
            size = rng.choice([10, 1000, 200000])
            pause = rng.randint(0, 9)
            cmd = f"mkdir -p /w{n} && head -c {size} /dev/urandom > /w{n}/f$RANDOM; sleep 0.0{pause}"
            spawned = await engine.spawn(api.InstanceSpawnRequest(
                command=cmd, image=image, shell=True, networking=api.InstanceNetworking(enabled=n != 0)))
            if not announced:
                announced = True
                print("ready", engine.runtime.network.tag, flush=True)
            async for ev in engine.events(spawned.uuid, follow=True):
                pass
            op = await engine.get_operation(spawned.uuid)
            if op.result_image_uuid:
                image = op.result_image_uuid

    await asyncio.gather(*(worker(n) for n in range(3)))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def _netns() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def _chains() -> set[str]:
    out = subprocess.run(["iptables", "-S"], capture_output=True, text=True, check=False).stdout
    return {line.split()[1] for line in out.splitlines() if line.startswith("-N CT-")}


def _cgroup_dirs(engine_id: str) -> list[Path]:
    parent = cgroup_parent_for(engine_id).lstrip("/")
    return [p for p in Path("/sys/fs/cgroup").glob(f"*/{parent}") if p.exists()] + (
        [Path("/sys/fs/cgroup") / parent] if (Path("/sys/fs/cgroup") / parent).exists() else [])


async def _restart_and_check(home: Path, dead_tag: str) -> None:
    engine = LocalEngine(home)
    await engine.start()
    try:
        store = engine.store
        assert store is not None
        assert store.check() == []
        assert mounts_under(home) == []
        # Only this engine's names: other test sessions may be using the host at the same time.
        assert not [n for n in _netns() if n.startswith(f"contree-{dead_tag}-")], _netns()
        assert not [c for c in _chains() if c.startswith(f"CT-{dead_tag}-")], _chains()
        for dirs in _cgroup_dirs(engine_id_for(home)):
            leftovers = [p.name for p in dirs.iterdir() if p.is_dir()]
            assert leftovers == [], f"stray sandbox cgroups in {dirs}: {leftovers}"
        ops = await engine.list_operations(OperationQuery(limit=1000))
        assert ops, "the child never started an operation"
        for op in ops:
            assert op.status in ("SUCCESS", "FAILED", "CANCELLED"), op
            if op.status == "FAILED":
                assert op.error == INTERRUPTED, op
                assert op.result_image_uuid is None
            events = [e async for e in engine.events(op.uuid)]
            assert events and events[-1].type == "completion", op.uuid
            assert [e.id for e in events] == sorted({e.id for e in events})
            if op.result_image_uuid:
                await engine.get_image(op.result_image_uuid)
        # and the engine still works
        base = await engine.resolve_tag("busybox:latest")
        spawned = await engine.spawn(api.InstanceSpawnRequest(command="echo alive > /alive", image=base,
                                                              shell=True))
        async for _ in engine.events(spawned.uuid, follow=True):
            pass
        done = await engine.get_operation(spawned.uuid)
        assert done.status == "SUCCESS" and done.result_image_uuid
    finally:
        await engine.close()
    assert mounts_under(home) == []
    assert _cgroup_dirs(engine_id_for(home)) == []


async def test_sigkill_during_runs_and_commits_recovers(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("crash tests run the embedded engine and need root")
    tree = tmp_path / "busybox"
    build_busybox_rootfs(tree)
    home = tmp_path / "home"
    interrupted_total = 0
    for seed in SEEDS:
        rng = random.Random(seed)
        child = subprocess.Popen(  # noqa: ASYNC220 - a plain child we SIGKILL, no asyncio plumbing wanted
            [sys.executable, "-c", CHILD, str(home), str(tree), str(seed)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        )
        try:
            assert child.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 60)
            word, _, dead_tag = line.decode().strip().partition(" ")
            assert word == "ready" and dead_tag, child.stderr.read().decode() if child.stderr else line
            await asyncio.sleep(rng.uniform(0.05, 1.2))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
        started = time.monotonic()
        await _restart_and_check(home, dead_tag)
        assert time.monotonic() - started < 60
        engine_ops = await _count_interrupted(home)
        interrupted_total = engine_ops
    # Killing three busy workers at random times must have interrupted something at least once.
    assert interrupted_total > 0


async def _count_interrupted(home: Path) -> int:
    engine = LocalEngine(home)
    await engine.start()
    try:
        failed = await engine.list_operations(OperationQuery(status="FAILED", limit=1000))
        return sum(1 for op in failed if op.error == INTERRUPTED)
    finally:
        await engine.close()
