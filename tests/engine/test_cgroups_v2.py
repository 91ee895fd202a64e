"""The cgroup v2 path of `CgroupManager` against a fake cgroupfs tree.

This host is hybrid v1 with every controller bound to a v1 hierarchy, so no v2 hierarchy here can take
memory, cpu or pids: these tests pin which files the v2 path writes and reads and what it makes of
their contents (the kernel's own formats), not the kernel's enforcement.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from contree.engine.runtime.cgroups import CPU_PERIOD_US, CgroupError, CgroupLimits, CgroupManager
from contree.engine.runtime.hostcheck import CgroupMode, HostInfo

CONTROL_FILES = ("cgroup.controllers", "cgroup.subtree_control", "memory.max", "memory.swap.max", "cpu.max",
                 "pids.max", "memory.peak", "cpu.stat", "memory.events", "pids.current", "pids.events",
                 "cgroup.procs", "cgroup.kill")


def _cgroup(path: Path, controllers: str) -> None:
    """A directory as the kernel shows a cgroup: control files with their initial contents."""
    path.mkdir(parents=True, exist_ok=True)
    initial = {"cgroup.controllers": controllers, "memory.max": "max", "memory.swap.max": "max",
               "cpu.max": f"max {CPU_PERIOD_US}", "pids.max": "max", "memory.peak": "0",
               "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
               "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
               "pids.current": "0", "pids.events": "max 0\n"}
    for name in CONTROL_FILES:
        (path / name).write_text(initial.get(name, "") + "\n" if name in initial else "")


@pytest.fixture
def v2(tmp_path: Path) -> tuple[CgroupManager, Path]:
    root = tmp_path / "cgroup"
    _cgroup(root, "cpuset cpu io memory hugetlb pids rdma misc")
    for rel in ("contree-engine", "contree-engine/e1", "contree-engine/e1/sbx"):
        _cgroup(root / rel, "cpu memory pids")
    info = HostInfo(is_root=True, kernel=(6, 8), cgroup_mode=CgroupMode.V2, unified_root=root,
                    v1_controllers={}, nofile_hard=1024, nproc_hard=1024)
    return CgroupManager(info, "/contree-engine/e1"), root


def test_setup_enables_the_controllers_down_the_chain_and_writes_the_budget(v2: tuple[CgroupManager, Path]
                                                                            ) -> None:
    mgr, root = v2
    mgr.setup_parent(CgroupLimits(memory_bytes=2 << 30, pids=4096, cpu_quota=1.5))
    for node in (root, root / "contree-engine", root / "contree-engine/e1"):
        assert (node / "cgroup.subtree_control").read_text() == "+memory +pids +cpu", node
    parent = root / "contree-engine/e1"
    assert (parent / "memory.max").read_text() == str(2 << 30)
    assert (parent / "memory.swap.max").read_text() == "0"
    assert (parent / "pids.max").read_text() == "4096"
    assert (parent / "cpu.max").read_text() == f"150000 {CPU_PERIOD_US}"


def test_a_sandbox_gets_its_limits_and_controllers_for_the_runtimes_leaf(v2: tuple[CgroupManager, Path]
                                                                         ) -> None:
    mgr, root = v2
    mgr.setup_parent()
    mgr.create("sbx", CgroupLimits(memory_bytes=256 << 20, pids=64, cpu_quota=0.25))
    sbx = root / "contree-engine/e1/sbx"
    # The runtime puts the processes in sbx/ctr: sbx itself must hand the controllers down.
    assert (sbx / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (sbx / "memory.max").read_text() == str(256 << 20)
    assert (sbx / "memory.swap.max").read_text() == "0"
    assert (sbx / "pids.max").read_text() == "64"
    assert (sbx / "cpu.max").read_text() == f"25000 {CPU_PERIOD_US}"
    assert mgr.runtime_path("sbx") == "/contree-engine/e1/sbx/ctr"
    assert not mgr.adopt("sbx", "other")  # v2 cannot rename a cgroup


def test_stats_and_oom_kills_come_from_the_hierarchical_files(v2: tuple[CgroupManager, Path]) -> None:
    mgr, root = v2
    sbx = root / "contree-engine/e1/sbx"
    (sbx / "memory.peak").write_text("268435456\n")
    (sbx / "cpu.stat").write_text("usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n")
    (sbx / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n")
    stats = mgr.stats("sbx")
    assert stats.memory_peak_bytes == 268435456 and stats.cpu_usage_ns == 1234567000 and stats.oom_kills == 1
    assert mgr.oom_killed(stats, died_of_sigkill=False)
    (sbx / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 0\noom_kill 0\noom_group_kill 0\n")
    assert not mgr.oom_killed(mgr.stats("sbx"), died_of_sigkill=True)  # v2 needs no guessing


def test_enforceable_limits_are_the_controllers_the_parent_hands_down(v2: tuple[CgroupManager, Path]) -> None:
    mgr, root = v2
    parent = root / "contree-engine/e1"
    (parent / "cgroup.subtree_control").write_text("cpu memory pids\n")  # as the kernel reads it back
    assert mgr.enforceable() == frozenset({"memory", "cpu", "pids"})
    (parent / "cgroup.subtree_control").write_text("pids\n")
    assert mgr.enforceable() == frozenset({"pids"})


def test_a_hierarchy_that_refuses_delegation_is_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _cgroup(root, "cpu memory pids")
    (root / "cgroup.subtree_control").unlink()
    (root / "cgroup.subtree_control").mkdir()  # any write fails (root would ignore a read-only mode)
    info = HostInfo(is_root=True, kernel=(6, 8), cgroup_mode=CgroupMode.V2, unified_root=root,
                    v1_controllers={}, nofile_hard=1024, nproc_hard=1024)
    with pytest.raises(CgroupError, match="cannot enable controllers in"):
        CgroupManager(info, "/contree-engine/e2").setup_parent()
