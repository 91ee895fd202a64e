"""The engine's cgroup v2 path on a real v2 kernel: this host is hybrid v1 (every controller is bound to a
v1 hierarchy), so a VM boots Debian's kernel (`linux-image-amd64`) under qemu with a pure v2 hierarchy
and the host's root read-only over 9p, and `v2vm_probe.py` runs sandboxes in it under memory, CPU and
pids limits. qemu runs without KVM (nested KVM does not get past the kernel's decompressor here): about
a minute.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.engine.conftest import require_root
from tests.qemu_vm import run_in_vm

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]


def test_limits_oom_and_cleanup_on_a_cgroup_v2_kernel(tmp_path: Path) -> None:
    require_root()
    if os.stat(REPO).st_dev != os.stat("/").st_dev:
        pytest.fail(f"{REPO} must be on the root filesystem (the VM sees the host's root over 9p)")
    output = run_in_vm(f"cd {REPO} && PYTHONDONTWRITEBYTECODE=1 {sys.executable} -m tests.engine.v2vm_probe",
                       tmp_path, timeout=600)
    lines = [line.split("V2RESULT ", 1)[1] for line in output.splitlines() if "V2RESULT " in line]
    assert lines, f"the VM printed no result:\n{output[-5000:]}"
    got = json.loads(lines[-1])
    assert "error" not in got, got.get("error")
    assert got["mode"] == "v2" and got["enforceable"] == ["cpu", "memory", "pids"]
    assert got["parent"] == {"memory.max": str(768 << 20), "memory.swap.max": "0", "cpu.max": "100000 100000",
                             "pids.max": "4096"}
    assert got["sandbox"] == {"memory.max": str(64 << 20), "memory.swap.max": "0", "cpu.max": "50000 100000",
                              "pids.max": "50"}
    assert got["sandbox_procs"] >= 1 and got["sandbox_removed"] and got["parent_removed"]
    assert got["oom_init"]["oom_killed"] and got["oom_init"]["signal"] == 9
    assert got["oom_init"]["peak"] <= (32 << 20) + (1 << 20)
    assert got["oom_child"] == {"oom_killed": True, "code": 0, "out": "rc=137\n"}
    assert got["no_oom"] == {"oom_killed": False, "out": "ok\n"}
    assert 16 < got["pids"]["procs"] <= 32
    cpu = got["cpu"]
    assert cpu["wall_s"] >= 3 and cpu["usage_s"] <= 0.2 * cpu["wall_s"] * 1.25 + 0.1, cpu
