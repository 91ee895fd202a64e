"""The rootless engine's pure parts: id maps, the sandbox's egress filter, pasta's flags, the init pidfd,
the readiness check's advice. What runs as a real user is in tests/rootless/."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contree import layerformat
from contree.engine.runtime import hostcheck, oci_config
from contree.engine.runtime.rootless import check, delegation, ids, limits, network, sandbox_ns

FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     |-- 192.0.2.0
        /24 link UNICAST
Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
     |-- 192.0.2.2
        /32 host LOCAL
     |-- 192.0.2.255
        /32 link BROADCAST
"""


def _etc(tmp_path: Path, subuid: str, subgid: str | None = None) -> Path:
    (tmp_path / "subuid").write_text(subuid)
    (tmp_path / "subgid").write_text(subgid if subgid is not None else subuid)
    return tmp_path


def test_the_engine_maps_the_user_to_0_and_its_subordinate_range_above(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "helpers", lambda: ("/usr/bin/newuidmap", "/usr/bin/newgidmap"))
    etc = _etc(tmp_path, "contree-engine:100000:65536\n4242:165536:65536\n")
    plan = ids.plan_for(4242, 4343, etc=etc)  # entries may name the user by number
    assert plan.uid_extents == ((0, 4242, 1), (1, 165536, 65536))
    assert plan.gid_extents == ((0, 4343, 1), (1, 165536, 65536))
    assert not plan.single and plan.size == 65536
    # A sandbox maps the same ids onto themselves, cut where the engine's map changes extent.
    assert ids.sandbox_extents(plan.uid_extents, plan.size) == ((0, 0, 1), (1, 1, 65535))


def test_without_subordinate_ids_only_the_user_is_mapped_and_the_fix_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "helpers", lambda: ("/usr/bin/newuidmap", "/usr/bin/newgidmap"))
    plan = ids.plan_for(4242, 4242, etc=_etc(tmp_path, "someone:165536:65536\n"))
    assert plan.single and plan.size == 1
    assert plan.uid_extents == ((0, 4242, 1),)
    assert plan.single_reason is not None and "usermod --add-subuids" in plan.single_reason
    assert ids.sandbox_extents(plan.uid_extents, plan.size) == ((0, 0, 1),)
    monkeypatch.setattr(ids, "helpers", lambda: (None, None))
    plan = ids.plan_for(4242, 4242, etc=_etc(tmp_path, "4242:165536:65536\n"))
    assert plan.single and plan.single_reason is not None and "uidmap" in plan.single_reason


def test_a_small_range_gives_fewer_container_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "helpers", lambda: ("/usr/bin/newuidmap", "/usr/bin/newgidmap"))
    plan = ids.plan_for(4242, 4242, etc=_etc(tmp_path, "4242:300000:1000\n"))
    assert plan.size == 1001
    assert ids.sandbox_extents(plan.uid_extents, plan.size) == ((0, 0, 1), (1, 1, 1000))


def test_the_current_namespaces_maps_are_read_back(tmp_path: Path) -> None:
    (tmp_path / "uid_map").write_text("         0       1001          1\n         1     165536      65536\n")
    (tmp_path / "gid_map").write_text("         0       1001          1\n")
    plan = ids.current_plan(tmp_path)
    assert plan.uid_extents == ((0, 1001, 1), (1, 165536, 65536)) and plan.gid_extents == ((0, 1001, 1),)
    assert plan.size == 1


def test_owner_ids_are_distinct_per_live_sandbox() -> None:
    pool = sandbox_ns.OwnerPool(65536)
    a, b = pool.take(), pool.take()
    assert a != b and 0 not in (a, b)
    pool.give(a)
    assert pool.take() == a
    single = sandbox_ns.OwnerPool(1)
    assert single.take() == single.take() == 0  # only the engine's own id exists


def test_the_egress_filter_lets_only_dns_through_to_the_forwarder_and_refuses_private_ranges(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fib = tmp_path / "fib_trie"
    fib.write_text(FIB_TRIE)
    assert network.host_local_addresses(fib) == ["127.0.0.1", "192.0.2.2"]
    monkeypatch.setattr(network, "host_local_addresses", lambda: ["192.0.2.2", "203.0.113.7"])
    rules = network.filter_rules().splitlines()
    assert rules[0] == "*filter" and rules[-1] == "COMMIT"
    first_reject = next(i for i, r in enumerate(rules) if "REJECT" in r)
    dns = [i for i, r in enumerate(rules) if "--dport 53" in r]
    assert [rules[i] for i in dns] == [f"-A OUTPUT -d {network.DNS}/32 -p udp --dport 53 -j ACCEPT",
                                       f"-A OUTPUT -d {network.DNS}/32 -p tcp --dport 53 -j ACCEPT"]
    assert max(dns) < first_reject
    for net in ("10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16",
                "127.0.0.0/8", "224.0.0.0/4", "203.0.113.7/32", "192.0.2.2/32"):
        assert f"-A OUTPUT -d {net} -j REJECT --reject-with icmp-net-prohibited" in rules, net
    assert "-A OUTPUT -o lo -j ACCEPT" in rules  # the sandbox's own loopback


def test_pasta_never_maps_the_gateway_to_the_host_nor_forwards_ports() -> None:
    argv = network.pasta_argv("/usr/bin/pasta", Path("/u"), Path("/n"))
    joined = " ".join(argv)
    assert "--no-map-gw" in argv and "--ipv4-only" in argv
    for flag in ("-t none", "-u none", "-T none", "-U none"):
        assert flag in joined, flag  # pasta's default `auto` would forward the host's loopback ports
    assert f"--dns-forward {network.DNS}" in joined and "--userns /u" in joined and "--netns /n" in joined


def _start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return int(fh.read().rsplit(b")", 1)[1].split()[19])


def test_the_init_is_signalled_only_when_its_start_time_matches(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = tmp_path / "sandbox"
        state.mkdir()
        started = _start_time(child.pid)
        (state / "status").write_text(f'{{"pid": {child.pid}, "process-start-time": {started + 1}}}')
        assert limits.init_pidfd(state) is None  # another process now holds that pid
        limits.RuntimeStateKiller(tmp_path).kill_all("sandbox")
        assert child.poll() is None
        (state / "status").write_text(f'{{"pid": {child.pid}, "process-start-time": {started}}}')
        limits.RuntimeStateKiller(tmp_path).kill_all("sandbox")
        assert child.wait(10) == -signal.SIGKILL
        assert limits.init_pidfd(tmp_path / "missing") is None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_root_keeps_the_trusted_overlay_namespace() -> None:
    if not layerformat.in_initial_userns():
        pytest.fail("this test runs on the host, outside any user namespace")
    assert layerformat.opaque_xattr() == "trusted.overlay.opaque" and not layerformat.needs_userxattr()
    assert layerformat.is_overlay_xattr("user.overlay.opaque") and not layerformat.is_overlay_xattr("user.x")


def test_a_user_outside_the_engine_namespace_is_told_how_to_start_it() -> None:
    info = hostcheck.detect()
    info.is_root, info.rootless = False, False
    problems = hostcheck.check_requirements(info)
    assert any("contree-mcp engine serve" in p and "engine check" in p for p in problems), problems


def test_rlimit_nproc_is_never_raised_above_the_engines_hard_limit() -> None:
    hard = oci_config.host_hard_rlimits()["RLIMIT_NPROC"]
    assert oci_config.clamp_nproc(64) == (64 if hard < 0 else min(64, hard))
    if hard >= 0:
        assert oci_config.clamp_nproc(hard + 1000) == hard


def test_the_readiness_check_proposes_a_range_nobody_holds(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "ETC", _etc(tmp_path, "contree-engine:100000:65536\nalice:165536:65536\n",
                                         "contree-engine:100000:65536\nbob:231072:65536\n"))
    assert check._free_range() == "296608-362143"


def test_the_readiness_probes_run_in_a_child_and_report_failures() -> None:
    ok, message = check._in_child(lambda: str(os.getpid()))
    assert ok and int(message) != os.getpid()

    def boom() -> str:
        raise OSError("no luck")

    assert check._in_child(boom) == (False, "no luck")
    started = time.monotonic()
    assert check._in_child(lambda: os._exit(3)) == (False, "the probe died")  # type: ignore[func-returns-value]
    assert time.monotonic() - started < 30


def _fake_scope(tmp_path: Path, controllers: str = "cpuset cpu io memory pids") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    scope = root / "user.slice" / "user-1000.slice" / "user@1000.service" / "run-r1.scope"
    scope.mkdir(parents=True)
    for name, text in (("cgroup.controllers", controllers), ("cgroup.subtree_control", ""),
                       ("cgroup.procs", "4242\n4243\n")):
        (scope / name).write_text(text)
    proc = tmp_path / "proc-self"
    proc.mkdir()
    (proc / "cgroup").write_text("0::/user.slice/user-1000.slice/user@1000.service/run-r1.scope\n")
    return root, proc


def test_a_delegated_scope_is_split_so_sandboxes_get_controllers(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root, proc = _fake_scope(tmp_path)
    monkeypatch.setattr(delegation, "cgroup_mode", lambda r: (hostcheck.CgroupMode.V2, r))
    found = delegation.find(root, proc)
    assert found.controllers == ("memory", "pids", "cpu")
    assert found.sandboxes == "/user.slice/user-1000.slice/user@1000.service/run-r1.scope/sandboxes"
    writes: list[tuple[str, str]] = []
    monkeypatch.setattr(delegation, "_write", lambda p, v: writes.append((str(p.relative_to(found.path)), v)))
    delegation.take_over(found)
    assert writes == [("supervisor/cgroup.procs", "4242"), ("supervisor/cgroup.procs", "4243")]
    writes.clear()
    delegation.settle(found)
    # Every process out of the scope itself before its controllers are enabled for its children.
    assert writes == [("engine/cgroup.procs", "1"), ("engine/cgroup.procs", "0"),
                      ("cgroup.subtree_control", "+memory +pids +cpu"),
                      ("sandboxes/cgroup.subtree_control", "+memory +pids +cpu")]


def test_a_cgroup_that_is_not_ours_or_has_no_controllers_is_refused(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root, proc = _fake_scope(tmp_path, controllers="cpuset io")
    monkeypatch.setattr(delegation, "cgroup_mode", lambda r: (hostcheck.CgroupMode.V2, r))
    with pytest.raises(delegation.DelegationError, match="has none of memory, pids, cpu"):
        delegation.find(root, proc)
    monkeypatch.setattr(delegation, "cgroup_mode", lambda r: (hostcheck.CgroupMode.HYBRID, r))
    with pytest.raises(delegation.DelegationError, match="not a pure v2 hierarchy"):
        delegation.find(root, proc)
    monkeypatch.setattr(delegation, "cgroup_mode", lambda r: (hostcheck.CgroupMode.V2, r))
    monkeypatch.setattr(delegation.os, "access", lambda p, mode: False)
    with pytest.raises(delegation.DelegationError, match="not delegated to this user"):
        delegation.find(root, proc)


def test_controllers_already_enabled_above_are_not_written_again(tmp_path: Path) -> None:
    """A rootless engine may write only below its delegated cgroup: the chain above already has them."""
    from contree.engine.runtime.cgroups import CgroupManager

    root = tmp_path / "cgroup"
    parent = root / "a" / "b"
    parent.mkdir(parents=True)
    for node in (root, root / "a", parent):
        (node / "cgroup.controllers").write_text("memory pids cpu")
        (node / "cgroup.subtree_control").write_text("memory pids cpu" if node != parent else "")
    info = hostcheck.detect()
    info.cgroup_mode, info.unified_root = hostcheck.CgroupMode.V2, root
    CgroupManager(info, "/a/b")._enable_v2_controllers(parent / "x")
    for node in (root, root / "a"):  # untouched (a user's write there would fail)
        assert (node / "cgroup.subtree_control").read_text() == "memory pids cpu"
    assert (parent / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
