"""Sandboxes: one OCI bundle + cgroup + network namespace per run, driven through crun (or runc/runsc).

The caller mounts the rootfs (overlay) and unmounts it afterwards; this module does everything between:
`SandboxRuntime.start(spec)` → `RunningSandbox` (pipes, `wait`, `kill`, `exec`) → `cleanup`.
`start` is `stage` (bundle dir, limits cgroup, network: nothing that needs the rootfs) then `launch`
(rootfs bind, config, runtime process), so a caller can stage while it is still mounting the rootfs.

The runtime process is spawned with `posix_spawn` and reaped with `os.wait4` once its pidfd is readable,
so the result carries the kernel's rusage for the whole tree the runtime waited for; asyncio's child
watcher never sees these pids.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import signal as _signal
import stat
import time
from pathlib import Path
from typing import Any

import msgspec

from contree.engine import hostcheck, oci_config, seccomp, subids
from contree.engine.cgroups import CgroupLimits, CgroupManager, sweep_dead_parents
from contree.engine.hostcheck import HostInfo, NoRuntimeAvailable
from contree.engine.network import DEFAULT_SUBNET, IPAM_DIR, NetworkInfo, NetworkManager, SandboxNetwork
from contree.engine.overlay import bind_mount, mount_tmpfs, mounts_under, unmount
from contree.engine.rootless.limits import RuntimeStateKiller
from contree.engine.rootless.network import RootlessNetwork
from contree.engine.userns import IdMap, UsernsUnavailable

log = logging.getLogger(__name__)

__all__ = [
    "NoRuntimeAvailable", "ProcessExit", "RunningProcess", "RunningSandbox", "RuntimeConfig", "SandboxExit",
    "SandboxRuntime", "SandboxSpec", "StagedSandbox",
]

RUN_DIR = Path("/run/contree-engine")
CGROUP_ROOT_NAME = "/contree-engine"
# With a user namespace the runtime reaches the rootfs as the remapped root, which cannot traverse a
# home under /root or a 0700 temporary dir; the merged dir is bound here (world-traversable) instead.
ROOTFS_BINDS = RUN_DIR / "rootfs"
# Bundles (config.json, the /etc files, exec process files) are small and per run: tmpfs, not the disk,
# where creating them cost 0.1-0.3 ms per run.
BUNDLES = RUN_DIR / "bundles"
# NAT networks set up ahead for the next runs with networking (two `ip` processes, ~5 ms per run).
SPARE_NETWORKS = 1
# Limits cgroups made ahead (v1: renamed into place, 0.2 ms less per run); v2 cannot rename.
SPARE_CGROUPS = 2
_SPAWN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


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


class RuntimeConfig(msgspec.Struct, kw_only=True):
    state_dir: Path  # on the layers' filesystem (where idmapped mounts are probed)
    runtime: str = "auto"  # auto | crun | runc | runsc
    network_mode: str = "auto"  # auto | nat | slirp | none
    engine_id: str | None = None
    cgroup_parent: str | None = None  # default /contree-engine/<engine-id>
    # None = on when the host supports it (logged when not); True = required; False = off.
    userns: bool | None = None
    # Container id u is host id userns_base+u (uids and gids). None: the engine's own range, recorded as
    # `contree-engine` in /etc/subuid and /etc/subgid (allocated at first start, see subids.py).
    userns_base: int | None = None
    subnet: str = DEFAULT_SUBNET
    ipam_dir: Path = IPAM_DIR
    seccomp: bool = True
    # Total budget for all sandboxes of this engine (None = unlimited).
    budget_memory_bytes: int | None = None
    budget_pids: int | None = None
    budget_cpus: float | None = None


class SandboxExit(msgspec.Struct, kw_only=True):
    exit_code: int | None  # None when killed by a signal
    signal: int | None = None
    core_dump: bool = False
    oom_killed: bool = False
    user_time: float = 0.0  # seconds (rusage of the runtime process and what it reaped)
    system_time: float = 0.0
    max_rss_kb: int = 0
    minor_faults: int = 0
    major_faults: int = 0
    inblock: int = 0
    oublock: int = 0
    voluntary_switches: int = 0
    involuntary_switches: int = 0
    memory_peak_bytes: int | None = None  # from the sandbox cgroup
    cpu_usage_ns: int | None = None
    duration: float = 0.0  # seconds, spawn to exit


class ProcessExit(msgspec.Struct, kw_only=True):
    exit_code: int | None
    signal: int | None = None


def _decode_status(status: int) -> tuple[int | None, int | None, bool]:
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status), os.WCOREDUMP(status)
    code = os.WEXITSTATUS(status)
    # OCI runtimes report a container killed by signal N as exit status 128+N.
    if code > 128 and code - 128 < 65:
        return code, code - 128, False
    return code, None, False


# ---- asyncio plumbing for raw pipes and pids ----

class _WriteProtocol(asyncio.streams.FlowControlMixin):
    def __init__(self) -> None:
        super().__init__()
        self._closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self._closed.done():
            self._closed.set_result(None)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        return self._closed


async def _reader(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
    return reader


async def _writer(fd: int) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.connect_write_pipe(_WriteProtocol, os.fdopen(fd, "wb", 0))
    return asyncio.StreamWriter(transport, proto, None, loop)


class _Child:
    """A posix_spawn'ed process with pipes, reaped through its pidfd with wait4."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.started = time.monotonic()
        self._reaped: asyncio.Future[tuple[int, Any, float]] | None = None
        self.stdin: asyncio.StreamWriter | None = None
        self.stdout: asyncio.StreamReader
        self.stderr: asyncio.StreamReader

    @classmethod
    async def spawn(cls, argv: list[str], *, stdin: bool) -> _Child:
        pipes = {}
        fds_to_close = []
        try:
            if stdin:
                r, w = os.pipe2(os.O_CLOEXEC)
                pipes[0] = (r, w)
            for n in (1, 2):
                r, w = os.pipe2(os.O_CLOEXEC)
                pipes[n] = (r, w)
            actions: list[tuple[Any, ...]] = []
            if stdin:
                actions.append((os.POSIX_SPAWN_DUP2, pipes[0][0], 0))
            else:
                actions.append((os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0))
            actions.append((os.POSIX_SPAWN_DUP2, pipes[1][1], 1))
            actions.append((os.POSIX_SPAWN_DUP2, pipes[2][1], 2))
            # posix_spawn is vfork+exec: it returns as soon as the child execs, so it does not block.
            pid = os.posix_spawn(  # noqa: ASYNC221
                argv[0], argv, _SPAWN_ENV, file_actions=actions, setsid=True, setsigmask=(),
                setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ))
        except BaseException:
            for pair in pipes.values():
                for fd in pair:
                    os.close(fd)
            raise
        child = cls(pid)
        # Close the child's ends in the parent so EOF arrives when the sandbox closes its streams.
        if stdin:
            os.close(pipes[0][0])
            fds_to_close.append(pipes[0][1])
        os.close(pipes[1][1])
        os.close(pipes[2][1])
        try:
            if stdin:
                child.stdin = await _writer(pipes[0][1])
            child.stdout = await _reader(pipes[1][0])
            child.stderr = await _reader(pipes[2][0])
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, _signal.SIGKILL)
            raise
        child._start_reaper()
        return child

    def _start_reaper(self) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[int, Any, float]] = loop.create_future()
        self._reaped = fut
        pidfd = os.pidfd_open(self.pid)

        def ready() -> None:
            try:
                pid, status, ru = os.wait4(self.pid, os.WNOHANG)
            except ChildProcessError as exc:  # someone else reaped it: report what we can
                loop.remove_reader(pidfd)
                os.close(pidfd)
                if not fut.done():
                    fut.set_exception(exc)
                return
            if pid == 0:
                return
            loop.remove_reader(pidfd)
            os.close(pidfd)
            if not fut.done():
                fut.set_result((status, ru, time.monotonic() - self.started))

        loop.add_reader(pidfd, ready)

    @property
    def returncode_known(self) -> bool:
        return self._reaped is not None and self._reaped.done()

    async def reaped(self) -> tuple[int, Any, float]:
        assert self._reaped is not None
        return await asyncio.shield(self._reaped)

    def killpg(self, sig: int) -> None:
        if self.returncode_known:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


class RunningProcess:
    """A process started inside a running sandbox with `exec` (spid ≥ 2)."""

    def __init__(self, child: _Child, pid_file: Path) -> None:
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
        code, sig, _core = _decode_status(status)
        return ProcessExit(exit_code=code, signal=sig)

    def signal(self, sig: int) -> None:
        """Signal the process group: the runtime's exec helper and the process it started share it."""
        pid = self.host_pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        self._child.killpg(sig)


class RunningSandbox:
    def __init__(self, runtime: SandboxRuntime, spec: SandboxSpec, child: _Child, bundle: Path,
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
        code, sig, core = _decode_status(status)
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
        child = await _Child.spawn(
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
                _release_bind(self.rootfs_bind)
            except OSError as exc:
                errors.append(f"rootfs bind: {exc}")
        shutil.rmtree(self.bundle, ignore_errors=True)
        self._cleaned = True
        self._rt._active.pop(self.sandbox_id, None)
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


class SandboxRuntime:
    def __init__(self, config: RuntimeConfig, info: HostInfo, runtime: str, binary: str,
                 cgroups: CgroupManager | RuntimeStateKiller, network: NetworkManager | RootlessNetwork,
                 engine_id: str) -> None:
        self.config = config
        self.info = info
        self.runtime = runtime
        self.binary = binary
        self.cgroups = cgroups
        self.network = network
        self.engine_id = engine_id
        self.root_dir = RUN_DIR / f"{runtime}-{engine_id}"
        self.bundles = BUNDLES / engine_id
        self.rootfs_binds = ROOTFS_BINDS / engine_id
        self.rlimits = oci_config.clamp_rlimits(oci_config.host_hard_rlimits())
        self._seccomp_b64: str | None = None
        self._active: dict[str, RunningSandbox] = {}
        self._staged: set[str] = set()
        self._spare_nets: list[SandboxNetwork] = []
        # Spares being set up; a run that finds none ready claims one of these (removes it) and waits.
        self._spares_coming: list[asyncio.Future[SandboxNetwork | None]] = []
        self._spare_cgroups: list[tuple[str, CgroupLimits]] = []
        self._last_limits: CgroupLimits | None = None
        self._closing = False
        self._lock_fd = -1
        self.rootless = False  # contree/engine/rootless/: every sandbox gets namespaces from `network`
        self.run_dir = RUN_DIR
        # Set when sandboxes run in a user namespace: the caller mounts lowers through
        # `idmap.lowers(...)`, calls `idmap.shift_in` before start and `idmap.shift_out` before commit.
        self.idmap: IdMap | None = None

    @classmethod
    async def create(cls, config: RuntimeConfig) -> SandboxRuntime:
        info = hostcheck.detect()
        problems = hostcheck.check_requirements(info)
        if problems:
            raise NoRuntimeAvailable("; ".join(problems))
        runtime, binary = select_runtime(info, config.runtime)
        if info.rootless:
            from contree.engine.rootless.runtime import create_rootless

            return await create_rootless(cls, config, info, runtime, binary)
        idmap = _make_idmap(config, runtime)  # before anything needing clean-up: it may refuse
        engine_id = config.engine_id or secrets.token_hex(4)
        lock_fd = await _lock_engine(engine_id)
        swept = await asyncio.to_thread(sweep_dead_engines, info, engine_id)
        if swept:
            log.warning("cleaned up after engines that died: %s", "; ".join(swept))
        parent = config.cgroup_parent or f"{CGROUP_ROOT_NAME}/{engine_id}"
        cgroups = CgroupManager(info, parent)
        cgroups.setup_parent(CgroupLimits(memory_bytes=config.budget_memory_bytes, pids=config.budget_pids,
                                          cpu_quota=config.budget_cpus))
        try:
            network = await NetworkManager.create(config.network_mode, subnet=config.subnet,
                                                  ipam_dir=config.ipam_dir)
        except BaseException:
            cgroups.remove(None)
            os.close(lock_fd)
            if idmap is not None:
                idmap.close()
            raise
        rt = cls(config, info, runtime, binary, cgroups, network, engine_id)
        rt._lock_fd = lock_fd
        rt.idmap = idmap
        if idmap is not None:
            network.userns_map = (idmap.base, idmap.gid_base, idmap.size)
        try:
            # The runtime's state and the bundles hold each sandbox's config (its environment): root only.
            _run_dir(rt.root_dir, None)
            _run_dir(rt.bundles, None)
            # A tmpfs of the engine's own: a sandbox's mountinfo shows the source of its /etc binds as
            # a path inside it (/<sandbox>/hosts), never a host path; and bundles stay off the disk.
            mount_tmpfs(rt.bundles)
            if idmap is not None:
                _run_dir(rt.rootfs_binds, idmap.gid_base)
        except BaseException:
            await rt.close()
            raise
        if config.seccomp and runtime == "crun":
            try:
                rt._seccomp_b64 = seccomp.compiled_bpf_b64()
            except seccomp.SeccompUnavailable as exc:
                log.warning("seccomp precompile unavailable, crun compiles the profile per start: %s", exc)
        log.info("sandbox runtime %s (%s), cgroups %s under %s, network %s%s, user namespace %s", runtime,
                 binary, info.cgroup_mode.value, parent, network.mode,
                 f" ({network.error})" if network.error else "",
                 f"0→{idmap.base} ({idmap.size} ids)" if idmap else "off")
        return rt

    def _rlimits(self, spec: SandboxSpec) -> dict[str, int]:
        """A rootless sandbox's RLIMIT_NPROC is its pids limit (contree/engine/rootless/limits.py)."""
        if not self.rootless or spec.pids_limit is None:
            return self.rlimits
        return {**self.rlimits, "RLIMIT_NPROC": oci_config.clamp_nproc(spec.pids_limit)}

    def runtime_argv(self) -> list[str]:
        argv = [self.binary, "--root", str(self.root_dir)]
        if self.runtime == "runsc":
            argv += ["--platform=ptrace"]
        return argv

    def _etc_files(self, spec: SandboxSpec, net: SandboxNetwork) -> dict[str, str]:
        """Per-sandbox resolv.conf/hosts/hostname, bound over the image's files (never written into it)."""
        files = {"hostname": f"{spec.hostname}\n",
                 "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n127.0.1.1\t{spec.hostname}\n"}
        if net.resolv_conf:
            files["resolv.conf"] = net.resolv_conf
        return files

    @staticmethod
    def _etc_binds(rootfs: Path, bundle: Path, names: list[str]) -> list[dict[str, Any]]:
        """Mounts for the files of `names` (already in `bundle`) that the image has as regular files in a
        real /etc: creating a mount point would leave a file in the sandbox's upper layer."""
        mounts = []
        for name in names:
            try:
                st = os.lstat(rootfs / "etc" / name)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or not stat.S_ISDIR(os.lstat(rootfs / "etc").st_mode):
                continue
            mounts.append({"destination": f"/etc/{name}", "type": "bind", "source": str(bundle / name),
                           "options": ["rbind", "rprivate", "nosuid", "nodev", "noexec"]})
        return mounts

    def _write_etc_files(self, spec: SandboxSpec, bundle: Path, net: SandboxNetwork) -> list[str]:
        """Write the per-sandbox /etc files into `bundle`; returns their names."""
        files = self._etc_files(spec, net)
        for name, text in files.items():
            (bundle / name).write_text(text)
        return list(files)

    def _etc_mounts(self, spec: SandboxSpec, bundle: Path, net: SandboxNetwork) -> list[dict[str, Any]]:
        """Write the per-sandbox /etc files into `bundle` and return the mounts that bind them."""
        return self._etc_binds(spec.rootfs, bundle, self._write_etc_files(spec, bundle, net))

    async def start(self, spec: SandboxSpec) -> RunningSandbox:
        """`stage` then `launch`: the rootfs must already be mounted."""
        return await self.launch(await self.stage(spec))

    async def stage(self, spec: SandboxSpec) -> StagedSandbox:
        """Everything that does not need the rootfs yet: the bundle dir with the /etc files, the limits
        cgroup and the network (which can take tens of ms with veth + NAT)."""
        sid = spec.sandbox_id
        if sid in self._active or sid in self._staged:
            raise ValueError(f"sandbox {sid} is already running")
        if isinstance(self.network, RootlessNetwork):
            self.network.check_ids(spec.uid, spec.gid)
        bundle = self.bundles / sid
        bundle.mkdir(parents=True, exist_ok=False)
        self._staged.add(sid)
        net: SandboxNetwork | None = None
        try:
            quota = spec.cpu_quota
            if quota is not None and self.config.budget_cpus is not None:
                quota = min(quota, self.config.budget_cpus)  # v1 refuses a child quota above its parent's
            limits = CgroupLimits(memory_bytes=spec.memory_bytes, pids=spec.pids_limit, cpu_quota=quota)
            self._last_limits = limits
            if not self._adopt_spare_cgroup(sid, limits):
                self.cgroups.create(sid, limits)
            try:
                if self.runtime == "runsc" and spec.networking:
                    # Debian's runsc (2022) refuses the prepared netns ("root network namespace").
                    net = SandboxNetwork(info=NetworkInfo(
                        mode="none", error="networking is not supported with the runsc runtime yet"))
                elif spec.networking and (self._spare_nets or self._spares_coming):
                    net = await self._take_spare_network()
                elif isinstance(self.network, RootlessNetwork):  # its own user namespace, maybe a network
                    net = await self.network.setup_for(spec.networking, spec.pids_limit)
                else:
                    net = await self.network.setup(spec.networking)
            except Exception as exc:
                if self.rootless:
                    raise  # never a sandbox without its user namespace
                log.warning("sandbox %s runs without network: %s", sid, exc)
                net = SandboxNetwork(info=NetworkInfo(mode="none", error=f"network setup failed: {exc}"))
            etc_files = self._write_etc_files(spec, bundle, net)
        except BaseException:
            await self._unstage(sid, bundle, net)
            raise
        return StagedSandbox(spec=spec, bundle=bundle, net=net, etc_files=etc_files)

    def _adopt_spare_cgroup(self, sid: str, limits: CgroupLimits) -> bool:
        for i, (name, made_with) in enumerate(self._spare_cgroups):
            if made_with == limits:
                del self._spare_cgroups[i]
                if self.cgroups.adopt(name, sid):
                    return True
                with contextlib.suppress(OSError):
                    self.cgroups.remove(name)
                return False
        return False

    async def make_spares(self, *, network: bool) -> None:
        """Make what the next runs will need while nobody waits (a run's teardown calls this): limits
        cgroups like the last run's (v1), and after a run with networking a NAT network. A spare is
        fresh: no sandbox has been in it."""
        if isinstance(self.network, RootlessNetwork):
            await self.network.make_spares()
            return
        limits = self._last_limits
        while (not self.cgroups.v2 and limits is not None and not self._closing
               and len(self._spare_cgroups) < SPARE_CGROUPS):
            name = f"spare-{secrets.token_hex(6)}"
            try:
                self.cgroups.create(name, limits)
            except OSError as exc:
                log.debug("no spare cgroup: %s", exc)
                with contextlib.suppress(OSError):
                    self.cgroups.remove(name)
                break
            self._spare_cgroups.append((name, limits))
        if not network or self.network.mode != "nat":
            return
        while not self._closing and len(self._spare_nets) + len(self._spares_coming) < SPARE_NETWORKS:
            coming: asyncio.Future[SandboxNetwork | None] = asyncio.get_running_loop().create_future()
            self._spares_coming.append(coming)
            net: SandboxNetwork | None = None
            try:
                net = await self.network.setup(True)
            except Exception as exc:
                log.debug("no spare network: %s", exc)
            finally:
                failed = net is None
                if coming in self._spares_coming:  # nobody claimed it: keep it
                    self._spares_coming.remove(coming)
                    if net is not None and self._closing:
                        await self.network.teardown(net)
                    elif net is not None:
                        self._spare_nets.append(net)
                    net = None
                coming.set_result(net)  # to a claimer; None: it sets its own up
            if failed:
                return

    async def _take_spare_network(self) -> SandboxNetwork:
        """A ready spare, else the one being set up (it is ready sooner than a new one), else a new one."""
        if self._spare_nets:
            return self._spare_nets.pop()
        coming = self._spares_coming.pop(0)
        try:
            net = await asyncio.shield(coming)
        except asyncio.CancelledError:
            if not coming.done():
                self._spares_coming.insert(0, coming)  # unclaimed: it becomes an ordinary spare
            else:
                got = coming.result()
                if got is not None:
                    self._spare_nets.append(got)  # delivered as we were cancelled: keep it
            raise
        return net if net is not None else await self.network.setup(True)

    async def abort(self, staged: StagedSandbox) -> None:
        """Undo a `stage` that will not be launched."""
        await self._unstage(staged.spec.sandbox_id, staged.bundle, staged.net)

    async def _unstage(self, sid: str, bundle: Path, net: SandboxNetwork | None) -> None:
        with contextlib.suppress(Exception):
            self.cgroups.remove(sid)
        if net is not None:
            with contextlib.suppress(Exception):
                await self.network.teardown(net)
        shutil.rmtree(bundle, ignore_errors=True)
        self._staged.discard(sid)

    async def launch(self, staged: StagedSandbox) -> RunningSandbox:
        """Start the runtime process of a staged sandbox; its rootfs must be mounted by now. On failure
        the staging is undone too."""
        spec, bundle, net = staged.spec, staged.bundle, staged.net
        sid = spec.sandbox_id
        bind: Path | None = None
        try:
            rootfs = spec.rootfs
            if self.idmap is not None:
                bind = self.rootfs_binds / sid
                bind.mkdir(mode=0o755)
                bind_mount(spec.rootfs, bind)
                rootfs = bind
            opts = oci_config.ConfigOptions(
                rootfs=rootfs, hostname=spec.hostname, cgroups_path=self.cgroups.runtime_path(sid),
                # Limits live on our `<parent>/<sid>` cgroup only: a limit hit there is counted there
                # (OOM kills, refused forks), and those counters outlive the runtime's own leaf.
                netns_path=net.netns_path, memory_bytes=None, pids_limit=None, cpu_quota=None,
                rlimits=self.rlimits, seccomp=self.config.seccomp, seccomp_bpf_b64=self._seccomp_b64,
                extra_mounts=self._etc_binds(spec.rootfs, bundle, staged.etc_files),
                # A prepared netns comes with the user namespace that owns it (same id mapping).
                userns_path=net.userns_path,
                uid_mappings=None if self.idmap is None else [oci_config.IdMapping(
                    containerID=0, hostID=self.idmap.base, size=self.idmap.size)],
                gid_mappings=None if self.idmap is None else [oci_config.IdMapping(
                    containerID=0, hostID=self.idmap.gid_base, size=self.idmap.size)])
            proc = oci_config.process_section(spec.argv, spec.env, spec.cwd, spec.uid, spec.gid,
                                              self._rlimits(spec))
            # msgspec: 15 us for the ~15 KB config, json.dumps took 150 us of the run's path.
            (bundle / "config.json").write_bytes(msgspec.json.encode(oci_config.build_config(opts, proc)))
            argv = [*self.runtime_argv()]
            if self.runtime == "runsc":
                argv.append("--network=none")
            child = await _Child.spawn([*argv, "run", "--bundle", str(bundle), sid], stdin=spec.stdin)
        except BaseException:
            if bind is not None:
                with contextlib.suppress(OSError):
                    _release_bind(bind)
            await self.abort(staged)
            raise
        sandbox = RunningSandbox(self, spec, child, bundle, net)
        sandbox.rootfs_bind = bind
        self._staged.discard(sid)
        self._active[sid] = sandbox
        return sandbox

    async def delete_container(self, sid: str) -> None:
        """`<runtime> delete -f`: a no-op when the runtime already removed its state after `run`."""
        if not (self.root_dir / sid).exists():
            return
        proc = await asyncio.create_subprocess_exec(
            *self.runtime_argv(), "delete", "-f", sid, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        if proc.returncode != 0 and (self.root_dir / sid).exists():
            raise RuntimeError(err.decode(errors="replace").strip())

    async def close(self) -> None:
        """Stop every sandbox still running and remove what `create` made."""
        self._closing = True
        self._spare_cgroups.clear()  # removed with the parent below
        for sandbox in list(self._active.values()):
            with contextlib.suppress(Exception):
                await sandbox.cleanup()
        errors = []
        while self._spare_nets:
            try:
                await self.network.teardown(self._spare_nets.pop())
            except Exception as exc:
                errors.append(f"spare network: {exc}")
        try:
            await self.network.close()
        except Exception as exc:
            errors.append(f"network: {exc}")
        try:
            await asyncio.to_thread(self.cgroups.remove, None)
        except Exception as exc:
            errors.append(f"cgroups: {exc}")
        shutil.rmtree(self.root_dir, ignore_errors=True)
        try:
            _release_bundles(self.bundles)
        except OSError as exc:
            errors.append(f"bundles: {exc}")
        try:
            _release_binds(self.rootfs_binds)
        except OSError as exc:
            errors.append(f"rootfs binds: {exc}")
        if self.idmap is not None:
            self.idmap.close()
        if self.rootless:  # its private tmpfs (rootless/runtime.py)
            try:
                unmount(self.run_dir)
            except OSError as exc:
                errors.append(f"run dir: {exc}")
        if self._lock_fd >= 0:
            release_engine_lock(self.engine_id, self._lock_fd)
            self._lock_fd = -1
        if errors:
            raise RuntimeError("closing the sandbox runtime: " + "; ".join(errors))


def _run_dir(path: Path, group: int | None) -> None:
    """A per-engine dir under RUN_DIR that no other local user may enter: 0700, or root:`group` 0710
    when the sandbox's remapped root (host gid `group`) must traverse it (the rootfs binds: the
    runtime reaches the rootfs as that root). Either way no other user reaches a running sandbox's
    files, setuid binaries included, or its config. The dirs above are 0711: traversable by every
    engine's sandboxes, listable by no one."""
    for shared in reversed(path.parents):
        if shared == RUN_DIR or RUN_DIR in shared.parents:
            shared.mkdir(mode=0o711, exist_ok=True)
            if stat.S_IMODE(shared.stat().st_mode) & 0o066:
                shared.chmod(0o711)
    path.mkdir(mode=0o700, exist_ok=True)
    os.chown(path, os.geteuid(), os.getegid() if group is None else group)
    path.chmod(0o700 if group is None else 0o710)


def _release_bind(point: Path) -> None:
    if not point.exists():
        return  # a successor engine's sweep got there first
    unmount(point)
    with contextlib.suppress(FileNotFoundError):
        point.rmdir()


def _release_bundles(path: Path) -> None:
    """Unmount an engine's bundles tmpfs (and anything mounted below it), then remove the dir."""
    for point in mounts_under(path):
        unmount(point)
    shutil.rmtree(path, ignore_errors=True)


def _release_binds(parent: Path) -> None:
    """Unmount every bind below `parent`, then remove it; never deletes through a mount."""
    if not parent.is_dir():
        return
    for point in mounts_under(parent):
        unmount(point)
    for entry in parent.iterdir():
        entry.rmdir()  # empty mount points only: anything else is not ours to delete
    parent.rmdir()


def _make_idmap(config: RuntimeConfig, runtime: str) -> IdMap | None:
    """The user namespace sandboxes get, or None (refused when `userns=True`, logged when automatic).
    A host id range that another user shares is always refused: falling back to no user namespace
    would give sandboxes the host's root instead."""
    if config.userns is False:
        return None
    try:
        if runtime == "runsc":
            raise UsernsUnavailable("runsc keeps its own user namespace; layers are not idmapped for it")
        try:
            if config.userns_base is None:
                ids = subids.engine_range()
            else:
                subids.check_base(config.userns_base, config.userns_base)
                ids = subids.IdRange(config.userns_base, config.userns_base, subids.SIZE)
        except (subids.SubidError, OSError) as exc:
            raise NoRuntimeAvailable(f"the sandboxes' host id range: {exc}") from exc
        return IdMap.create(ids.uid, ids.size, probe_dir=config.state_dir, gid_base=ids.gid)
    except (UsernsUnavailable, OSError) as exc:
        if config.userns:
            raise NoRuntimeAvailable(f"user namespace requested but unavailable: {exc}") from exc
        log.warning("sandboxes run WITHOUT a user namespace (root inside is root on the host's files "
                    "of its own upper dir): %s", exc)
        return None


def _engine_lock_path(engine_id: str) -> Path:
    return RUN_DIR / "engines" / f"{engine_id}.lock"


def try_engine_lock(engine_id: str) -> int:
    """An fd holding `engine_id`'s lock (the engine is alive while someone holds it), or -1."""
    path = _engine_lock_path(engine_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return -1
    return fd


def release_engine_lock(engine_id: str, fd: int) -> None:
    with contextlib.suppress(OSError):
        _engine_lock_path(engine_id).unlink()  # one file per engine id would pile up
    os.close(fd)


async def _lock_engine(engine_id: str, patience: float = 10.0) -> int:
    """Hold `engine_id` for the runtime's life. Another engine may briefly hold it while sweeping up
    after a dead predecessor with the same id, so wait a little before giving up."""
    deadline = time.monotonic() + patience
    while True:
        fd = try_engine_lock(engine_id)
        if fd >= 0:
            return fd
        if time.monotonic() > deadline:
            raise RuntimeError(f"engine id {engine_id} is held by another live engine")
        await asyncio.sleep(0.05)


def sweep_dead_engines(info: HostInfo, own: str | None = None) -> list[str]:
    """Kill the sandboxes of engines that died without closing and remove their cgroups and runtime
    state. An engine is alive while it holds its lock file under /run/contree-engine/engines/; `own`
    is the id the caller just locked, so whatever already exists under it is a dead predecessor's."""
    held: dict[str, int] = {}

    def is_dead(name: str) -> bool:
        if name == own:
            held[name] = -1
            return True
        fd = try_engine_lock(name)
        if fd < 0:
            return False
        held[name] = fd  # keep it while cleaning, so a successor waits for us
        return True

    def dead_entries(parent: Path) -> list[Path]:
        """The per-engine entries of `parent` (named by engine id) whose engine is dead."""
        if not parent.is_dir():
            return []
        return [e for e in parent.iterdir() if e.name in held or is_dead(e.name)]

    try:
        done = sweep_dead_parents(info, CGROUP_ROOT_NAME, is_dead)
        for name in held:
            for rt in ("crun", "runc", "runsc"):
                root = RUN_DIR / f"{rt}-{name}"
                if root.is_dir():
                    shutil.rmtree(root, ignore_errors=True)
                    done.append(f"removed runtime state {root}")
        for entry in dead_entries(BUNDLES):
            try:
                _release_bundles(entry)
                done.append(f"removed bundles {entry}")
            except OSError as exc:
                done.append(f"could not remove bundles {entry}: {exc}")
        for entry in dead_entries(ROOTFS_BINDS):
            try:
                _release_binds(entry)
                done.append(f"released rootfs binds {entry}")
            except OSError as exc:  # never block start-up on it: report and go on
                done.append(f"could not release rootfs binds {entry}: {exc}")
        return done
    finally:
        for name, fd in held.items():
            if fd >= 0:
                release_engine_lock(name, fd)


def select_runtime(info: HostInfo, wanted: str) -> tuple[str, str]:
    """Pick the OCI runtime: crun, unless it cannot work here (then runc); runsc only on request."""
    if wanted not in ("auto", "crun", "runc", "runsc"):
        raise ValueError(f"unknown runtime {wanted!r}")
    crun_problem = None
    crun = hostcheck.find_binary("crun")
    if crun is None:
        crun_problem = "crun is not installed (Debian package crun)"
    elif (not info.rootless and not hostcheck.apply_hugetlb_fix(info)
          and info.cgroup_mode is not hostcheck.CgroupMode.V2):  # rootless: no cgroups of crun's own
        crun_problem = ("crun refuses hybrid cgroups while the unified hierarchy owns controllers, "
                        "and they could not be moved (RUNTIME §3)")
    if wanted in ("auto", "crun") and crun_problem is None and crun is not None:
        return "crun", crun
    if wanted == "crun":
        raise NoRuntimeAvailable(crun_problem or "crun unusable")
    if wanted in ("auto", "runc"):
        runc = hostcheck.find_binary("runc")
        if runc is not None:
            if wanted == "auto":
                log.warning("using runc: %s", crun_problem)
            return "runc", runc
        raise NoRuntimeAvailable(
            f"no usable OCI runtime: {crun_problem}; runc is not installed either "
            "(apt-get install crun runc)")
    runsc = hostcheck.find_binary("runsc")
    if runsc is None:
        raise NoRuntimeAvailable("runsc (gVisor) is not installed (Debian package runsc)")
    return "runsc", runsc
