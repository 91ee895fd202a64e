"""LocalEngine flattens result images that got deeper than its squash depth, keeping their content."""

from __future__ import annotations

from pathlib import Path

import pytest

from contree.engine.local import EngineLimits, LocalEngine
from tests.contract.conftest import run, seed_busybox, stdout_of

pytestmark = pytest.mark.engine


async def test_deep_chain_is_squashed_after_the_run(tmp_path: Path, busybox_rootfs: Path) -> None:
    engine = LocalEngine(tmp_path / "home", limits=EngineLimits(squash_depth=3))
    await engine.start()
    try:
        assert engine.store is not None
        image = seed_busybox(engine, busybox_rootfs)
        chain = [image]
        for i in range(5):
            resp = await run(engine, chain[-1], f"echo {i} >> /chain; rm -f /bin/vi")
            assert resp.status == "SUCCESS" and resp.result_image_uuid
            chain.append(resp.result_image_uuid)
        depths = [engine.store.get(u).depth for u in chain]
        assert max(depths) <= 3, depths
        await engine.drain()  # the last run's teardown (its layer filesystem) follows its completion
        assert engine.store.check() == []
        last = await run(engine, chain[-1], "cat /chain; test -e /bin/vi || echo no-vi", disposable=True)
        assert stdout_of(last) == "0\n1\n2\n3\n4\nno-vi\n"
        middle = await run(engine, chain[2], "cat /chain", disposable=True)
        assert stdout_of(middle) == "0\n1\n"
        lineage = await engine.image_lineage(chain[-1])
        assert lineage.depth == 5 and lineage.root.uuid == image  # lineage is by parent, not layers
    finally:
        await engine.close()
