"""SandboxRuntime: starting, feeding, waiting for, exec'ing into, killing and cleaning up sandboxes."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
from pathlib import Path

import msgspec
import pytest

from contree.engine.runtime import hostcheck, oci_config, sandbox
from contree.engine.runtime.cgroups import CgroupLimits, CgroupManager
from contree.engine.runtime.hostcheck import CgroupMode, NoRuntimeAvailable
from contree.engine.runtime.sandbox import SandboxRuntime, SandboxSpec
from contree.engine.storage.overlay import is_mountpoint
from tests.engine.test_runtime_support import open_runtime, overlay_rootfs, run

pytestmark = pytest.mark.engine


# ---- host detection and config (no sandbox) ----

def test_cgroup_mode_matches_the_filesystem_type() -> None:
    mode, unified = hostcheck.cgroup_mode()
    fstype = Path("/proc/self/mountinfo").read_text()
    if mode is CgroupMode.V2:
        assert unified == hostcheck.CGROUP_ROOT
    else:
        assert " /sys/fs/cgroup " in fstype
        assert (unified is not None) == (mode is CgroupMode.HYBRID)


def test_rlimits_never_exceed_the_engines_hard_limits() -> None:
    got = oci_config.clamp_rlimits(oci_config.host_hard_rlimits())
    assert got["RLIMIT_CORE"] == 0
    for name, value in got.items():
        hard = resource.getrlimit(getattr(resource, name))[1]
        assert hard == resource.RLIM_INFINITY or value <= hard
    assert oci_config.clamp_rlimits({"RLIMIT_NOFILE": 512})["RLIMIT_NOFILE"] == 512


def test_config_is_hardened() -> None:
    opts = oci_config.ConfigOptions(rootfs=Path("/r"), cgroups_path="/contree-engine/e/s/ctr",
                                    memory_bytes=1 << 28, cpu_quota=0.5, seccomp_bpf_b64="AAAA")
    cfg = oci_config.build_config(opts, oci_config.process_section(["true"], [], "/", 0, 0, {}))
    caps = cfg["process"]["capabilities"]
    assert len(caps["bounding"]) == 11 and caps["inheritable"] == caps["ambient"] == []
    assert "CAP_SYS_ADMIN" not in caps["effective"] and "CAP_NET_RAW" not in caps["effective"]
    assert cfg["process"]["noNewPrivileges"] is True
    assert {n["type"] for n in cfg["linux"]["namespaces"]} == {"pid", "ipc", "uts", "mount", "cgroup",
                                                                "network"}
    assert cfg["linux"]["cgroupsPath"].startswith("/")
    assert cfg["linux"]["resources"]["memory"] == {"limit": 1 << 28, "swap": 1 << 28}
    assert cfg["linux"]["resources"]["cpu"] == {"quota": 50_000, "period": 100_000}
    assert "/proc/sys" in cfg["linux"]["readonlyPaths"] and "/proc/kcore" in cfg["linux"]["maskedPaths"]
    assert cfg["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"
    assert cfg["annotations"]["run.oci.seccomp_bpf_data"] == "AAAA"
    assert next(m for m in cfg["mounts"] if m["destination"] == "/sys")["options"][-1] == "ro"


def test_missing_runtimes_are_named_with_their_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostcheck, "find_binary", lambda name: None)
    info = hostcheck.detect()
    with pytest.raises(NoRuntimeAvailable, match="apt-get install crun runc"):
        hostcheck.select_runtime(info, "auto")
    with pytest.raises(NoRuntimeAvailable, match="Debian package runsc"):
        hostcheck.select_runtime(info, "runsc")


def test_crun_unusable_falls_back_to_runc(monkeypatch: pytest.MonkeyPatch) -> None:
    real = hostcheck.find_binary
    monkeypatch.setattr(hostcheck, "find_binary", lambda name: None if name == "crun" else real(name))
    name, binary = hostcheck.select_runtime(hostcheck.detect(), "auto")
    assert name == "runc" and binary.endswith("runc")


# ---- running sandboxes ----

async def test_echo_with_stdin_stdout_stderr_and_exit_code(runtime: SandboxRuntime, rootfs: Path) -> None:
    r = await run(runtime, rootfs, "read line; echo \"got $line\"; echo oops >&2; exit 3", stdin=b"hello\n")
    assert r.out == "got hello\n" and r.err == "oops\n"
    assert r.exit.exit_code == 3 and r.exit.signal is None


async def test_env_cwd_user_and_hostname_are_applied(runtime: SandboxRuntime, rootfs: Path) -> None:
    r = await run(runtime, rootfs, 'echo "$FOO $(pwd) $(id -u):$(id -g) $(hostname)"', env=["FOO=bar"],
                  cwd="/tmp", uid=1000, gid=1001, hostname="box1")
    assert r.out == "bar /tmp 1000:1001 box1\n", r.err


async def test_resources_are_reported(runtime: SandboxRuntime, rootfs: Path) -> None:
    r = await run(runtime, rootfs, "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo $i")
    assert r.out == "20000\n"
    assert r.exit.user_time + r.exit.system_time > 0
    assert r.exit.max_rss_kb > 0 and r.exit.duration > 0
    assert r.exit.memory_peak_bytes and r.exit.memory_peak_bytes > 0
    assert r.exit.cpu_usage_ns and r.exit.cpu_usage_ns > 1_000_000


async def test_kill_ends_a_running_sandbox_with_sigkill(runtime: SandboxRuntime, rootfs: Path) -> None:
    sb = await runtime.start(SandboxSpec(sandbox_id="k1", rootfs=rootfs, stdin=False, networking=False,
                                         argv=["sh", "-c", "echo started; sleep 600"]))
    try:
        assert await asyncio.wait_for(sb.stdout.readline(), 30) == b"started\n"
        await sb.kill()
        ex = await asyncio.wait_for(sb.wait(), 30)
    finally:
        await sb.cleanup()
    assert ex.signal == signal.SIGKILL and ex.exit_code is None and ex.duration < 30


async def test_exec_runs_a_second_process_and_signals_it(runtime: SandboxRuntime, rootfs: Path) -> None:
    sb = await runtime.start(SandboxSpec(sandbox_id="exec1", rootfs=rootfs, argv=["sleep", "600"],
                                         stdin=False, networking=False))
    try:
        # exec right away: it waits for the runtime to record the container
        p = await sb.exec(["sh", "-c", "read x; echo \"$x from $$\"; cat /proc/self/status"], env=["A=1"])
        assert sb.created() and sb.pid > 0
        assert p.stdin is not None
        p.stdin.write(b"hi\n")
        await p.stdin.drain()
        p.stdin.close()
        out = (await p.stdout.read()).decode()
        assert (await p.wait()).exit_code == 0
        assert out.startswith("hi from ") and int(out.split()[2]) >= 2  # not the sandbox's init
        assert "NoNewPrivs:\t1" in out and "Seccomp:\t2" in out and "CapEff:\t00000000800405fb" in out
        q = await sb.exec(["sleep", "600"], stdin=False)
        for _ in range(100):
            if q.host_pid:
                break
            await asyncio.sleep(0.02)
        q.signal(signal.SIGTERM)
        res = await asyncio.wait_for(q.wait(), 10)
        assert res.signal == signal.SIGTERM or res.exit_code == 128 + signal.SIGTERM
    finally:
        await sb.cleanup()
    assert sb.bundle.exists() is False


async def test_cleanup_is_idempotent_and_kills_a_running_sandbox(runtime: SandboxRuntime,
                                                                  rootfs: Path) -> None:
    sb = await runtime.start(SandboxSpec(sandbox_id="c1", rootfs=rootfs, argv=["sleep", "600"],
                                         networking=False))
    assert await sb.wait_created(30)
    assert runtime.cgroups.procs("c1")
    await sb.cleanup()
    await sb.cleanup()
    assert not runtime.cgroups.exists("c1")
    assert (await sb.wait()).signal == signal.SIGKILL


async def test_same_sandbox_id_cannot_run_twice(runtime: SandboxRuntime, rootfs: Path) -> None:
    sb = await runtime.start(SandboxSpec(sandbox_id="dup", rootfs=rootfs, argv=["sleep", "600"],
                                         networking=False))
    try:
        with pytest.raises(ValueError, match="already running"):
            await runtime.start(SandboxSpec(sandbox_id="dup", rootfs=rootfs, argv=["true"]))
    finally:
        await sb.cleanup()


async def test_runtime_files_are_bound_not_written_into_the_image(runtime: SandboxRuntime, rootfs: Path,
                                                                   busybox_rootfs: Path) -> None:
    r = await run(runtime, rootfs, "cat /etc/hostname; echo x >> /etc/hosts; echo done",
                  hostname="h2")
    assert r.out == "h2\ndone\n"
    upper = rootfs.parent / "upper"
    assert not (upper / "etc").exists(), list(upper.rglob("*"))


async def test_runc_runs_the_same_hardened_bundle(mount_guard: Path, rootfs: Path) -> None:
    async with open_runtime(mount_guard, runtime="runc", network_mode="none") as rt:
        r = await run(rt, rootfs, "grep -e CapEff -e NoNewPrivs -e '^Seccomp:' /proc/self/status; exit 4")
    assert r.exit.exit_code == 4
    assert "CapEff:\t00000000800405fb" in r.out and "NoNewPrivs:\t1" in r.out and "Seccomp:\t2" in r.out


async def test_parallel_sandboxes_do_not_interfere(runtime: SandboxRuntime, busybox_rootfs: Path,
                                                   mount_guard: Path) -> None:
    roots = [overlay_rootfs(busybox_rootfs, mount_guard) for _ in range(6)]
    results = await asyncio.gather(*(run(runtime, r, f"echo {i} > /tmp/me; sleep 0.2; cat /tmp/me")
                                     for i, r in enumerate(roots)))
    assert [r.out for r in results] == [f"{i}\n" for i in range(6)]


def test_config_json_is_valid_for_crun(tmp_path: Path) -> None:
    opts = oci_config.ConfigOptions(rootfs=tmp_path, cgroups_path="/x/y")
    text = json.dumps(oci_config.build_config(opts, oci_config.process_section(["a"], ["B=1"], "", 5, 6, {})))
    cfg = json.loads(text)
    assert cfg["process"]["cwd"] == "/" and cfg["process"]["user"] == {"uid": 5, "gid": 6,
                                                                       "additionalGids": []}
    assert cfg["process"]["env"][0].startswith("PATH=")


@pytest.mark.slow
async def test_runsc_is_selectable_for_strong_isolation(mount_guard: Path, rootfs: Path) -> None:
    async with open_runtime(mount_guard, runtime="runsc", network_mode="none") as rt:
        r = await run(rt, rootfs, "dmesg | head -1; id -u; exit 5", networking=True)
    assert r.exit.exit_code == 5 and r.out.splitlines()[-1] == "0"
    assert "gVisor" in r.out  # the Sentry's own kernel log, not the host's
    assert r.network.mode == "none" and r.network.error and "runsc" in r.network.error


async def test_a_command_that_cannot_start_fails_cleanly(runtime: SandboxRuntime, rootfs: Path) -> None:
    sb = await runtime.start(SandboxSpec(sandbox_id="nocmd", rootfs=rootfs, argv=["/no/such/binary"],
                                         stdin=False, networking=False))
    try:
        _out, err, ex = await asyncio.wait_for(asyncio.gather(sb.stdout.read(), sb.stderr.read(), sb.wait()),
                                              30)
    finally:
        await sb.cleanup()
    assert ex.exit_code not in (0, None) and b"no/such/binary" in err
    assert not runtime.cgroups.exists("nocmd") and not sb.bundle.exists()


def test_hugetlb_fix_applies_only_to_hybrid_hosts_whose_unified_tree_owns_controllers(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("hugetlb\n")
    info = hostcheck.HostInfo(is_root=True, kernel=(6, 18), cgroup_mode=CgroupMode.HYBRID,
                              unified_root=tmp_path, v1_controllers={}, nofile_hard=1024, nproc_hard=1024)
    assert hostcheck.needs_hugetlb_fix(info)
    v2 = msgspec.structs.replace(info, cgroup_mode=CgroupMode.V2)
    assert not hostcheck.needs_hugetlb_fix(v2) and hostcheck.apply_hugetlb_fix(v2) is False
    (tmp_path / "cgroup.controllers").write_text("")
    assert not hostcheck.needs_hugetlb_fix(info)


async def test_the_engine_budget_limits_the_parent_cgroup(mount_guard: Path) -> None:
    async with open_runtime(mount_guard, network_mode="none", budget_memory_bytes=1 << 30,
                            budget_pids=1000) as rt:
        if rt.cgroups.v2:
            parent = hostcheck.CGROUP_ROOT / rt.cgroups.parent.lstrip("/")
            assert (parent / "memory.max").read_text().strip() == str(1 << 30)
            assert (parent / "pids.max").read_text().strip() == "1000"
        else:
            mem = rt.info.v1_controllers["memory"] / rt.cgroups.parent.lstrip("/")
            pids = rt.info.v1_controllers["pids"] / rt.cgroups.parent.lstrip("/")
            assert (mem / "memory.limit_in_bytes").read_text().strip() == str(1 << 30)
            assert (pids / "pids.max").read_text().strip() == "1000"


async def test_sandboxes_of_an_engine_that_died_are_killed_by_the_next_one(mount_guard: Path,
                                                                           rootfs: Path) -> None:
    async with open_runtime(mount_guard / "a", network_mode="none") as dead:
        sb = await dead.start(SandboxSpec(sandbox_id="orphan", rootfs=rootfs, argv=["sleep", "600"],
                                          stdin=False, networking=False))
        try:
            assert await sb.wait_created(30)
            assert dead.cgroups.procs("orphan")
            os.close(dead._lock_fd)  # what the kernel does when the engine process is SIGKILLed
            dead._lock_fd = -1
            async with open_runtime(mount_guard / "b", network_mode="none") as successor:
                assert successor.engine_id != dead.engine_id
                assert not dead.cgroups.exists(None), "the dead engine's cgroups are still there"
                assert not dead.bundles.exists(), "the dead engine's bundles are still there"
                ex = await asyncio.wait_for(sb.wait(), 10)
                assert ex.signal == signal.SIGKILL or ex.exit_code == 128 + signal.SIGKILL
        finally:
            await sb.cleanup()


def test_v2_cgroups_kill_and_remove_through_the_unified_hierarchy() -> None:
    """The v2 code path, exercised on whatever cgroup2 mount this host has (hybrid: no controllers)."""
    info = hostcheck.detect()
    assert info.unified_root is not None, "no cgroup2 hierarchy mounted"
    v2 = msgspec.structs.replace(info, cgroup_mode=CgroupMode.V2, v1_controllers={})
    mgr = CgroupManager(v2, f"/contree-test-{os.getpid()}")
    mgr.setup_parent()
    proc = subprocess.Popen(["sleep", "600"])
    try:
        mgr.create("s1", CgroupLimits())
        (info.unified_root / mgr.parent.lstrip("/") / "s1" / "cgroup.procs").write_text(str(proc.pid))
        assert mgr.procs("s1") == [proc.pid]
        mgr.kill_all("s1")
        assert proc.wait(10) == -signal.SIGKILL
        mgr.remove(None)
        assert not mgr.exists(None)
    finally:
        proc.kill()
        proc.wait()
        mgr.remove(None)


async def test_a_sandbox_cpu_quota_above_the_engine_budget_is_clamped(mount_guard: Path,
                                                                      rootfs: Path) -> None:
    async with open_runtime(mount_guard, network_mode="none", budget_cpus=1.0) as rt:
        r = await run(rt, rootfs, "echo ok", cpu_quota=2.0)
    assert r.out == "ok\n" and r.exit.exit_code == 0


async def test_a_restarted_engine_with_the_same_id_kills_its_predecessors_sandboxes(mount_guard: Path,
                                                                                    rootfs: Path) -> None:
    engine_id = f"t{os.getpid():07x}"[-8:]
    async with open_runtime(mount_guard / "a", network_mode="none", engine_id=engine_id) as dead:
        sb = await dead.start(SandboxSpec(sandbox_id="orphan2", rootfs=rootfs, argv=["sleep", "600"],
                                          stdin=False, networking=False))
        try:
            assert await sb.wait_created()
            os.close(dead._lock_fd)
            dead._lock_fd = -1
            assert sb.rootfs_bind is not None and is_mountpoint(sb.rootfs_bind)
            async with open_runtime(mount_guard / "b", network_mode="none", engine_id=engine_id) as again:
                assert not again.cgroups.exists("orphan2")
                assert not is_mountpoint(sb.rootfs_bind)  # the successor released the dead one's bind
                ex = await asyncio.wait_for(sb.wait(), 10)
                assert ex.signal == signal.SIGKILL or ex.exit_code == 128 + signal.SIGKILL
                r = await run(again, rootfs, "echo alive")
                assert r.out == "alive\n"
        finally:
            await sb.cleanup()


async def test_requiring_a_user_namespace_runsc_cannot_honour_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(NoRuntimeAvailable, match="user namespace requested but unavailable"):
        await SandboxRuntime.create(sandbox.RuntimeConfig(state_dir=tmp_path, userns=True, runtime="runsc"))
