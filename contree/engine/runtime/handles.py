"""What the runtime hands out: a `SandboxSpec` goes in, a `StagedSandbox` (staged, not launched) and a
`RunningSandbox` (pipes, `wait`, `kill`, `exec`, `cleanup`) come out; `exec` gives a `RunningProcess`;
`SandboxExit` / `ProcessExit` are how they ended.

A running sandbox reaches its runtime only through `SandboxHost`, the part of `SandboxRuntime` it needs
(state dir, cgroups, network, the runtime binary, the registry of active sandboxes, spares).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal as _signal
import time
from pathlib import Path
from typing import Any, Protocol

import msgspec

from contree.engine.runtime import oci_config
from contree.engine.runtime.cgroups import CgroupManager
from contree.engine.runtime.child import Child, decode_status
from contree.engine.runtime.netns import NetworkInfo, SandboxNetwork
from contree.engine.runtime.network import NetworkManager
from contree.engine.runtime.paths import release_bind
from contree.engine.runtime.rootless.limits import RuntimeStateKiller
from contree.engine.runtime.rootless.network import RootlessNetwork


class SandboxSpec(msgspec.Struct, kw_only=True):
    sandbox_id: str
    rootfs: Path  # an already-mounted merged dir; the caller mounts and unmounts it
    argv: list[str]
    env: list[str] = msgspec.field(default_factory=list)
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    hostname: str = "linuxkit"
    networking: bool = True
    memory_bytes: int | None = None
    pids_limit: int | None = 256
    cpu_quota: float | None = None  # cores
    stdin: bool = True  # a pipe; False = /dev/null. Output always goes through pipes.
    # A long-lived sandbox's init: host descriptors its process gets as fds 3, 4, … (`--preserve-fds`),
    # and OCI mounts beyond the standard ones (its binary, bound into the sandbox's own /dev).
    pass_fds: list[int] = msgspec.field(default_factory=list)
    extra_mounts: list[dict[str, Any]] = msgspec.field(default_factory=list)


class ExitUsage(msgspec.Struct, kw_only=True):
    """The rusage of an ended process: a sandbox's runtime process (and what it reaped), or an exec'd
    process where its reaper reports one (a sandbox's own init does)."""

    user_time: float = 0.0  # seconds
    system_time: float = 0.0
    max_rss_kb: int = 0
    minor_faults: int = 0
    major_faults: int = 0
    inblock: int = 0
    oublock: int = 0
    voluntary_switches: int = 0
    involuntary_switches: int = 0


class SandboxExit(ExitUsage, kw_only=True):
    exit_code: int | None  # None when killed by a signal
    signal: int | None = None
    core_dump: bool = False
    oom_killed: bool = False
    memory_peak_bytes: int | None = None  # from the sandbox cgroup
    cpu_usage_ns: int | None = None
    duration: float = 0.0  # seconds, spawn to exit


class ProcessExit(msgspec.Struct, kw_only=True):
    exit_code: int | None
    signal: int | None = None
    core_dump: bool = False
    usage: ExitUsage | None = None  # None: the runtime's exec helper reaped it, without rusage


class ExecdProcess(Protocol):
    """A process exec'd into a running sandbox (spid ≥ 2): a `RunningProcess` (the runtime's `exec`), or
    one a long-lived sandbox's own init forked (`sandbox_init.InitProcess`)."""

    pid: int
    stdin: asyncio.StreamWriter | None
    stdout: asyncio.StreamReader
    stderr: asyncio.StreamReader

    async def wait(self) -> ProcessExit: ...

    def signal(self, sig: int) -> None: ...


class SandboxHost(Protocol):
    """What a running sandbox needs of the runtime that launched it (`SandboxRuntime`)."""

    root_dir: Path
    runtime: str
    rlimits: dict[str, int]
    cgroups: CgroupManager | RuntimeStateKiller
    network: NetworkManager | RootlessNetwork

    def runtime_argv(self) -> list[str]: ...

    async def delete_container(self, sid: str) -> None: ...

    def forget(self, sid: str) -> None: ...

    async def make_spares(self, *, network: bool) -> None: ...


class RunningProcess:
    """A process started inside a running sandbox with `exec` (spid ≥ 2)."""

    def __init__(self, child: Child, pid_file: Path) -> None:
        self._child = child
        self.pid = child.pid  # the runtime's exec helper; `host_pid` is the process itself
        self.pid_file = pid_file
        self.stdin = child.stdin
        self.stdout = child.stdout
        self.stderr = child.stderr

    @property
    def host_pid(self) -> int | None:
        """The process's pid on the host, once the runtime has started it."""
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    async def wait(self) -> ProcessExit:
        status, _ru, _dur = await self._child.reaped()
        code, sig, _core = decode_status(status)
        return ProcessExit(exit_code=code, signal=sig)

    def signal(self, sig: int) -> None:
        """Signal the process group: the runtime's exec helper and the process it started share it."""
        pid = self.host_pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        self._child.killpg(sig)


class RunningSandbox:
    def __init__(self, runtime: SandboxHost, spec: SandboxSpec, child: Child, bundle: Path,
                 net: SandboxNetwork) -> None:
        self._rt = runtime
        self.spec = spec
        self.sandbox_id = spec.sandbox_id
        self._child = child
        self.bundle = bundle
        self._net = net
        self.stdin = child.stdin
        self.stdout = child.stdout
        self.stderr = child.stderr
        self._exit: SandboxExit | None = None
        self._killed_with: int | None = None
        self._cleaned = False
        self._exec_seq = 0
        self.rootfs_bind: Path | None = None  # see ROOTFS_BINDS

    @property
    def pid(self) -> int:
        """Host pid of the runtime process (`crun run`); its process group holds the sandbox's init."""
        return self._child.pid

    def created(self) -> bool:
        """True once the runtime has recorded the container, i.e. `exec` can work."""
        root = self._rt.root_dir
        if self._rt.runtime == "runsc":
            return any(self.sandbox_id in p.name for p in root.iterdir()) if root.is_dir() else False
        state = root / self.sandbox_id
        return (state / "status").exists() or (state / "state.json").exists()

    async def wait_created(self, patience: float = 2.0) -> bool:
        """Wait until `created()` (False if the sandbox exited or `patience` seconds passed first)."""
        deadline = time.monotonic() + patience
        while not self.created():
            if self._child.returncode_known or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    @property
    def network(self) -> NetworkInfo:
        if not self._cleaned and self._net.netns_path:
            self._net.info.interfaces = self._rt.network.counters(self._net)
        return self._net.info

    async def wait(self) -> SandboxExit:
        if self._exit is not None:
            return self._exit
        status, ru, duration = await self._child.reaped()
        code, sig, core = decode_status(status)
        stats = self._rt.cgroups.stats(self.sandbox_id)
        # The runtime itself was SIGKILLed (by `kill`): report the signal the sandbox got.
        if code is None and sig is not None and self._killed_with is not None:
            sig = int(self._killed_with)
        oom = self._rt.cgroups.oom_killed(
            stats, died_of_sigkill=sig == _signal.SIGKILL and self._killed_with is None)
        self._exit = SandboxExit(
            exit_code=code, signal=sig, core_dump=core, oom_killed=oom,
            user_time=ru.ru_utime, system_time=ru.ru_stime, max_rss_kb=ru.ru_maxrss,
            minor_faults=ru.ru_minflt, major_faults=ru.ru_majflt, inblock=ru.ru_inblock,
            oublock=ru.ru_oublock, voluntary_switches=ru.ru_nvcsw, involuntary_switches=ru.ru_nivcsw,
            memory_peak_bytes=stats.memory_peak_bytes, cpu_usage_ns=stats.cpu_usage_ns, duration=duration)
        if self._net.netns_path:
            self._net.info.interfaces = self._rt.network.counters(self._net)
        return self._exit

    async def kill(self, sig: int = _signal.SIGKILL) -> None:
        """Signal every process of the sandbox. SIGKILL also ends the runtime process."""
        if self._child.returncode_known:
            return
        self._killed_with = int(sig)
        if sig == _signal.SIGKILL:
            self._child.killpg(sig)
        self._rt.cgroups.kill_all(self.sandbox_id, sig)

    async def exec(self, argv: list[str], env: list[str] | None = None, cwd: str = "/", uid: int = 0,
                   gid: int = 0, stdin: bool = True) -> RunningProcess:
        if self._child.returncode_known or self._cleaned:
            raise RuntimeError(f"sandbox {self.sandbox_id} is not running")
        if not await self.wait_created():
            raise RuntimeError(f"sandbox {self.sandbox_id} is not running (or still starting)")
        self._exec_seq += 1
        proc = oci_config.process_section(argv, list(env or []), cwd, uid, gid, self._rt.rlimits)
        proc_file = self.bundle / f"exec-{self._exec_seq}.json"
        pid_file = self.bundle / f"exec-{self._exec_seq}.pid"
        proc_file.write_bytes(msgspec.json.encode(proc))
        child = await Child.spawn(
            [*self._rt.runtime_argv(), "exec", "--process", str(proc_file), "--pid-file", str(pid_file),
             self.sandbox_id], stdin=stdin)
        return RunningProcess(child, pid_file)

    async def cleanup(self) -> None:
        """Remove the runtime state, cgroups, netns and bundle. Idempotent; never leaves processes."""
        if self._cleaned:
            return
        if not self._child.returncode_known:
            await self.kill(_signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._child.reaped(), 10)
        errors: list[str] = []
        try:
            await self._rt.delete_container(self.sandbox_id)
        except Exception as exc:  # keep going: the rest must be cleaned regardless
            errors.append(f"runtime delete: {exc}")
        try:
            try:
                self._rt.cgroups.remove(self.sandbox_id, timeout=0)  # one quick attempt inline
            except OSError:  # tasks still draining: retry off the event loop
                await asyncio.to_thread(self._rt.cgroups.remove, self.sandbox_id)
        except Exception as exc:
            errors.append(f"cgroup: {exc}")
        try:
            await self._rt.network.teardown(self._net)
        except Exception as exc:
            errors.append(f"network: {exc}")
        if self.rootfs_bind is not None:
            try:
                release_bind(self.rootfs_bind)
            except OSError as exc:
                errors.append(f"rootfs bind: {exc}")
        shutil.rmtree(self.bundle, ignore_errors=True)
        self._cleaned = True
        self._rt.forget(self.sandbox_id)
        if errors:
            raise RuntimeError(f"cleanup of sandbox {self.sandbox_id}: " + "; ".join(errors))
        await self._rt.make_spares(network=self.spec.networking)  # the next run's, while nobody waits


class StagedSandbox(msgspec.Struct, kw_only=True):
    """A sandbox `stage`d but not launched yet: its bundle dir (with the /etc files written), limits
    cgroup and network exist. Hand it to `launch`, or to `abort` to undo it."""
    spec: SandboxSpec
    bundle: Path
    net: SandboxNetwork
    etc_files: list[str]  # the names under /etc whose per-sandbox copy is in the bundle
