"""Embedded engine benchmarks (`make bench` → `python -m bench engine`).

Part 1 (runtime): `echo hi` through SandboxRuntime (overlay mount + bundle + cgroup + crun + cleanup +
unmount) vs a bare `crun run` of the same hardened bundle, interleaved, 20 runs after 2 warm-ups.
Later parts (engine level) are appended to PARTS below by the ops engineer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

RUNS = 20
WARMUPS = 2


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _row(name: str, samples: list[float], base: float | None = None) -> str:
    med = _median_ms(samples)
    p90 = sorted(samples)[int(len(samples) * 0.9) - 1] * 1000
    ratio = f"{med / base:5.2f}x" if base else "   1.00x (base)"
    return f"  {name:<52} median {med:7.2f} ms  p90 {p90:7.2f} ms  {ratio}"


async def _runtime_vs_bare_crun(work: Path) -> None:
    from contree.engine import oci_config, seccomp
    from contree.engine.bootstrap import build_busybox_rootfs
    from contree.engine.overlay import mount_overlay, unmount
    from contree.engine.sandbox import RuntimeConfig, SandboxRuntime, SandboxSpec

    lower = work / "busybox"
    build_busybox_rootfs(lower)
    rt = await SandboxRuntime.create(RuntimeConfig(state_dir=work / "state", network_mode="auto"))
    try:
        crun = rt.binary
        # The bare bundle: the config our runtime generates, on a plain directory (no overlay).
        bare = work / "bare"
        bare.mkdir()
        bare_root = work / "bare-root"
        t0 = time.perf_counter()
        compiled = base64.b64encode(seccomp.compiled_bpf.__wrapped__()).decode()  # uncached, for timing
        seccomp_compile_ms = (time.perf_counter() - t0) * 1000

        def write_bundle(bundle: Path, precompiled: bool) -> None:
            bundle.mkdir(exist_ok=True)
            opts = oci_config.ConfigOptions(
                rootfs=lower, cgroups_path=f"{rt.cgroups.parent}/bare-{bundle.name}/ctr", pids_limit=256,
                rlimits=rt.rlimits, seccomp_bpf_b64=compiled if precompiled else None)
            proc = oci_config.process_section(["sh", "-c", "echo hi"], [], "/", 0, 0, rt.rlimits)
            (bundle / "config.json").write_text(json.dumps(oci_config.build_config(opts, proc)))

        write_bundle(bare, True)
        bare_json = work / "bare-json"
        write_bundle(bare_json, False)

        def bare_run(bundle: Path) -> float:
            cid = f"b{uuid.uuid4().hex[:10]}"
            t = time.perf_counter()
            out = subprocess.run([crun, "--root", str(bare_root), "run", "--bundle", str(bundle), cid],
                                 stdin=subprocess.DEVNULL, capture_output=True, check=True).stdout
            took = time.perf_counter() - t
            assert out == b"hi\n", out
            return took

        async def ours(networking: bool) -> float:
            box = work / "boxes" / uuid.uuid4().hex[:10]
            upper, wk, merged = box / "upper", box / "work", box / "merged"
            for d in (upper, wk, merged):
                d.mkdir(parents=True)
            t = time.perf_counter()
            mount_overlay([lower], upper, wk, merged)
            try:
                spec = SandboxSpec(sandbox_id=box.name, rootfs=merged, argv=["sh", "-c", "echo hi"],
                                   stdin=False, networking=networking)
                sb = await rt.start(spec)
                out, _err, ex = await asyncio.gather(sb.stdout.read(), sb.stderr.read(), sb.wait())
                await sb.cleanup()
            finally:
                unmount(merged)
            took = time.perf_counter() - t
            assert out == b"hi\n" and ex.exit_code == 0, (out, ex)
            shutil.rmtree(box)
            return took

        samples: dict[str, list[float]] = {k: [] for k in ("bare", "bare_json", "ours", "ours_net")}
        for i in range(WARMUPS + RUNS):
            got = {"bare": bare_run(bare), "ours": await ours(False),
                   "bare_json": bare_run(bare_json), "ours_net": await ours(True)}
            if i >= WARMUPS:
                for k, v in got.items():
                    samples[k].append(v)
        base = _median_ms(samples["bare"])
        print(f"  runtime {rt.runtime}, cgroups {rt.info.cgroup_mode.value}, network mode {rt.network.mode}; "
              f"seccomp profile compiled once in {seccomp_compile_ms:.1f} ms")
        print(_row("bare crun run, hardened bundle (precompiled seccomp)", samples["bare"]))
        print(_row("SandboxRuntime + overlay mount/unmount, networking off", samples["ours"], base))
        print(_row("SandboxRuntime + overlay, networking on (veth+NAT)", samples["ours_net"], base))
        print(_row("bare crun run, seccomp compiled by crun per start", samples["bare_json"], base))
        ratio = _median_ms(samples["ours"]) / base
        print(f"  => engine runtime / bare crun = {ratio:.2f}x (target <= 1.5x): "
              f"{'OK' if ratio <= 1.5 else 'OVER TARGET'}")
    finally:
        await rt.close()


def runtime_vs_bare_crun() -> None:
    with tempfile.TemporaryDirectory(prefix="contree-bench-runtime-") as tmp:
        asyncio.run(_runtime_vs_bare_crun(Path(tmp)))


# ---- engine-level parts (ops engineer): append `def part() -> None` functions to PARTS ----

PARTS: list[Callable[[], None]] = [runtime_vs_bare_crun]


def main() -> None:
    for part in PARTS:
        print(f"-- {part.__name__}", flush=True)
        part()
