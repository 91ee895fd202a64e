"""User namespace cost (`python -m bench userns`): the same LocalEngine runs with userns on and off.

Two engines (separate homes, same busybox image), interleaved sample by sample so machine noise hits
both alike: a disposable `echo hi` (idmapped lower mounts + bind + shift_in) and a committing
`touch /f` (plus shift_out). Target: userns adds at most 5 ms per `echo hi`.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from contree import api

if TYPE_CHECKING:
    from contree.engine.local import LocalEngine

RUNS = 20
WARMUPS = 2


async def _engine(home: Path, userns: bool) -> tuple[LocalEngine, str]:
    from contree.engine.local import LocalEngine
    from contree.engine.runtime.sandbox import RuntimeConfig
    from contree.engine.storage.bootstrap import build_busybox_rootfs

    engine = LocalEngine(home, runtime_config=RuntimeConfig(state_dir=home / "runtime", userns=userns,
                                                            network_mode="none"))
    await engine.start()
    assert engine.store is not None
    stage = engine.store.staging_dir("bench")
    build_busybox_rootfs(stage / "layer")
    image = engine.store.create_image_from_layer_dirs([stage / "layer"], tag="busybox:latest")
    shutil.rmtree(stage, ignore_errors=True)
    return engine, image.uuid


async def _one(engine: LocalEngine, image: str, command: str, disposable: bool) -> float:
    t = time.perf_counter()
    spawned = await engine.spawn(api.InstanceSpawnRequest(
        command=command, image=image, shell=True, disposable=disposable,
        networking=api.InstanceNetworking(enabled=False)))
    async for event in engine.events(spawned.uuid, follow=True):
        if event.type == "completion":
            break
    took = time.perf_counter() - t
    op = await engine.get_operation(spawned.uuid)
    assert op.status == "SUCCESS", op
    await engine.drain()
    return took


async def _bench(work: Path) -> None:
    on, on_image = await _engine(work / "on", True)
    off, off_image = await _engine(work / "off", False)
    try:
        assert on.runtime is not None and on.runtime.idmap is not None
        samples: dict[str, list[float]] = {k: [] for k in ("off echo", "on echo", "off commit", "on commit")}
        for i in range(WARMUPS + RUNS):
            got = {"off echo": await _one(off, off_image, "echo hi", True),
                   "on echo": await _one(on, on_image, "echo hi", True),
                   "off commit": await _one(off, off_image, "touch /f; mkdir -p /d/e", False),
                   "on commit": await _one(on, on_image, "touch /f; mkdir -p /d/e", False)}
            if i >= WARMUPS:
                for k, v in got.items():
                    samples[k].append(v)
        med = {k: statistics.median(v) * 1000 for k, v in samples.items()}
        for kind in ("echo", "commit"):
            base, with_ns = med[f"off {kind}"], med[f"on {kind}"]
            print(f"  {kind:<7} userns off median {base:7.2f} ms   on {with_ns:7.2f} ms   "
                  f"delta {with_ns - base:+6.2f} ms  ({with_ns / base:4.2f}x)")
        delta = med["on echo"] - med["off echo"]
        print(f"  => userns cost on `echo hi`: {delta:+.2f} ms (target <= +5 ms): "
              f"{'OK' if delta <= 5 else 'OVER TARGET'}")
    finally:
        await on.close()
        await off.close()


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-userns-"))
    try:
        asyncio.run(_bench(work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
