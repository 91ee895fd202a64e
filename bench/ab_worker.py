"""One side of `bench/ab_engine.py`: a LocalEngine of whichever `contree` is first on sys.path.

Run as a script (`python bench/ab_worker.py HOME`), so it works for any checkout, whatever its own bench
package holds. Reads one scenario name per line on stdin, runs it, answers one JSON line on stdout:
{"seconds": spawn-to-completion}. `quit` closes the engine.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any


async def main(home: Path) -> None:
    from contree import api
    from contree.engine.local import EngineLimits, LocalEngine

    try:  # the layout of this checkout
        from contree.engine.storage.bootstrap import build_busybox_rootfs
    except ImportError:  # before contree/engine/storage/ existed
        from contree.engine.bootstrap import build_busybox_rootfs  # type: ignore[import-not-found,no-redef]

    engine = LocalEngine(home, limits=EngineLimits(instance_max_concurrency=4))
    await engine.start()
    store = engine.store
    assert store is not None
    stage = store.staging_dir("ab")
    build_busybox_rootfs(stage / "layer")
    image = store.create_image_from_layer_dirs([stage / "layer"], tag="busybox:latest").uuid
    shutil.rmtree(stage, ignore_errors=True)
    off = api.InstanceNetworking(enabled=False)
    scenarios: dict[str, dict[str, Any]] = {
        "echo_disposable": dict(command="echo hi", disposable=True, networking=off),
        "echo_networking": dict(command="echo hi", disposable=True),
        "commit_one_file": dict(command="echo x > /f", disposable=False, networking=off),
        "exit_code_and_stderr": dict(command="echo oops >&2; exit 3", disposable=True, networking=off),
    }
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if not line or line == "quit":
                return
            fields = scenarios[line]
            started = time.perf_counter()
            spawned = await engine.spawn(api.InstanceSpawnRequest(image=image, shell=True, **fields))
            async for event in engine.events(spawned.uuid, follow=True):
                if event.type == "completion":
                    break
            took = time.perf_counter() - started
            op = await engine.get_operation(spawned.uuid)
            if op.status != "SUCCESS":
                raise RuntimeError(f"{line}: {op.status} {op.error}")
            await engine.drain()  # the teardown after completion must not slow the next sample
            print(json.dumps({"seconds": took}), flush=True)
    finally:
        await engine.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
