"""Runs in the VM of `test_delegated_cgroup_vm.py`, as the throwaway user, in the cgroup v2 directory
delegated to it: a rootless engine with `--cgroup-scope`'s split gives sandboxes real limits. Prints one
line `ROOTLESSV2 <json>`. Standalone: it imports only the user's installed `contree`."""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
from pathlib import Path
from typing import Any

MIB = 1 << 20


async def probe(work: Path) -> dict[str, Any]:
    from contree.engine.runtime import hostcheck

    hostcheck.MIN_KERNEL = (6, 1)  # Debian 12's kernel; only overlay's lowerdir+ needs 6.8 (not used here)
    from contree.engine.runtime.rootless import namespaces
    from contree.engine.runtime.sandbox import RuntimeConfig, SandboxRuntime, SandboxSpec
    from contree.engine.storage.bootstrap import build_busybox_rootfs

    rootfs = work / "rootfs"
    build_busybox_rootfs(rootfs)
    rt = await SandboxRuntime.create(RuntimeConfig(state_dir=work / "state", network_mode="none"))
    scope = namespaces.delegated()
    out: dict[str, Any] = {"rootless": rt.rootless, "parent": rt.cgroups.parent,
                           "scope": scope.rel if scope else None, "kind": type(rt.cgroups).__name__}

    async def run(script: str, **spec: Any) -> dict[str, Any]:
        sb = await rt.start(SandboxSpec(sandbox_id=f"s{len(out)}", rootfs=rootfs, argv=["sh", "-c", script],
                                        networking=False, stdin=False, **spec))
        try:
            data, err, ex = await asyncio.wait_for(
                asyncio.gather(sb.stdout.read(), sb.stderr.read(), sb.wait()), 300)
        finally:
            await sb.cleanup()
        return {"out": data.decode(), "err": err.decode()[-500:], "code": ex.exit_code, "signal": ex.signal,
                "oom": ex.oom_killed, "peak": ex.memory_peak_bytes}

    try:
        sb = await rt.start(SandboxSpec(sandbox_id="limits", rootfs=rootfs, argv=["sleep", "60"],
                                        networking=False, stdin=False, memory_bytes=64 * MIB, pids_limit=50,
                                        cpu_quota=0.5))
        try:
            assert await sb.wait_created(patience=120), "the sandbox did not start"  # qemu without KVM
            box = rt.cgroups._v2("limits")  # type: ignore[union-attr]
            out["sandbox"] = {f: (box / f).read_text().strip() for f in ("memory.max", "pids.max", "cpu.max")}
        finally:
            await sb.cleanup()
        out["hog"] = await run("exec tail /dev/zero", memory_bytes=32 * MIB)
        bomb = await run("(while :; do sleep 100 & done) 2>/dev/null & sleep 5; set -- /proc/[0-9]*; echo $#",
                         pids_limit=32)
        out["bomb_procs"] = int(bomb["out"].strip() or -1)
        procs = (scope.path / "engine" / "cgroup.procs").read_text().split() if scope else []
        out["engine_procs"] = len(procs)
        out["scope_procs"] = (scope.path / "cgroup.procs").read_text().split() if scope else None
    finally:
        await rt.close()
    return out


def main() -> int:
    work = Path(sys.argv[1])
    try:
        from contree.engine.runtime.rootless.namespaces import enter

        enter(work / "home", cgroup_scope=True)
        result = asyncio.run(probe(work))
    except Exception:
        result = {"error": traceback.format_exc()}
    print("\nROOTLESSV2 " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
