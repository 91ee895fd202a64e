"""Runs inside the cgroup v2 VM of `test_cgroups_v2_vm.py` (Debian's kernel, a pure v2 hierarchy, the
host's root read-only over 9p): real sandboxes under the engine's v2 cgroup path. Prints one line
`V2RESULT <json>` for the test to check."""

from __future__ import annotations

import asyncio
import json
import signal
import traceback
from pathlib import Path
from typing import Any

from contree.engine.runtime import hostcheck

# Debian 12's kernel is 6.1; only overlay's lowerdir+ needs 6.8 and these sandboxes use a plain rootfs.
hostcheck.MIN_KERNEL = (6, 1)

from contree.engine.runtime.sandbox import RuntimeConfig, SandboxRuntime, SandboxSpec  # noqa: E402
from contree.engine.storage.bootstrap import build_busybox_rootfs  # noqa: E402
from tests.engine.test_runtime_support import run  # noqa: E402

MIB = 1 << 20
FILES = ("memory.max", "memory.swap.max", "cpu.max", "pids.max")


def _read(path: Path) -> str:
    return path.read_text().strip()


async def probe(work: Path) -> dict[str, Any]:
    rootfs = work / "rootfs"
    build_busybox_rootfs(rootfs)
    rt = await SandboxRuntime.create(RuntimeConfig(
        state_dir=work / "state", network_mode="none", userns=False, budget_memory_bytes=768 * MIB,
        budget_pids=4096, budget_cpus=1.0))
    out: dict[str, Any] = {"mode": rt.info.cgroup_mode.value, "enforceable": sorted(rt.cgroups.enforceable())}
    try:
        out["parent"] = {f: _read(rt.cgroups._v2() / f) for f in FILES}
        sb = await rt.start(SandboxSpec(sandbox_id="limits", rootfs=rootfs, argv=["sleep", "60"],
                                        networking=False, stdin=False, memory_bytes=64 * MIB, pids_limit=50,
                                        cpu_quota=0.5))
        try:
            assert await sb.wait_created(patience=60), "the sandbox did not start"  # qemu without KVM: slow
            box = rt.cgroups._v2("limits")
            out["sandbox"] = {f: _read(box / f) for f in FILES}
            out["sandbox_procs"] = len(_read(box / "ctr" / "cgroup.procs").split())
            await sb.kill(signal.SIGKILL)
            await sb.wait()
        finally:
            await sb.cleanup()
        out["sandbox_removed"] = not rt.cgroups.exists("limits")

        hog = await run(rt, rootfs, "exec tail /dev/zero", memory_bytes=32 * MIB, networking=False)
        out["oom_init"] = {"oom_killed": hog.exit.oom_killed, "signal": hog.exit.signal,
                           "peak": hog.exit.memory_peak_bytes}
        child = await run(rt, rootfs, "head -c 100m /dev/zero | tail > /dev/null; echo rc=$?",
                          memory_bytes=32 * MIB, networking=False)
        out["oom_child"] = {"oom_killed": child.exit.oom_killed, "code": child.exit.exit_code,
                            "out": child.out}
        fine = await run(rt, rootfs, "head -c 10m /dev/zero | tail > /dev/null; echo ok",
                         memory_bytes=64 * MIB, networking=False)
        out["no_oom"] = {"oom_killed": fine.exit.oom_killed, "out": fine.out}

        bomb = await run(rt, rootfs, "(while :; do sleep 100 & done) 2>/dev/null & sleep 5; "
                         "set -- /proc/[0-9]*; echo $#", pids_limit=32, networking=False)
        out["pids"] = {"procs": int(bomb.out.strip() or -1)}

        busy = "end=$(($(date +%s)+4)); while [ $(date +%s) -lt $end ]; do :; done"
        cpu = await run(rt, rootfs, f"({busy}) & ({busy}); wait", cpu_quota=0.2, networking=False)
        out["cpu"] = {"usage_s": (cpu.exit.cpu_usage_ns or 0) / 1e9, "wall_s": cpu.exit.duration}
    finally:
        await rt.close()
    out["parent_removed"] = not rt.cgroups.exists(None)
    return out


def main() -> None:
    work = Path("/tmp/v2probe")
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = asyncio.run(probe(work))
    except Exception:  # the test shows it
        result = {"error": traceback.format_exc()}
    print("\nV2RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
