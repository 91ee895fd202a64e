"""cgroup placement, limits, statistics and kill-all for sandboxes (RUNTIME §5), v1/hybrid and v2.

Layout: `<parent>/<sandbox>/` is ours (limits + statistics); the OCI runtime is given
`<parent>/<sandbox>/ctr` as its absolute cgroupsPath. crun removes its own leaf when the container ends,
so the sandbox's peak memory and CPU time are read from our directory, whose counters are hierarchical
and outlive the leaf. The parent carries the operator's total budget.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from contree.engine.runtime.hostcheck import CGROUP_ROOT, CgroupMode, HostInfo

log = logging.getLogger(__name__)

CPU_PERIOD_US = 100_000
_CHARGE_SLACK = 2 * 64 * 4096  # memcg charges in batches of up to 64 pages
RUNTIME_LEAF = "ctr"


class CgroupLimits(msgspec.Struct, kw_only=True):
    memory_bytes: int | None = None
    pids: int | None = None
    cpu_quota: float | None = None  # cores


class CgroupStats(msgspec.Struct, kw_only=True):
    memory_peak_bytes: int | None = None
    cpu_usage_ns: int | None = None
    oom_kills: int | None = None
    under_oom_events: int | None = None  # v1: OOM notifications seen for the sandbox (see `_watch_oom`)
    reached_limit: bool = False  # v1: the sandbox's peak memory came within a charge batch of its own limit


class CgroupError(OSError):
    pass


def _write(path: Path, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_keyed(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
    except (OSError, ValueError):
        return None
    return None


def _tree(path: Path) -> list[Path]:
    """`path` and its sub-cgroups, parents first (scandir's d_type spares a stat per control file)."""
    out = [path]
    try:
        with os.scandir(path) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    out.extend(_tree(Path(entry.path)))
    except FileNotFoundError:
        return []
    return out


def _rmdir_tree(path: Path) -> None:
    """Remove a cgroup directory and its sub-cgroups, deepest first (cgroupfs has no recursive rmdir)."""
    for d in reversed(_tree(path)):
        d.rmdir()


class CgroupManager:
    """Owns `<parent>` (e.g. `/contree-engine/<engine-id>`) in every hierarchy of this host."""

    enforces_total = True  # the parent cgroup carries the engine's total budget (rootless may have none)

    def __init__(self, info: HostInfo, parent: str) -> None:
        if not parent.startswith("/"):
            raise ValueError("the cgroup parent must be an absolute path (RUNTIME §5.2)")
        self.info = info
        self.parent = parent.rstrip("/")
        self.v2 = info.cgroup_mode is CgroupMode.V2
        self._v2_root = info.unified_root or CGROUP_ROOT
        self._oom_fds: dict[str, int] = {}
        self._oom_seen: dict[str, int] = {}

    # ---- paths ----

    def _rel(self, name: str | None = None) -> str:
        rel = self.parent.lstrip("/")
        return f"{rel}/{name}" if name else rel

    def _v1(self, ctrl: str, name: str | None = None) -> Path | None:
        mount = self.info.v1_controllers.get(ctrl)
        return mount / self._rel(name) if mount else None

    def _v2(self, name: str | None = None) -> Path:
        return self._v2_root / self._rel(name)

    def _all_dirs(self, name: str | None = None) -> list[Path]:
        if self.v2:
            return [self._v2(name)]
        mounts = sorted(set(self.info.v1_controllers.values()))
        dirs = [m / self._rel(name) for m in mounts]
        # A hybrid host's unified hierarchy gets the runtime's directories too.
        if self.info.unified_root is not None:
            dirs.append(self.info.unified_root / self._rel(name))
        return dirs

    def runtime_path(self, name: str) -> str:
        """The absolute cgroupsPath to put in the OCI config of sandbox `name`."""
        return f"{self.parent}/{name}/{RUNTIME_LEAF}"

    # ---- creation and limits ----

    def _enable_v2_controllers(self, path: Path) -> None:
        root = self._v2_root
        chain = [root, *[p for p in reversed(path.parents) if root in p.parents], path]
        for node in chain[:-1]:
            try:
                avail = set((node / "cgroup.controllers").read_text().split())
                # Only what is missing: a rootless engine may write just below its delegated cgroup.
                enabled = set((node / "cgroup.subtree_control").read_text().split())
                wanted = " ".join(f"+{c}" for c in ("memory", "pids", "cpu") if c in avail - enabled)
                if wanted:
                    _write(node / "cgroup.subtree_control", wanted)
            except OSError as exc:
                raise CgroupError(exc.errno, f"cannot enable controllers in {node}: {exc.strerror}") from exc

    def _mkdirs(self, name: str | None) -> None:
        if self.v2:
            path = self._v2(name)
            path.mkdir(parents=True, exist_ok=True)
            self._enable_v2_controllers(path / "x")
            return
        for p in self._own_v1_dirs(name):
            p.mkdir(parents=True, exist_ok=True)

    def _own_v1_dirs(self, name: str | None) -> list[Path]:
        """The v1 directories `create` makes (co-mounted controllers share one)."""
        dirs: list[Path] = []
        for ctrl in ("memory", "pids", "cpu", "cpuacct", "freezer"):
            p = self._v1(ctrl, name)
            if p is not None and p not in dirs:
                dirs.append(p)
        return dirs

    def _apply(self, name: str | None, limits: CgroupLimits) -> None:
        if self.v2:
            path = self._v2(name)
            if limits.memory_bytes is not None:
                _write(path / "memory.max", str(limits.memory_bytes))
                if (path / "memory.swap.max").exists():
                    _write(path / "memory.swap.max", "0")
            if limits.pids is not None:
                _write(path / "pids.max", str(limits.pids))
            if limits.cpu_quota is not None:
                _write(path / "cpu.max", f"{int(limits.cpu_quota * CPU_PERIOD_US)} {CPU_PERIOD_US}")
            return
        mem = self._v1("memory", name)
        if limits.memory_bytes is not None and mem is not None:
            _write(mem / "memory.limit_in_bytes", str(limits.memory_bytes))
            if (mem / "memory.memsw.limit_in_bytes").exists():
                _write(mem / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        pids = self._v1("pids", name)
        if limits.pids is not None and pids is not None:
            _write(pids / "pids.max", str(limits.pids))
        cpu = self._v1("cpu", name)
        if limits.cpu_quota is not None and cpu is not None:
            _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", str(int(limits.cpu_quota * CPU_PERIOD_US)))

    def setup_parent(self, budget: CgroupLimits | None = None) -> None:
        self._mkdirs(None)
        if budget is not None:
            self._apply(None, budget)

    def enforceable(self) -> frozenset[str]:
        """The limits (`memory`, `cpu`, `pids`) this host really applies to the parent's sandboxes."""
        if self.v2:
            try:
                enabled = set((self._v2() / "cgroup.subtree_control").read_text().split())
            except OSError:
                return frozenset()
            return frozenset(enabled & {"memory", "cpu", "pids"})
        files = {"memory": "memory.limit_in_bytes", "cpu": "cpu.cfs_quota_us", "pids": "pids.max"}
        return frozenset(ctrl for ctrl, name in files.items()
                         if (d := self._v1(ctrl)) is not None and (d / name).exists())

    def create(self, name: str, limits: CgroupLimits) -> None:
        self._mkdirs(name)
        self._apply(name, limits)
        if not self.v2:
            self._watch_oom(name)

    def adopt(self, made: str, name: str) -> bool:
        """Rename cgroup `made` (from `create`, unused) to `name`: five renames instead of five mkdirs
        and the limit writes, on a run's way to its start. v1 only (v2 cannot rename); False when it
        could not, with `made` left as it was."""
        if self.v2:
            return False
        done: list[tuple[Path, Path]] = []
        try:
            for old in self._own_v1_dirs(made):
                new = old.with_name(name)
                os.rename(old, new)
                done.append((old, new))
        except OSError as exc:
            log.debug("cannot rename cgroup %s to %s: %s", made, name, exc)
            for old, new in reversed(done):
                with contextlib.suppress(OSError):
                    os.rename(new, old)
            return False
        if made in self._oom_fds:  # the eventfd follows the cgroup, not its name
            self._oom_fds[name] = self._oom_fds.pop(made)
        return True

    def _watch_oom(self, name: str) -> None:
        """v1 keeps OOM-kill counts in the victim's own cgroup (the runtime's leaf, deleted at exit), but
        notifies every cgroup in the OOMing subtree through `memory.oom_control` eventfds."""
        mem = self._v1("memory", name)
        if mem is None:
            return
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            ctl = os.open(mem / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _write(mem / "cgroup.event_control", f"{efd} {ctl}")
            finally:
                os.close(ctl)
        except OSError as exc:
            os.close(efd)
            log.warning("no OOM notifications for %s: %s", name, exc)
            return
        self._oom_fds[name] = efd

    def _oom_events(self, name: str) -> int | None:
        efd = self._oom_fds.get(name)
        if efd is None:
            return None
        try:
            n = os.eventfd_read(efd)
        except BlockingIOError:
            n = 0
        self._oom_seen[name] = self._oom_seen.get(name, 0) + n  # reading resets the eventfd
        return self._oom_seen[name]

    # ---- results ----

    def stats(self, name: str) -> CgroupStats:
        if self.v2:
            path = self._v2(name)
            usage = _read_keyed(path / "cpu.stat", "usage_usec")
            return CgroupStats(memory_peak_bytes=_read_int(path / "memory.peak"),
                               cpu_usage_ns=usage * 1000 if usage is not None else None,
                               oom_kills=_read_keyed(path / "memory.events", "oom_kill"))
        mem = self._v1("memory", name)
        acct = self._v1("cpuacct", name)
        return CgroupStats(
            memory_peak_bytes=_read_int(mem / "memory.max_usage_in_bytes") if mem else None,
            cpu_usage_ns=_read_int(acct / "cpuacct.usage") if acct else None,
            oom_kills=self._v1_oom_kills(mem) if mem else None,
            under_oom_events=self._oom_events(name),
            reached_limit=self._v1_reached_limit(mem) if mem else False,
        )

    def oom_killed(self, stats: CgroupStats, *, died_of_sigkill: bool) -> bool:
        """Whether the OOM killer killed a process of the sandbox.

        v2 counts kills hierarchically. v1 counts them only in the victim's own cgroup (the runtime's
        leaf, gone by now), but notifies every cgroup of an OOMing subtree: an OOM notification means a
        kill when the sandbox's own limit was hit, or when its init died of a SIGKILL nobody sent (an OOM
        of the engine's total budget notifies every sandbox, not only the victim's).
        """
        if stats.oom_kills:
            return True
        if not stats.under_oom_events:
            return False
        return stats.reached_limit or died_of_sigkill

    @staticmethod
    def _v1_reached_limit(mem: Path) -> bool:
        # failcnt would say it, but 6.x kernels leave it at 0; the peak stops within one charge batch
        # (64 pages) of the limit instead.
        peak, limit = _read_int(mem / "memory.max_usage_in_bytes"), _read_int(mem / "memory.limit_in_bytes")
        return peak is not None and limit is not None and peak >= limit - _CHARGE_SLACK

    def pids_state(self, name: str) -> tuple[int | None, int | None]:
        """(processes now, forks refused by the pids limit so far)."""
        path = self._v2(name) if self.v2 else self._v1("pids", name)
        if path is None:
            return None, None
        refused = None
        # Refused forks are counted in the forking task's own cgroup (the runtime's leaf).
        for d in _tree(path):
            n = _read_keyed(d / "pids.events", "max")
            if n is not None:
                refused = (refused or 0) + n
        return _read_int(path / "pids.current"), refused

    @staticmethod
    def _v1_oom_kills(mem: Path) -> int | None:
        total = None
        for d in _tree(mem):
            n = _read_keyed(d / "memory.oom_control", "oom_kill")
            if n is not None:
                total = (total or 0) + n
        return total

    def procs(self, name: str) -> list[int]:
        root = self._v2(name) if self.v2 else self._v1("pids", name) or self._v1("memory", name)
        if root is None or not root.is_dir():
            return []
        pids: list[int] = []
        for d in _tree(root):
            try:
                pids.extend(int(x) for x in (d / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                continue
        return pids

    def kill_all(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal every process of the sandbox, including ones a runtime lost track of."""
        if self.v2 and sig == signal.SIGKILL and (self._v2(name) / "cgroup.kill").exists():
            try:
                _write(self._v2(name) / "cgroup.kill", "1")
                return
            except OSError:
                pass
        freezer = None if self.v2 else self._v1("freezer", name)
        frozen = False
        if freezer is not None and (freezer / "freezer.state").exists():
            try:
                _write(freezer / "freezer.state", "FROZEN")
                frozen = True
            except OSError:
                pass
        try:
            for _ in range(20):
                pids = self.procs(name)
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                if sig != signal.SIGKILL:
                    break
                if frozen:
                    break  # frozen tasks cannot fork; the kill is queued for all of them
        finally:
            if frozen and freezer is not None:
                try:
                    _write(freezer / "freezer.state", "THAWED")
                except OSError:
                    pass

    # ---- freezing (a consistent copy of a running sandbox's files) ----

    def _freeze_file(self, name: str) -> tuple[Path, str, str] | None:
        """(the file to write, the frozen value, the thawed value), or None without a freezer."""
        if self.v2:
            path = self._v2(name) / "cgroup.freeze"
            return (path, "1", "0") if path.exists() else None
        freezer = self._v1("freezer", name)
        if freezer is None or not (freezer / "freezer.state").exists():
            return None
        return freezer / "freezer.state", "FROZEN", "THAWED"

    def freeze(self, name: str, timeout: float = 5.0) -> bool:
        """Freeze every process of sandbox `name` and wait until they are; False without a freezer. A
        freeze that does not complete in `timeout` seconds is undone (CgroupError)."""
        found = self._freeze_file(name)
        if found is None:
            return False
        path, frozen, thawed = found
        _write(path, frozen)
        deadline = time.monotonic() + timeout
        while not self._is_frozen(name, path):
            if time.monotonic() > deadline:
                with contextlib.suppress(OSError):
                    _write(path, thawed)
                raise CgroupError(errno.EBUSY,
                                  f"the processes of {name} did not freeze within {timeout:.0f} s")
            time.sleep(0.0005)
        return True

    def _is_frozen(self, name: str, path: Path) -> bool:
        if self.v2:
            return _read_keyed(self._v2(name) / "cgroup.events", "frozen") == 1
        return path.read_text().strip() == "FROZEN"

    def thaw(self, name: str) -> None:
        found = self._freeze_file(name)
        if found is not None:
            _write(found[0], found[2])

    # ---- removal ----

    def remove(self, name: str | None, *, timeout: float = 5.0) -> None:
        """Remove the cgroup in every hierarchy, killing stragglers; retries while tasks drain."""
        for key in [k for k in self._oom_fds if name is None or k == name]:
            os.close(self._oom_fds.pop(key))
            self._oom_seen.pop(key, None)
        deadline = time.monotonic() + timeout
        while True:
            leftovers: list[tuple[Path, OSError]] = []
            for d in self._all_dirs(name):
                try:
                    _rmdir_tree(d)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    leftovers.append((d, exc))
            if not leftovers:
                return
            if time.monotonic() > deadline:
                where, first = leftovers[0]
                raise CgroupError(first.errno or errno.EBUSY,
                                  f"cannot remove cgroup {where}: {first.strerror}")
            if name is not None:
                self.kill_all(name)
            time.sleep(0.02)

    def children(self) -> list[str]:
        """The names of the cgroups below the parent (its sandboxes), in any hierarchy."""
        names: set[str] = set()
        for d in self._all_dirs(None):
            with contextlib.suppress(OSError):
                names.update(p.name for p in d.iterdir() if p.is_dir())
        return sorted(names)

    def exists(self, name: str | None = None) -> bool:
        return any(d.exists() for d in self._all_dirs(name))


def sweep_dead_parents(info: HostInfo, root: str, is_dead: Callable[[str], bool]) -> list[str]:
    """Kill and remove the cgroups of engines under `root` that `is_dead(name)` says died without
    closing: their sandboxes would otherwise run forever and their directories pile up."""
    done: list[str] = []
    mount = info.unified_root if info.cgroup_mode is CgroupMode.V2 else info.v1_controllers.get("pids")
    base = (mount or CGROUP_ROOT) / root.strip("/")
    try:
        names = [e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return done
    for name in names:
        if not is_dead(name):
            continue
        mgr = CgroupManager(info, f"/{root.strip('/')}/{name}")
        for sandbox in [p.name for p in _tree(base / name)[1:] if p.parent == base / name]:
            mgr.kill_all(sandbox)
        try:
            mgr.remove(None, timeout=5.0)
            done.append(f"removed the cgroups of dead engine {name}")
        except OSError as exc:
            log.warning("could not remove the cgroups of dead engine %s: %s", name, exc)
    return done
