"""LocalEngine across restarts: records and event logs survive a clean stop; one engine per home."""

from __future__ import annotations

from pathlib import Path

import pytest

from contree import api
from contree.engine.local import EngineLimits, LocalEngine
from contree.errors import Conflict
from tests.contract.conftest import local_engine, run, seed_busybox, stdout_of

pytestmark = pytest.mark.engine


async def test_operations_and_events_survive_restart(tmp_path: Path, busybox_rootfs: Path) -> None:
    home = tmp_path / "home"
    engine = await local_engine(home, busybox_rootfs)
    try:
        image = await engine.resolve_tag("busybox:latest")
        done = await run(engine, image, "echo kept > /kept; echo out")
        before = [e async for e in engine.events(done.uuid)]
    finally:
        await engine.close()
    again = LocalEngine(home)
    await again.start()
    try:
        after_op = await again.get_operation(done.uuid)
        assert after_op == done
        assert [e async for e in again.events(done.uuid)] == before
        assert stdout_of(after_op) == "out\n"
        assert done.result_image_uuid
        check = await run(again, done.result_image_uuid, "cat /kept", disposable=True)
        assert stdout_of(check) == "kept\n"
    finally:
        await again.close()


async def test_second_engine_on_the_same_home_is_refused(tmp_path: Path) -> None:
    first = LocalEngine(tmp_path / "home")
    await first.start()
    try:
        with pytest.raises(Conflict):
            await LocalEngine(tmp_path / "home").start()
        who = await first.whoami()
        assert who.permissions["spawn"]
    finally:
        await first.close()


async def test_operation_timeout_is_capped_by_the_engine_limit(tmp_path: Path, busybox_rootfs: Path) -> None:
    engine = LocalEngine(tmp_path / "home", limits=EngineLimits(instance_max_timeout=1))
    await engine.start()
    try:
        image = seed_busybox(engine, busybox_rootfs)
        resp = await run(engine, image, "sleep 20", timeout=600, disposable=True)
        meta = resp.instance_metadata()
        assert meta is not None and isinstance(meta.result, api.InstanceResult)
        assert meta.result.state is not None and meta.result.state.timed_out
        assert (await engine.whoami()).limits["instance_max_timeout"] == 1
    finally:
        await engine.close()


async def test_failed_start_releases_the_home(tmp_path: Path) -> None:
    from contree.engine.runtime.sandbox import RuntimeConfig

    broken = LocalEngine(tmp_path / "home",
                         runtime_config=RuntimeConfig(state_dir=tmp_path / "rt", runtime="no-such-runtime"))
    with pytest.raises(ValueError):
        await broken.start()
    engine = LocalEngine(tmp_path / "home")
    await engine.start()  # the lock and the databases were released by the failed start
    await engine.close()
    await engine.close()  # idempotent
