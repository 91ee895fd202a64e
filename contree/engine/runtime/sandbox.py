"""The sandbox runtime: one OCI bundle + cgroup + network namespace per run, driven through crun (or
runc/runsc).

The caller mounts the rootfs (overlay) and unmounts it afterwards (`contree.engine.snapshots`); this
module does everything between: `SandboxRuntime.start(spec)` → `RunningSandbox` (`handles.py`: pipes,
`wait`, `kill`, `exec`) → `cleanup`. `start` is `stage` (bundle dir, limits cgroup, network: nothing that
needs the rootfs) then `launch` (rootfs bind, config, runtime process), so a caller can stage while it is
still mounting the rootfs. The runtime keeps spare limits cgroups and NAT networks ready for the next
runs, and writes each sandbox's /etc files (hostname, hosts, resolv.conf) into its bundle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any

import msgspec

from contree.engine.runtime import hostcheck, oci_config, recovery, seccomp, subids
from contree.engine.runtime.cgroups import CgroupLimits, CgroupManager
from contree.engine.runtime.child import Child
from contree.engine.runtime.handles import (
    ProcessExit,
    RunningProcess,
    RunningSandbox,
    SandboxExit,
    SandboxSpec,
    StagedSandbox,
)
from contree.engine.runtime.hostcheck import HostInfo, NoRuntimeAvailable
from contree.engine.runtime.netns import NetworkInfo, SandboxNetwork
from contree.engine.runtime.network import DEFAULT_SUBNET, NetworkManager
from contree.engine.runtime.paths import (
    BUNDLES,
    IPAM_DIR,
    ROOTFS_BINDS,
    RUN_DIR,
    cgroup_parent_for,
    lock_engine,
    make_run_dir,
    release_bind,
    release_binds,
    release_bundles,
    release_engine_lock,
    runtime_root,
)
from contree.engine.runtime.rootless import runtime as rootless_runtime
from contree.engine.runtime.rootless.limits import RuntimeStateKiller
from contree.engine.runtime.rootless.network import RootlessNetwork
from contree.engine.runtime.userns import IdMap, UsernsUnavailable
from contree.engine.storage.overlay import bind_mount, mount_tmpfs, unmount

log = logging.getLogger(__name__)

__all__ = [
    "NoRuntimeAvailable", "ProcessExit", "RunningProcess", "RunningSandbox", "RuntimeConfig", "SandboxExit",
    "SandboxRuntime", "SandboxSpec", "StagedSandbox",
]

# NAT networks set up ahead for the next runs with networking (two `ip` processes, ~5 ms per run).
SPARE_NETWORKS = 1
# Limits cgroups made ahead (v1: renamed into place, 0.2 ms less per run); v2 cannot rename.
SPARE_CGROUPS = 2


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
        self.root_dir = runtime_root(runtime, engine_id)
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
        self.rootless = False  # runtime/rootless/: every sandbox gets namespaces from `network`
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
        runtime, binary = hostcheck.select_runtime(info, config.runtime)
        if info.rootless:
            return await cls._create_rootless(config, info, runtime, binary)
        idmap = _make_idmap(config, runtime)  # before anything needing clean-up: it may refuse
        engine_id = config.engine_id or secrets.token_hex(4)
        lock_fd = await lock_engine(engine_id)
        swept = await asyncio.to_thread(recovery.sweep_dead_engines, info, engine_id)
        if swept:
            log.warning("cleaned up after engines that died: %s", "; ".join(swept))
        parent = config.cgroup_parent or cgroup_parent_for(engine_id)
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
            make_run_dir(rt.root_dir, None)
            make_run_dir(rt.bundles, None)
            # A tmpfs of the engine's own: a sandbox's mountinfo shows the source of its /etc binds as
            # a path inside it (/<sandbox>/hosts), never a host path; and bundles stay off the disk.
            mount_tmpfs(rt.bundles)
            if idmap is not None:
                make_run_dir(rt.rootfs_binds, idmap.gid_base)
        except BaseException:
            await rt.close()
            raise
        rt._precompile_seccomp()
        log.info("sandbox runtime %s (%s), cgroups %s under %s, network %s%s, user namespace %s", runtime,
                 binary, info.cgroup_mode.value, parent, network.mode,
                 f" ({network.error})" if network.error else "",
                 f"0→{idmap.base} ({idmap.size} ids)" if idmap else "off")
        return rt

    @classmethod
    async def _create_rootless(cls, config: RuntimeConfig, info: HostInfo, runtime: str,
                               binary: str) -> SandboxRuntime:
        """A rootless engine's runtime, from the parts `rootless/runtime.py` decides."""
        budget = CgroupLimits(memory_bytes=config.budget_memory_bytes, pids=config.budget_pids,
                              cpu_quota=config.budget_cpus)
        parts = await rootless_runtime.prepare(info, runtime, binary, state_dir=config.state_dir,
                                               engine_id=config.engine_id, network_mode=config.network_mode,
                                               budget=budget)
        rt = cls(config, info, runtime, binary, parts.cgroups, parts.network, parts.engine_id)
        rt.rootless = True
        rt.run_dir = parts.run_dir
        rt.root_dir = parts.root_dir
        rt.bundles = parts.run_dir / "bundles"
        rt.rootfs_binds = parts.run_dir / "rootfs"
        try:
            for d in (rt.root_dir, rt.bundles):
                d.mkdir(mode=0o700)
        except BaseException:
            await rt.close()
            raise
        rt._precompile_seccomp()
        log.info("%s", parts.description)
        return rt

    def _precompile_seccomp(self) -> None:
        if not self.config.seccomp or self.runtime != "crun":
            return
        try:
            self._seccomp_b64 = seccomp.compiled_bpf_b64()
        except seccomp.SeccompUnavailable as exc:
            log.warning("seccomp precompile unavailable, crun compiles the profile per start: %s", exc)

    def _rlimits(self, spec: SandboxSpec) -> dict[str, int]:
        """A rootless sandbox's RLIMIT_NPROC is its pids limit (runtime/rootless/limits.py)."""
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
                extra_mounts=self._etc_binds(spec.rootfs, bundle, staged.etc_files) + spec.extra_mounts,
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
            preserve = [f"--preserve-fds={len(spec.pass_fds)}"] if spec.pass_fds else []
            child = await Child.spawn([*argv, "run", *preserve, "--bundle", str(bundle), sid],
                                      stdin=spec.stdin, pass_fds=spec.pass_fds)
        except BaseException:
            if bind is not None:
                with contextlib.suppress(OSError):
                    release_bind(bind)
            await self.abort(staged)
            raise
        sandbox = RunningSandbox(self, spec, child, bundle, net)
        sandbox.rootfs_bind = bind
        self._staged.discard(sid)
        self._active[sid] = sandbox
        return sandbox

    def forget(self, sid: str) -> None:
        """Sandbox `sid` was cleaned up: it is no longer this runtime's to stop."""
        self._active.pop(sid, None)

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
            release_bundles(self.bundles)
        except OSError as exc:
            errors.append(f"bundles: {exc}")
        try:
            release_binds(self.rootfs_binds)
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
