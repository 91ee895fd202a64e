"""A rootless engine in a cgroup delegated to its user (`engine serve --cgroup-scope`) on a real cgroup v2
kernel: this host is hybrid v1, so a VM (tests/qemu_vm.py) gives the throwaway user a delegated cgroup,
as systemd's `Delegate=yes` does, and `delegated_vm_probe.py` runs sandboxes there as that user."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.qemu_vm import run_in_vm
from tests.rootless_env import USER_PATH, RootlessUser

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_sandboxes_get_memory_and_pids_limits_in_the_users_delegated_cgroup(rootless_user: RootlessUser,
                                                                            tmp_path: Path) -> None:
    user = rootless_user
    probe = user.home / "delegated_vm_probe.py"
    probe.write_bytes((Path(__file__).parent / "delegated_vm_probe.py").read_bytes())
    # What systemd's Delegate=yes does for a scope: the directory and its cgroup.* files are the user's.
    ids = f"{user.uid}:{user.gid}"
    script = f"""
d=/sys/fs/cgroup/deleg
echo "+memory +pids +cpu" > /sys/fs/cgroup/cgroup.subtree_control
mkdir $d && chown {ids} $d $d/cgroup.procs $d/cgroup.subtree_control $d/cgroup.threads
mkdir /tmp/w && chown {ids} /tmp/w
echo $$ > $d/cgroup.procs
exec setpriv --reuid={user.uid} --regid={user.gid} --init-groups env -i HOME=/tmp/w PATH={USER_PATH} \
    PYTHONDONTWRITEBYTECODE=1 {user.venv}/bin/python {probe} /tmp/w
"""
    output = run_in_vm(script, tmp_path)
    lines = [line.split("ROOTLESSV2 ", 1)[1] for line in output.splitlines() if "ROOTLESSV2 " in line]
    assert lines, f"the VM printed no result:\n{output[-4000:]}"
    got = json.loads(lines[-1])
    assert "error" not in got, got["error"]
    assert got["rootless"] and got["kind"] == "CgroupManager" and got["scope"] == "/deleg", got
    assert got["parent"] == "/deleg/sandboxes"
    assert got["sandbox"] == {"memory.max": str(64 << 20), "pids.max": "50", "cpu.max": "50000 100000"}, got
    assert 16 < got["bomb_procs"] <= 32, got
    hog = got["hog"]
    assert hog["oom"] and hog["signal"] == 9 and hog["peak"] <= (32 << 20) + (1 << 20), hog
    assert got["scope_procs"] == [] and got["engine_procs"] >= 2  # nothing left in the scope itself
