"""The isolation suite (issue 3, "Must show"): root inside a sandbox cannot harm the image or the host.

Every test that takes `runtime` runs twice: with the root engine's runtime (in this process) and with a
rootless one, run by a throwaway user in its own namespaces (`rootless_host.py`), on the same scripts.
Where rootless mode differs, the test says so and checks what rootless mode does instead:

* the fork bomb: no cgroup is delegated here, so the limit is the sandbox's own user namespace's task
  limit (RLIMIT_NPROC, counted across all its uids: contree/engine/runtime/rootless/limits.py), seen from
  inside the sandbox instead of through pids.current;
* the memory hog: without a delegated cgroup no memory limit exists, and the runtime says so (limits
  enforced: pids only); the hog is not run, it would take the host's memory;
* spare cgroups: there are none; spare namespaces take their place and are used by the next run;
* rm -rf /: the image's layer and the run's upper live in the user's home and are read there.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from contree.engine.runtime import seccomp
from contree.engine.runtime.sandbox import SandboxRuntime, SandboxSpec
from tests.engine.test_runtime_support import RootlessRuntime, open_rootless_runtime, open_runtime, run

pytestmark = pytest.mark.engine
Runtime = SandboxRuntime | RootlessRuntime


@pytest.fixture(params=["root", "rootless"])
async def runtime(request: pytest.FixtureRequest, mount_guard: Path) -> AsyncIterator[Runtime]:
    if request.param == "root":
        async with open_runtime(mount_guard, network_mode="none") as rt:
            yield rt
    else:
        async with open_rootless_runtime(request.getfixturevalue("rootless_user")) as host:
            yield host


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_uid)
    return out


async def test_rm_rf_root_leaves_the_image_and_the_host_intact(runtime: Runtime, rootfs: Path,
                                                               busybox_rootfs: Path,
                                                               mount_guard: Path) -> None:
    if isinstance(runtime, RootlessRuntime):
        before = (await runtime.request({"op": "snapshot"}))["tree"]
    else:
        before = snapshot(busybox_rootfs)
    sentinel = mount_guard / "host-sentinel"
    sentinel.write_text("still here")
    r = await run(runtime, rootfs, "rm -rf / 2>/dev/null; ls /bin/busybox 2>&1; echo done")
    assert r.out.endswith("done\n") and "No such file" in r.out
    assert sentinel.read_text() == "still here"
    if isinstance(runtime, RootlessRuntime):  # the layer and the upper live in the user's home
        assert (await runtime.request({"op": "snapshot"}))["tree"] == before
        mode, rdev = runtime.upper["bin"]
    else:
        assert snapshot(busybox_rootfs) == before
        whiteout = os.lstat(rootfs.parent / "upper" / "bin")
        mode, rdev = whiteout.st_mode, whiteout.st_rdev
    # The deleted lower directory is now a whiteout (a 0:0 character device) in the upper only.
    assert stat.S_ISCHR(mode) and rdev == 0


async def test_no_host_processes_are_visible(runtime: Runtime, rootfs: Path) -> None:
    r = await run(runtime, rootfs, "ls /proc | grep -c '^[0-9]'; cat /proc/1/cmdline | tr '\\0' ' '")
    count, cmdline = r.out.splitlines()
    assert int(count) <= 4, r.out
    assert cmdline.startswith("sh -c ls /proc")


async def test_host_loopback_service_is_unreachable(runtime: Runtime, rootfs: Path) -> None:
    hits = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(1)
        writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        r = await run(runtime, rootfs, f"nc -w 2 127.0.0.1 {port} </dev/null && echo REACHED || echo REFUSED",
                      networking=False)
    finally:
        server.close()
    assert r.out.strip() == "REFUSED" and not hits


async def test_proc_sys_and_sys_are_read_only(runtime: Runtime, rootfs: Path) -> None:
    script = ("for f in /proc/sys/vm/drop_caches /proc/sys/kernel/hostname /proc/sysrq-trigger; do "
              "echo 1 > $f 2>/dev/null && echo \"WROTE $f\"; done; "
              "mkdir /sys/fs/x 2>/dev/null && echo WROTE-SYS; "
              "touch /sys/kernel/x 2>/dev/null && echo WROTE-SYS2; "
              "grep -E ' /(proc/sys|sys) ' /proc/self/mounts | cut -d' ' -f2,4")
    r = await run(runtime, rootfs, script)
    assert "WROTE" not in r.out, r.out
    mounts = dict(line.split(" ", 1) for line in r.out.splitlines())
    assert mounts["/sys"].startswith("ro,") and mounts["/proc/sys"].startswith("ro,")


@pytest.mark.parametrize(("name", "script"), [
    ("mount", "mount -t tmpfs t /mnt"),
    ("mount proc", "mount -t proc p /mnt"),
    ("mknod", "mknod /tmp/blk b 8 0"),
    ("module", "head -c 4096 /dev/urandom > /tmp/m.ko; insmod /tmp/m.ko"),
    ("new user namespace", "unshare -U -r true"),
    ("new mount namespace", "unshare -m true"),
    ("new net namespace", "unshare -n true"),
    ("sethostname", "hostname evil"),
    ("reboot", "reboot -f"),
    ("set the clock", "date -s 2000-01-01 >/dev/null && [ \"$(date +%Y)\" = 2000 ]"),
])
async def test_privileged_operations_are_refused(runtime: Runtime, rootfs: Path, name: str,
                                                 script: str) -> None:
    r = await run(runtime, rootfs, f"{script}; echo rc=$?")
    assert "rc=0" not in r.out, f"{name} succeeded: {r.out} {r.err}"
    assert "not permitted" in r.err or "ermission denied" in r.err, r.err


async def test_kernel_interfaces_are_masked(runtime: Runtime, rootfs: Path) -> None:
    r = await run(runtime, rootfs, "for f in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug; do "
                                   "[ -e $f ] && echo \"$f $(head -c 64 $f 2>/dev/null | wc -c)\"; done; "
                                   "ls /sys/firmware 2>/dev/null | wc -l")
    lines = r.out.splitlines()
    assert all(line.endswith(" 0") for line in lines[:-1]), r.out  # masked: empty (bound to /dev/null)
    assert lines[-1] == "0", r.out


async def test_fork_bomb_stops_at_the_pids_limit(runtime: Runtime, rootfs: Path) -> None:
    limit = 32
    if isinstance(runtime, RootlessRuntime):
        # Counted from inside with shell builtins only (no fork is left once the bomb has them all):
        # every task of the sandbox, whatever its uid, is within its namespace's limit.
        r = await run(runtime, rootfs, "(b() { b | b & }; b) 2>/tmp/err; sleep 2; set -- /proc/[0-9]*; "
                      "echo procs=$#; n=0; while read -r l; do n=$((n+1)); done </tmp/err; echo refused=$n",
                      pids_limit=limit, kill_after=15)
        seen = dict(line.split("=") for line in r.out.split() if "=" in line)
        assert 0 < int(seen["procs"]) <= limit, r
        assert int(seen["refused"]) > 0, f"the limit never refused a fork: {r}"
        return
    sb = await runtime.start(SandboxSpec(sandbox_id="bomb", rootfs=rootfs, networking=False, stdin=False,
                                         pids_limit=limit, cpu_quota=1.0,
                                         argv=["sh", "-c", "b() { b | b & }; b; sleep 600"]))
    try:
        refused, peak = 0, 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30  # generous: the machine may be busy with other test sessions
        while loop.time() < deadline and refused == 0:
            await asyncio.sleep(0.05)
            current, refused_now = runtime.cgroups.pids_state("bomb")
            assert current is not None and current <= limit
            peak = max(peak, current)
            refused = refused_now or 0
        if peak == 0:  # it never ran: say why (seen once under heavy load)
            await sb.kill()
            err = await asyncio.wait_for(sb.stderr.read(), 10)
            pytest.fail(f"the fork bomb never started: {await sb.wait()}, stderr {err!r}")
        assert refused > 0, f"the pids limit never refused a fork (peak {peak} processes)"
        await sb.kill()
        ex = await asyncio.wait_for(sb.wait(), 30)
        assert ex.signal == signal.SIGKILL
    finally:
        await sb.cleanup()
    assert not runtime.cgroups.exists("bomb")


async def test_memory_hog_is_oom_killed(runtime: Runtime, rootfs: Path) -> None:
    if isinstance(runtime, RootlessRuntime):  # no delegated cgroup: no memory limit, and it says so
        state = await runtime.request({"op": "state"})
        assert state["enforced"] == ["pids"], state
        r = await run(runtime, rootfs, "true", memory_bytes=32 << 20)
        assert r.exit.exit_code == 0 and r.exit.memory_peak_bytes is None and not r.exit.oom_killed
        return
    r = await run(runtime, rootfs, "exec tail /dev/zero", memory_bytes=32 << 20)
    assert r.exit.exit_code == 137 and r.exit.signal == signal.SIGKILL
    assert r.exit.oom_killed
    assert r.exit.memory_peak_bytes is not None and r.exit.memory_peak_bytes <= (32 << 20) + (1 << 20)


async def test_sleep_past_its_timeout_is_killed(runtime: Runtime, rootfs: Path) -> None:
    r = await run(runtime, rootfs, "sleep 600; echo survived", kill_after=0.3)
    assert r.exit.signal == signal.SIGKILL and r.exit.exit_code is None
    assert "survived" not in r.out and r.exit.duration < 10


async def test_only_the_granted_capabilities_and_seccomp_apply(runtime: Runtime, rootfs: Path) -> None:
    r = await run(runtime, rootfs,
                  "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; ls /dev")
    assert "CapEff:\t00000000800405fb" in r.out and "CapBnd:\t00000000800405fb" in r.out
    assert "NoNewPrivs:\t1" in r.out and "Seccomp:\t2" in r.out
    devices = set(r.out.split("\n", 4)[4].split())
    assert devices <= {"core", "fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm", "stderr",
                       "stdin", "stdout", "tty", "urandom", "zero"}, devices


# ---- the seccomp filter itself, applied to a host child process ----

_PROBE = r"""
import ctypes, json, sys, base64
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
if sys.argv[1]:
    prog = base64.b64decode(sys.argv[1])
    buf = ctypes.create_string_buffer(prog, len(prog))
    fp = Fprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    assert libc.prctl(38, 1, 0, 0, 0) == 0
    assert libc.prctl(22, 2, ctypes.byref(fp), 0, 0) == 0, ctypes.get_errno()
res = {}
for name, nr, args in json.loads(sys.argv[2]):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    res[name] = 0 if r >= 0 else ctypes.get_errno()
print(json.dumps(res))
"""

# x86_64 numbers; unshare(CLONE_NEWUSER) last because it succeeds without the filter.
_CALLS = [
    ("getpid", 39, []), ("bpf", 321, [0, 0, 0]), ("perf_event_open", 298, [0, 0, -1, -1, 0]),
    ("kexec_load", 246, [0, 0, 0, 0]), ("init_module", 175, [0, 0, 0]), ("finit_module", 313, [-1, 0, 0]),
    ("open_by_handle_at", 304, [-1, 0, 0]), ("userfaultfd", 323, [0]), ("add_key", 248, [0, 0, 0, 0, 0]),
    ("keyctl", 250, [0, 0, 0, 0, 0]), ("io_uring_setup", 425, [1, 0]), ("mount", 165, [0, 0, 0, 0, 0]),
    ("setns", 308, [-1, 0]), ("clone3", 435, [0, 0]), ("unshare_files", 272, [0x400]),
    ("unshare_newuser", 272, [0x10000000]),
]


def _probe(prog_b64: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, prog_b64, json.dumps(_CALLS)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    result: dict[str, int] = json.loads(out)
    return result


def test_seccomp_filter_refuses_dangerous_syscalls_that_reach_the_kernel_without_it() -> None:
    assert os.uname().machine == "x86_64", "the probe's syscall numbers are x86_64's"
    bare = _probe("")
    filtered = _probe(base64.b64encode(seccomp.compiled_bpf()).decode())
    assert filtered["getpid"] == 0 and filtered["unshare_files"] == 0
    for name in ("bpf", "perf_event_open", "kexec_load", "init_module", "finit_module", "open_by_handle_at",
                 "userfaultfd", "add_key", "keyctl", "io_uring_setup", "mount", "setns", "unshare_newuser"):
        assert filtered[name] == 1, f"{name}: errno {filtered[name]} (EPERM expected)"
        assert bare[name] != 1, f"{name} is refused even without the filter: the probe proves nothing"
    assert filtered["clone3"] == 38 and bare["clone3"] != 38  # ENOSYS: libc falls back to clone


def test_seccomp_profile_allows_nothing_it_denies() -> None:
    prof = seccomp.profile()
    allowed = set(prof.syscalls[0].names)
    assert not allowed & set(seccomp.DENIED)
    assert not allowed & {"clone", "clone3", "unshare", "keyctl", "bpf", "mount", "personality"}
    assert prof.defaultAction == "SCMP_ACT_ERRNO" and prof.defaultErrnoRet == 38


async def test_a_spare_cgroup_keeps_the_limits_and_oom_reporting(runtime: Runtime,
                                                                 rootfs: Path) -> None:
    """A run's teardown makes cgroups with its limits for the next runs (v1 renames one into place): the
    adopted cgroup still enforces the memory limit and its OOM kill is still reported. Rootless: spare
    namespaces of the run's kind take their place and the next run uses one."""
    if isinstance(runtime, RootlessRuntime):
        await run(runtime, rootfs, "true", pids_limit=77)
        assert (await runtime.request({"op": "state"}))["spares"].get("False/77") == 1
        await run(runtime, rootfs, "true", pids_limit=77)  # takes that spare; its teardown makes the next
        assert (await runtime.request({"op": "state"}))["spares"].get("False/77") == 1
        return
    first = await run(runtime, rootfs, "true", memory_bytes=32 << 20)
    assert first.exit.exit_code == 0
    if runtime.cgroups.v2:
        assert runtime._spare_cgroups == []  # v2 cannot rename: no spares are made
    else:
        assert [limits.memory_bytes for _, limits in runtime._spare_cgroups] == [32 << 20] * 2
    spares = {name for name, _ in runtime._spare_cgroups}
    r = await run(runtime, rootfs, "exec tail /dev/zero", memory_bytes=32 << 20)
    assert r.exit.exit_code == 137 and r.exit.oom_killed
    assert r.exit.memory_peak_bytes is not None and r.exit.memory_peak_bytes <= (32 << 20) + (1 << 20)
    if spares:
        assert len(spares - {name for name, _ in runtime._spare_cgroups}) == 1, "no spare was adopted"
