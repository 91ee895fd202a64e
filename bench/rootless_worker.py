"""Run as the throwaway user by `bench/rootless.py`: one side of the rootless comparison per process.

`python rootless_worker.py engine WORK`: enters the rootless engine's namespaces, opens a `LocalEngine`
on WORK/home with busybox:latest; `python rootless_worker.py crun WORK`: stays an ordinary user and
prepares a bare rootless crun bundle of the same hardened config (user namespace mapping only the user,
as crun itself makes it for a user; a plain busybox tree, networking off). Either then answers each
line on stdin with the seconds one `echo hi` took (engine: spawn -> completion, networking on when the
line is `net`; crun: `crun run` from spawn to exit), and exits on EOF. Standalone: it imports only the
installed `contree`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path


async def engine_side(work: Path) -> None:
    from contree import api
    from contree.engine.local import LocalEngine
    from contree.engine.storage.bootstrap import build_busybox_rootfs

    engine = LocalEngine(work / "home")
    await engine.start()
    try:
        assert engine.store is not None
        stage = engine.store.staging_dir("bench")
        build_busybox_rootfs(stage / "layer")
        image = engine.store.create_image_from_layer_dirs([stage / "layer"], tag="busybox:latest").uuid
        shutil.rmtree(stage, ignore_errors=True)
        off = api.InstanceNetworking(enabled=False)
        loop = asyncio.get_running_loop()
        print("ready", flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            networking = None if line.strip() == "net" else off
            t = time.perf_counter()
            spawned = await engine.spawn(api.InstanceSpawnRequest(command="echo hi", image=image, shell=True,
                                                                  networking=networking))
            async for event in engine.events(spawned.uuid, follow=True):
                if event.type == "completion":
                    break
            took = time.perf_counter() - t
            op = await engine.get_operation(spawned.uuid)
            assert op.status == "SUCCESS", op
            await engine.drain()  # the teardown (and the next run's spare namespace) off the clock
            print(took, flush=True)
    finally:
        await engine.close()


def crun_side(work: Path) -> None:
    from contree.engine.runtime import oci_config, seccomp
    from contree.engine.storage.bootstrap import build_busybox_rootfs

    rootfs, bundle, state = work / "rootfs", work / "bundle", work / "state"
    build_busybox_rootfs(rootfs)
    for d in (bundle, state):
        d.mkdir()
    uid, gid = os.getuid(), os.getgid()
    opts = oci_config.ConfigOptions(
        rootfs=rootfs, cgroups_path="", netns_path=None, pids_limit=None, seccomp=True,
        seccomp_bpf_b64=seccomp.compiled_bpf_b64(),
        uid_mappings=[oci_config.IdMapping(containerID=0, hostID=uid, size=1)],
        gid_mappings=[oci_config.IdMapping(containerID=0, hostID=gid, size=1)])
    rlimits = oci_config.clamp_rlimits(oci_config.host_hard_rlimits())
    proc = oci_config.process_section(["/bin/sh", "-c", "echo hi"], [], "/", 0, 0, rlimits)
    config = oci_config.build_config(opts, proc)
    config["linux"]["resources"].pop("devices", None)  # a user's crun manages no device cgroup
    (bundle / "config.json").write_text(json.dumps(config))
    crun = shutil.which("crun") or "/usr/bin/crun"
    print("ready", flush=True)
    for _ in sys.stdin:
        t = time.perf_counter()
        res = subprocess.run([crun, "--root", str(state), "run", "--bundle", str(bundle),
                              f"b{uuid.uuid4().hex[:10]}"], stdin=subprocess.DEVNULL, capture_output=True)
        took = time.perf_counter() - t
        assert res.returncode == 0 and res.stdout == b"hi\n", res
        print(took, flush=True)


def main() -> int:
    side, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    if side == "engine":
        from contree.engine.runtime.rootless.namespaces import enter

        enter(work / "home")
        asyncio.run(engine_side(work))
    else:
        crun_side(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
