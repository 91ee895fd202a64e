"""A rootless `SandboxRuntime` for the isolation suite, run as the throwaway user (`tests/rootless_env.py`).

`python rootless_host.py WORKDIR`, with the user's own venv (the project installed from this checkout's
wheel), enters the rootless engine's namespaces exactly as the engine service does, builds a busybox
tree, opens the runtime and then serves JSON lines on stdin/stdout, one request, one answer:

  {"op": "run", "script": ..., "stdin": str|null, "kill_after": s|null, "spec": {SandboxSpec fields}}
      → {"exit": SandboxExit, "out": ..., "err": ..., "network": NetworkInfo, "upper": {name: [mode, rdev]}}
        (a fresh overlay over the busybox tree per run, as the root tests' `rootfs` fixture gives them)
  {"op": "snapshot"}  → {"tree": {path: [mode, size, uid]}} of the busybox tree (the image's layer)
  {"op": "state"}     → what the runtime knows of itself (mode, enforced limits, spare namespaces)
  {"op": "close"}     → closes the runtime and exits

Standalone on purpose: it imports only the installed `contree`, never this checkout's test helpers.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any


def _snapshot(root: Path) -> dict[str, list[int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = [st.st_mode, st.st_size, st.st_uid]
    return out


async def _run(rt: Any, work: Path, lower: Path, request: dict[str, Any]) -> dict[str, Any]:
    import msgspec

    from contree.engine.runtime.sandbox import SandboxSpec
    from contree.engine.storage.overlay import mount_overlay, unmount

    box = work / "runs" / uuid.uuid4().hex[:10]
    upper, scratch, merged = box / "upper", box / "work", box / "merged"
    for d in (upper, scratch, merged):
        d.mkdir(parents=True)
    mount_overlay([lower], upper, scratch, merged)
    stdin = request.get("stdin")
    try:
        sandbox = await rt.start(SandboxSpec(sandbox_id=f"t{box.name}", rootfs=merged,
                                             argv=["sh", "-c", request["script"]], stdin=stdin is not None,
                                             **request.get("spec", {})))
        try:
            if sandbox.stdin is not None:
                if stdin:
                    sandbox.stdin.write(stdin.encode())
                    await sandbox.stdin.drain()
                sandbox.stdin.close()
            waiter = asyncio.ensure_future(asyncio.gather(sandbox.stdout.read(), sandbox.stderr.read(),
                                                          sandbox.wait()))
            if request.get("kill_after") is not None:
                done, _ = await asyncio.wait({waiter}, timeout=request["kill_after"])
                if not done:
                    await sandbox.kill()
            out, err, exit_ = await asyncio.wait_for(waiter, request.get("wait_timeout", 60))
            network = msgspec.to_builtins(sandbox.network)
        finally:
            await sandbox.cleanup()
    finally:
        unmount(merged)
    entries = {}
    for name in os.listdir(upper):
        st = os.lstat(upper / name)
        entries[name] = [st.st_mode, st.st_rdev]
    shutil.rmtree(box)
    return {"exit": msgspec.to_builtins(exit_), "out": out.decode(errors="replace"),
            "err": err.decode(errors="replace"), "network": network, "upper": entries}


async def serve(work: Path) -> None:
    from contree.engine.runtime.rootless import limits
    from contree.engine.runtime.sandbox import RuntimeConfig, SandboxRuntime
    from contree.engine.storage.bootstrap import build_busybox_rootfs

    lower = work / "busybox"
    build_busybox_rootfs(lower)
    rt = await SandboxRuntime.create(RuntimeConfig(state_dir=work / "state", network_mode="none"))
    loop = asyncio.get_running_loop()

    def answer(data: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()

    answer({"ready": True, "rootless": rt.rootless})
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            request = json.loads(line)
            try:
                if request["op"] == "run":
                    answer(await _run(rt, work, lower, request))
                elif request["op"] == "snapshot":
                    answer({"tree": _snapshot(lower)})
                elif request["op"] == "state":
                    spares = {f"{k[0]}/{k[1]}": len(v) for k, v in rt.network._spares.items()}
                    answer({"rootless": rt.rootless, "enforced": list(limits.enforced()), "spares": spares,
                            "network": rt.network.mode})
                elif request["op"] == "close":
                    break
            except Exception as exc:  # the test sees it as its failure
                answer({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        await rt.close()
    answer({"closed": True})


def main() -> int:
    work = Path(sys.argv[1])
    from contree.engine.runtime.rootless.namespaces import enter

    enter(work / "home")
    asyncio.run(serve(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
