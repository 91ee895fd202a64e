"""Embedded engine benchmarks (`make bench` → `python -m bench engine`).

Part 1 (runtime): `echo hi` through SandboxRuntime (overlay mount + bundle + cgroup + crun + cleanup +
unmount) vs a bare `crun run` of the same hardened bundle, interleaved, 20 runs after 2 warm-ups.
Later parts (engine level) are appended to PARTS below by the ops engineer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contree import api

if TYPE_CHECKING:
    from contree.engine.local import LocalEngine
    from contree.engine.runtime.limits import SandboxLimits
    from contree.engine.runtime.sandbox import SandboxRuntime

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
    from contree.engine.runtime import oci_config, seccomp
    from contree.engine.runtime.sandbox import RuntimeConfig, SandboxRuntime, SandboxSpec
    from contree.engine.storage.bootstrap import build_busybox_rootfs
    from contree.engine.storage.overlay import mount_overlay, unmount

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

        def write_bundle(bundle: Path, precompiled: bool, with_seccomp: bool = True) -> None:
            bundle.mkdir(exist_ok=True)
            opts = oci_config.ConfigOptions(
                rootfs=lower, cgroups_path=f"{rt.cgroups.parent}/bare-{bundle.name}/ctr", pids_limit=256,
                rlimits=rt.rlimits, seccomp=with_seccomp, seccomp_bpf_b64=compiled if precompiled else None)
            proc = oci_config.process_section(["sh", "-c", "echo hi"], [], "/", 0, 0, rt.rlimits)
            (bundle / "config.json").write_text(json.dumps(oci_config.build_config(opts, proc)))

        write_bundle(bare, True)
        bare_json = work / "bare-json"
        write_bundle(bare_json, False)
        bare_noseccomp = work / "bare-noseccomp"
        write_bundle(bare_noseccomp, False, with_seccomp=False)

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

        # Every run creates and destroys a network namespace; the kernel frees it in the background
        # and a new one waits for that, so samples settle first and veth runs are measured apart.
        samples: dict[str, list[float]] = {}
        rounds: list[dict[str, Callable[[], Awaitable[float]]]] = [
            {"bare": lambda: asyncio.to_thread(bare_run, bare), "ours": lambda: ours(False)},
            {"bare_json": lambda: asyncio.to_thread(bare_run, bare_json),
             "bare_nosec": lambda: asyncio.to_thread(bare_run, bare_noseccomp),
             "ours_net": lambda: ours(True)},
        ]
        for variants in rounds:
            for i in range(WARMUPS + RUNS):
                for name, fn in variants.items():
                    await asyncio.sleep(0.05)
                    took = await fn()
                    if i >= WARMUPS:
                        samples.setdefault(name, []).append(took)
        base = _median_ms(samples["bare"])
        print(f"  runtime {rt.runtime}, cgroups {rt.info.cgroup_mode.value}, network mode {rt.network.mode}; "
              f"seccomp profile compiled once in {seccomp_compile_ms:.1f} ms")
        print(_row("bare crun run, hardened bundle (precompiled seccomp)", samples["bare"]))
        print(_row("SandboxRuntime + overlay mount/unmount, networking off", samples["ours"], base))
        print(_row("SandboxRuntime + overlay, networking on (veth+NAT)", samples["ours_net"], base))
        print(_row("bare crun run, seccomp compiled by crun per start", samples["bare_json"], base))
        print(_row("bare crun run, no seccomp at all", samples["bare_nosec"], base))
        ratio = _median_ms(samples["ours"]) / base
        print(f"  => engine runtime / bare crun = {ratio:.2f}x (target <= 1.5x): "
              f"{'OK' if ratio <= 1.5 else 'OVER TARGET'}")
    finally:
        await rt.close()


def runtime_vs_bare_crun() -> None:
    with tempfile.TemporaryDirectory(prefix="contree-bench-runtime-") as tmp:
        asyncio.run(_runtime_vs_bare_crun(Path(tmp)))


# ---- engine-level parts (ops engineer): append `def part() -> None` functions to PARTS ----

async def _local_engine(work: Path, concurrency: int) -> tuple[LocalEngine, str]:
    """A LocalEngine in `work` with busybox:latest registered; returns (engine, image uuid)."""
    from contree.engine.local import EngineLimits, LocalEngine
    from contree.engine.storage.bootstrap import build_busybox_rootfs

    engine = LocalEngine(work / "home", limits=EngineLimits(instance_max_concurrency=concurrency))
    await engine.start()
    assert engine.store is not None
    stage = engine.store.staging_dir("bench")
    build_busybox_rootfs(stage / "layer")
    image = engine.store.create_image_from_layer_dirs([stage / "layer"], tag="busybox:latest")
    shutil.rmtree(stage, ignore_errors=True)
    return engine, image.uuid


async def _engine_run(
    engine: LocalEngine, image: str, command: str, settle: bool = True, **fields: Any
) -> tuple[float, api.OperationResponse]:
    """Seconds from spawn() to the `completion` event, and the final OperationResponse."""
    t = time.perf_counter()
    spawned = await engine.spawn(api.InstanceSpawnRequest(
        command=command, image=image, shell=True, **fields))
    async for event in engine.events(spawned.uuid, follow=True):
        if event.type == "completion":
            break
    took = time.perf_counter() - t
    op = await engine.get_operation(spawned.uuid)
    assert op.status == "SUCCESS", op
    if settle:
        # Sandbox teardown runs after `completion`; let it finish so it does not slow the next sample.
        await engine.drain()
    return took, op


@contextlib.contextmanager
def _bare_crun_bundle(work: Path, layers: list[Path], rt: SandboxRuntime,
                      limits: SandboxLimits | None = None) -> Iterator[Callable[[], float]]:
    """`crun run` of the config the engine generates for `sh -c 'echo hi'`, networking off: same
    namespaces (user namespace mappings when the engine uses them, over idmapped lowers and a shifted
    upper, bound like the runtime does), seccomp, caps, rlimits, /etc binds and a limits cgroup with the
    engine's default limits. The overlay and the limits cgroup are set up once (pre-mounted rootfs);
    crun creates and removes its own leaf per run. Yields a timer of one run."""
    from contree.engine import spawn
    from contree.engine.runtime import oci_config
    from contree.engine.runtime.cgroups import CgroupLimits
    from contree.engine.runtime.limits import SandboxLimits
    from contree.engine.runtime.netns import NetworkInfo, SandboxNetwork
    from contree.engine.runtime.sandbox import SandboxSpec
    from contree.engine.storage.overlay import bind_mount, mount_overlay, unmount

    bundle, box = work / "bare", work / "bare-box"
    upper, wk, merged = box / "upper", box / "work", box / "merged"
    for d in (bundle, upper, wk, merged):
        d.mkdir(parents=True)
    # Where the runtime binds rootfs too: a path the sandbox's mapped root may traverse (tmp is 0700).
    bind = rt.rootfs_binds / "bare"
    idmap = rt.idmap
    plan = spawn.plan_process(command="echo hi", args=[], shell=True, env=None, cwd="/", uid=0, gid=0,
                              image_env={}, image_cwd="/")
    lim = limits or SandboxLimits(pids=256)
    spec = SandboxSpec(sandbox_id="bare", rootfs=merged, argv=plan.argv,
                       env=[f"{k}={v}" for k, v in plan.env.items()], cwd=plan.cwd, networking=False,
                       stdin=False, memory_bytes=lim.memory_bytes, cpu_quota=lim.cpus, pids_limit=lim.pids)
    if idmap is None:
        mount_overlay(layers, upper, wk, merged)
    else:
        with idmap.lowers(layers) as lowers:
            mount_overlay(lowers, upper, wk, merged)
    mounts = [merged]
    try:
        rootfs = merged
        if idmap is not None:
            idmap.shift_in(upper, merged)
            bind.mkdir(mode=0o755)
            bind_mount(merged, bind)
            mounts.append(bind)
            rootfs = bind
        rt.cgroups.create("bare", CgroupLimits(memory_bytes=spec.memory_bytes, pids=spec.pids_limit,
                                               cpu_quota=spec.cpu_quota))
        opts = oci_config.ConfigOptions(
            rootfs=rootfs, hostname=spec.hostname, cgroups_path=rt.cgroups.runtime_path("bare"),
            netns_path=None, memory_bytes=None, pids_limit=None, cpu_quota=None, rlimits=rt.rlimits,
            seccomp=rt.config.seccomp, seccomp_bpf_b64=rt._seccomp_b64,
            extra_mounts=rt._etc_binds(spec.rootfs, bundle, rt._write_etc_files(
                spec, bundle, SandboxNetwork(info=NetworkInfo(mode="none")))),
            uid_mappings=None if idmap is None else [oci_config.IdMapping(
                containerID=0, hostID=idmap.base, size=idmap.size)],
            gid_mappings=None if idmap is None else [oci_config.IdMapping(
                containerID=0, hostID=idmap.gid_base, size=idmap.size)])
        proc = oci_config.process_section(spec.argv, spec.env, spec.cwd, spec.uid, spec.gid, rt.rlimits)
        config = oci_config.build_config(opts, proc)
        (bundle / "config.json").write_text(json.dumps(config))
        linux = config["linux"]
        userns = f"0->{idmap.base} ({idmap.size} ids), idmapped lowers, shifted upper" if idmap else "off"
        sec = "precompiled bpf" if rt._seccomp_b64 else ("json" if "seccomp" in linux else "off")
        print(f"  bare bundle: runtime {rt.runtime}; namespaces "
              f"{','.join(n['type'] for n in linux['namespaces'])}; user ns {userns}; seccomp {sec}; "
              f"{len(config['process']['capabilities']['bounding'])} caps; "
              f"{len(config['process']['rlimits'])} rlimits; {len(config['mounts'])} mounts; cgroup "
              f"{rt.cgroups.runtime_path('bare')} (memory {spec.memory_bytes}, cpus {spec.cpu_quota}, pids "
              f"{spec.pids_limit}); no network setup")

        def run() -> float:
            t = time.perf_counter()
            res = subprocess.run([*rt.runtime_argv(), "run", "--bundle", str(bundle),
                                  f"b{uuid.uuid4().hex[:10]}"], stdin=subprocess.DEVNULL, capture_output=True)
            assert res.returncode == 0 and res.stdout == b"hi\n", res
            return time.perf_counter() - t

        yield run
    finally:
        with contextlib.suppress(Exception):
            rt.cgroups.remove("bare")
        for m in reversed(mounts):
            unmount(m)
        with contextlib.suppress(OSError):
            bind.rmdir()


async def _echo_hi_engine_vs_crun(work: Path) -> None:
    engine, image = await _local_engine(work, 4)
    try:
        assert engine.store is not None
        layers = engine.store.layer_paths(engine.store.get(image))
        policy = engine.sandbox_limits
        with _bare_crun_bundle(work, layers, engine.runtime, policy.default if policy else None) as bare:
            samples = await _echo_hi_samples(engine, image, bare)
        base = _median_ms(samples["bare"])
        print(_row("bare crun run, same hardened bundle", samples["bare"]))
        print(_row("LocalEngine spawn -> completion, networking off", samples["engine"], base))
        print(_row("LocalEngine spawn -> completion, networking on", samples["engine_net"], base))
        print(_row("  same, no spare network (veth + NAT set up inline)", samples["engine_net_cold"], base))
        ratio = _median_ms(samples["engine"]) / base
        print(f"  => full engine / bare crun = {ratio:.2f}x (target <= 1.5x): "
              f"{'OK' if ratio <= 1.5 else 'OVER TARGET'}")
    finally:
        await engine.close()


async def _echo_hi_samples(
    engine: LocalEngine, image: str, bare: Callable[[], float]
) -> dict[str, list[float]]:
    """Bare and engine (networking off) interleaved, alternating who goes first; the veth runs in a
    round of their own: a veth netns freed by the kernel in the background slows whichever run creates
    the next netns, and that must not land on one side only.

    With networking, a run's teardown sets up the next run's network (as between an agent's sequential
    runs); `engine_net_cold` takes that spare away first (untimed), so the run sets its own up inline,
    as the first run after a burst of parallel ones does."""
    off = api.InstanceNetworking(enabled=False)
    runtime = engine.runtime
    assert runtime is not None

    async def cold() -> float:
        while runtime._spare_nets:
            await runtime.network.teardown(runtime._spare_nets.pop())
        return await _timed(_engine_run(engine, image, "echo hi", disposable=True))

    rounds: list[dict[str, Callable[[], Awaitable[float]]]] = [
        {"bare": lambda: asyncio.to_thread(bare),
         "engine": lambda: _timed(_engine_run(engine, image, "echo hi", disposable=True, networking=off))},
        {"engine_net": lambda: _timed(_engine_run(engine, image, "echo hi", disposable=True))},
        {"engine_net_cold": cold},
    ]
    samples: dict[str, list[float]] = {}
    for variants in rounds:
        for i in range(WARMUPS + RUNS):
            order = list(variants.items())
            for name, fn in order if i % 2 else reversed(order):
                took = await fn()  # back to back: a pause between runs slows both by ~10 ms here
                if i >= WARMUPS:
                    samples.setdefault(name, []).append(took)
    return samples


async def _timed(run: Awaitable[tuple[float, api.OperationResponse]]) -> float:
    return (await run)[0]


def _dirty_the_disk(work: Path, stop: threading.Event) -> None:
    """Keep ~32 MiB of unwritten data in the page cache of the store's filesystem (other tenants'
    writes): whatever syncs that filesystem on a commit's path pays for flushing it."""
    chunk = os.urandom(1 << 20)
    path = work / "dirty"
    while not stop.is_set():
        with open(path, "wb") as fh:
            for _ in range(32):
                fh.write(chunk)
        stop.wait(0.05)


async def _commit_vs_disposable(work: Path) -> None:
    engine, image = await _local_engine(work, 4)
    try:
        for loaded in (False, True):
            stop = threading.Event()
            writer = threading.Thread(target=_dirty_the_disk, args=(work, stop), daemon=True)
            if loaded:
                writer.start()
            try:
                samples: dict[str, list[float]] = {"disposable": [], "commit": []}
                off = api.InstanceNetworking(enabled=False)
                # A few ms separate the two on a shared machine: twice the usual samples, and the order
                # alternates so that neither always runs right after the other's teardown.
                for i in range(WARMUPS + 2 * RUNS):
                    got: dict[str, float] = {}
                    for kind in (("disposable", "commit") if i % 2 else ("commit", "disposable")):
                        took, op = await _engine_run(engine, image, "echo x > /f", networking=off,
                                                     disposable=kind == "disposable")
                        if kind == "commit":
                            assert op.result_image_uuid and op.result_image_uuid != image
                        got[kind] = took
                    if i >= WARMUPS:
                        for kind, took in got.items():
                            samples[kind].append(took)
            finally:
                stop.set()
                if loaded:
                    writer.join()
            load = "disk under write load (32 MiB kept dirty)" if loaded else "idle disk"
            base = _median_ms(samples["disposable"])
            print(f"  {load}:")
            print(_row("one-file change, disposable=true", samples["disposable"]))
            print(_row("one-file change, disposable=false (commit)", samples["commit"], base))
            extra = _median_ms(samples["commit"]) - base
            verdict = "OK" if extra <= 5 else "OVER TARGET"
            print(f"  => commit costs {extra:+.2f} ms per run, {load} (target <= 5 ms): {verdict}")
    finally:
        await engine.close()


@contextlib.contextmanager
def _limits_off(engine: LocalEngine) -> Iterator[None]:
    """The engine as it ran before issue 17's limits: no memory/CPU cgroup limits (pids 256) and the
    upper on the store's own filesystem (no layer filesystem; commit = rename)."""
    from contree.engine.runtime.limits import LimitPolicy, SandboxLimits
    from contree.engine.storage import upperfs

    saved_policy, saved = engine.sandbox_limits, (upperfs.mount, upperfs.seal, upperfs.usage)
    old = SandboxLimits(pids=256)
    engine.sandbox_limits = LimitPolicy(default=old, maximum=old, total=old)

    def mkdirs(path: Path, budget: object) -> None:
        for sub in ("upper", "work", "rootfs"):
            (path / sub).mkdir(exist_ok=True)

    def no_usage(path: Path, budget: object) -> upperfs.LayerUsage:
        raise OSError("no layer filesystem")

    upperfs.mount, upperfs.seal, upperfs.usage = mkdirs, lambda path, budget: None, no_usage  # type: ignore[assignment]
    try:
        yield
    finally:
        engine.sandbox_limits = saved_policy
        upperfs.mount, upperfs.seal, upperfs.usage = saved  # type: ignore[assignment]


async def _limits_cost(work: Path) -> None:
    engine, image = await _local_engine(work, 4)
    try:
        off = api.InstanceNetworking(enabled=False)
        policy = engine.sandbox_limits
        assert policy is not None
        d = policy.default
        print(f"  default limits: memory {d.memory_bytes}, cpus {d.cpus}, pids {d.pids}; each run's layer "
              "on a tmpfs (size=, nr_inodes=)")
        cases = (("echo hi, disposable", "echo hi", True),
                 ("one-file change, disposable=false (commit)", "echo x > /f", False),
                 ("untar 1,600 files / 16 MB, disposable", "mkdir /x && tar xf /t.tar -C /x", True),
                 ("untar 1,600 files / 16 MB, disposable=false (commit)", "mkdir /x && tar xf /t.tar -C /x",
                  False))
        image = _with_tarball(engine, image, work)
        for label, command, disposable in cases:
            samples: dict[str, list[float]] = {"off": [], "on": []}
            for i in range(WARMUPS + 2 * RUNS):
                for kind in (("off", "on") if i % 2 else ("on", "off")):
                    if kind == "off":
                        with _limits_off(engine):
                            took, op = await _engine_run(engine, image, command, networking=off,
                                                         disposable=disposable)
                    else:
                        took, op = await _engine_run(engine, image, command, networking=off,
                                                     disposable=disposable)
                    assert disposable or (op.result_image_uuid and op.result_image_uuid != image)
                    if i >= WARMUPS:
                        samples[kind].append(took)
            base = _median_ms(samples["off"])
            print(_row(f"{label}: no limits, upper on the store's fs (before)", samples["off"]))
            print(_row(f"{label}: memory/CPU/pids limits + layer fs", samples["on"], base))
            extra = _median_ms(samples["on"]) - base
            verdict = "OK" if extra <= 1 else "OVER TARGET"
            print(f"  => the limits cost {extra:+.2f} ms per run ({label}; target <= 1 ms): {verdict}")
    finally:
        await engine.close()


def _with_tarball(engine: LocalEngine, image: str, work: Path) -> str:
    """A child of `image` holding /t.tar: 1,600 files of 10 KB in 50 directories."""
    import tarfile

    assert engine.store is not None
    src = work / "tree"
    for i in range(1600):
        d = src / f"d{i % 50}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(10_000))
    stage = engine.store.staging_dir("bench-tar")
    with tarfile.open(stage / "t.tar", "w") as tar:
        tar.add(src, arcname=".")
    shutil.rmtree(src)
    return engine.store.create_image_from_layer_dirs([stage], parent=engine.store.get(image)).uuid


def limits_cost() -> None:
    _in_tmp(_limits_cost, "contree-bench-limits-")


def commit_copy_vs_rename() -> None:
    """`Store.commit_upper` alone: an upper on the run's layer filesystem (tmpfs, copied into the store)
    vs an upper on the store's filesystem (renamed, as before issue 17), for three sizes of change."""
    from contree.engine.storage import upperfs
    from contree.engine.storage.overlay import unmount
    from contree.engine.storage.store import Store

    def fill(upper: Path, files: int, size: int) -> None:
        for i in range(files):
            d = upper / f"d{i % 50}"
            d.mkdir(exist_ok=True)
            (d / f"f{i}").write_bytes(b"x" * size)

    with tempfile.TemporaryDirectory(prefix="contree-bench-commit-copy-") as tmp:
        store = Store(Path(tmp) / "home")
        try:
            stage = store.staging_dir()
            (stage / "etc").mkdir()
            base = store.create_image_from_layer_dir(stage)
            budget = upperfs.LayerBudget.for_limit(1 << 30)
            sizes = (("one 2-byte file", 1, 2, RUNS), ("1,600 files, 16 MB", 1600, 10_000, 10),
                     ("1,600 files, 160 MB", 1600, 100_000, 5))
            for label, files, size, runs in sizes:
                samples: dict[str, list[float]] = {"rename": [], "copy": []}
                for i in range(runs + 1):
                    for kind in ("rename", "copy") if i % 2 else ("copy", "rename"):
                        box = store.sandboxes_dir / uuid.uuid4().hex
                        box.mkdir()
                        if kind == "copy":
                            upperfs.mount(box, budget)
                        else:
                            (box / "upper").mkdir()
                        fill(box / "upper", files, size)
                        t = time.perf_counter()
                        child = store.commit_upper(box / "upper", base, None, 1 << 30)
                        took = time.perf_counter() - t
                        assert child is not None
                        if kind == "copy":
                            unmount(box)
                        shutil.rmtree(box)
                        if i:
                            samples[kind].append(took)
                base_ms = _median_ms(samples["rename"])
                print(_row(f"{label}: rename (upper on the store's fs)", samples["rename"]))
                print(_row(f"{label}: copy from the layer fs", samples["copy"], base_ms))
        finally:
            store.close()


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # "5" resets VmHWM: the peak of this round only
        fh.write("5")


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def _parallel_branches(work: Path, n: int = 20) -> None:
    engine, image = await _local_engine(work, n)
    try:
        _took, base_op = await _engine_run(engine, image, "mkdir /data && echo base > /data/f",
                                           networking=api.InstanceNetworking(enabled=False))
        parent = base_op.result_image_uuid
        assert parent is not None
        for rounds, net in ((1, False), (1, True)):
            for _ in range(rounds):
                _reset_peak_rss()
                rss0 = _rss_kb("VmRSS")
                t = time.perf_counter()
                cmd = "echo {k} >> /data/f && head -c 4096 /dev/urandom > /data/r{k}"
                networking = api.InstanceNetworking(enabled=net)
                results = await asyncio.gather(*(
                    _engine_run(engine, parent, cmd.format(k=k), settle=False, networking=networking)
                    for k in range(n)))
                await engine.drain()
                wall = time.perf_counter() - t
                peak = _rss_kb("VmHWM")
                children = {op.result_image_uuid for _, op in results}
                assert len(children) == n and parent not in children
                lat = sorted(r[0] for r in results)
                print(f"  {n} parallel branches of one image, networking {'on ' if net else 'off'}: "
                      f"{wall * 1000:7.1f} ms wall, {n / wall:5.1f} runs/s, latency median "
                      f"{statistics.median(lat) * 1000:.1f} ms max {lat[-1] * 1000:.1f} ms; engine RSS "
                      f"{rss0 / 1024:.1f} MiB -> peak {peak / 1024:.1f} MiB")
    finally:
        await engine.close()


def _in_tmp(coro: Callable[[Path], Coroutine[Any, Any, None]], prefix: str) -> None:
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        asyncio.run(coro(Path(tmp)))


def echo_hi_engine_vs_crun() -> None:
    _in_tmp(_echo_hi_engine_vs_crun, "contree-bench-engine-")


def commit_vs_disposable() -> None:
    _in_tmp(_commit_vs_disposable, "contree-bench-commit-")


def parallel_branches() -> None:
    _in_tmp(_parallel_branches, "contree-bench-parallel-")


# ---- store part: inspect without a sandbox ----


def read_small_file_10_layers() -> None:
    """Reading /etc/passwd (bottom layer; `etc/` in all 10 layers) without a sandbox, vs mount + read."""
    from contree.engine.storage import inspect
    from contree.engine.storage.overlay import mount_overlay, unmount
    from contree.engine.storage.resolver import Resolver
    from contree.engine.storage.store import Store

    with tempfile.TemporaryDirectory(prefix="contree-bench-resolver-") as tmp:
        store = Store(Path(tmp) / "home")
        try:
            stage = store.staging_dir()
            (stage / "etc").mkdir()
            (stage / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n" * 20)
            image = store.create_image_from_layer_dir(stage)
            for i in range(9):
                stage = store.staging_dir()
                (stage / "etc").mkdir()
                (stage / "etc" / f"file{i}").write_text(str(i))
                image = store.create_image_from_layer_dir(stage, parent=image)
            assert image.depth == 10
            expected = inspect.read_bytes(store, image, "/etc/passwd")
            mnt = Path(tmp) / "mnt"
            mnt.mkdir()

            def cached() -> float:
                t = time.perf_counter()
                assert inspect.read_bytes(store, image, "/etc/passwd") == expected
                return time.perf_counter() - t

            def cold() -> float:
                t = time.perf_counter()
                with Resolver(store.layer_paths(image)) as r:
                    assert r.read_bytes("/etc/passwd") == expected
                return time.perf_counter() - t

            def mounted() -> float:
                t = time.perf_counter()
                mount_overlay(store.layer_paths(image), None, None, mnt, readonly=True)
                try:
                    assert (mnt / "etc" / "passwd").read_bytes() == expected
                finally:
                    unmount(mnt)
                return time.perf_counter() - t

            samples: dict[str, list[float]] = {"mounted": [], "cold": [], "cached": []}
            for _ in range(WARMUPS):
                cached(), cold(), mounted()
            for _ in range(200):  # interleaved, so noise hits all three alike
                samples["cached"].append(cached())
                samples["cold"].append(cold())
                if len(samples["mounted"]) < 50:
                    samples["mounted"].append(mounted())
            base = _median_ms(samples["mounted"])
            print(_row("mount overlay + read + umount (baseline)", samples["mounted"]))
            print(_row("resolver, fresh (open 10 layer fds + read)", samples["cold"], base))
            print(_row("inspect.read_bytes, cached resolver (target <= 1 ms)", samples["cached"], base))
        finally:
            store.close()


PARTS: list[Callable[[], None]] = [runtime_vs_bare_crun, echo_hi_engine_vs_crun, commit_vs_disposable,
                                   limits_cost, commit_copy_vs_rename, parallel_branches,
                                   read_small_file_10_layers]


def main() -> None:
    for part in PARTS:
        print(f"-- {part.__name__}", flush=True)
        part()
