"""The engine's cgroup v2 path on a real v2 kernel: this host is hybrid v1 (every controller is bound to a
v1 hierarchy), so a VM boots Debian's kernel (`linux-image-amd64`) under qemu with a pure v2 hierarchy
and the host's root read-only over 9p, and `v2vm_probe.py` runs sandboxes in it under memory, CPU and
pids limits. qemu runs without KVM (nested KVM does not get past the kernel's decompressor here): about
a minute.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.conftest import require_binary, require_root

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]
MODULES = ("drivers/virtio/virtio_ring", "drivers/virtio/virtio", "drivers/virtio/virtio_pci_legacy_dev",
           "drivers/virtio/virtio_pci_modern_dev", "drivers/virtio/virtio_pci", "fs/netfs/netfs",
           "fs/fscache/fscache", "net/9p/9pnet", "net/9p/9pnet_virtio", "fs/9p/9p")
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in {modules}; do insmod /mod/$m.ko || echo "VM: insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288 host /host || echo "VM: no 9p root"
mount -t proc proc /host/proc; mount -t sysfs sys /host/sys; mount -t cgroup2 cgroup2 /host/sys/fs/cgroup
mount -t devtmpfs dev /host/dev; mount -t tmpfs tmpfs /host/tmp; mount -t tmpfs tmpfs /host/run
chroot /host /bin/sh -c 'cd {repo} && PYTHONDONTWRITEBYTECODE=1 {python} -m tests.engine.v2vm_probe'
poweroff -f
"""


def _kernel() -> tuple[Path, Path]:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        pytest.fail("no kernel image in /boot for the cgroup v2 VM: install the Debian package "
                    "linux-image-amd64")
    kernel = kernels[-1]
    modules = Path("/lib/modules") / kernel.name.removeprefix("vmlinuz-") / "kernel"
    if not modules.is_dir():
        pytest.fail(f"no modules for {kernel.name}: reinstall the Debian package linux-image-amd64")
    return kernel, modules


def _initramfs(tmp: Path, modules: Path) -> Path:
    root = tmp / "initramfs"
    for d in ("bin", "mod", "proc", "sys", "dev", "host"):
        (root / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    names = []
    for mod in MODULES:
        src = modules / f"{mod}.ko"
        if not src.exists():
            pytest.fail(f"kernel module {src} missing (the VM needs virtio and 9p modules)")
        shutil.copy2(src, root / "mod")
        names.append(Path(mod).name)
    init = root / "init"
    init.write_text(INIT.format(modules=" ".join(names), repo=REPO, python=sys.executable))
    init.chmod(0o755)
    listing = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    archive = subprocess.run(["cpio", "-o", "-H", "newc"], cwd=root, input=listing, capture_output=True,
                             check=True).stdout
    out = tmp / "initramfs.gz"
    out.write_bytes(gzip.compress(archive, compresslevel=1))
    return out


def test_limits_oom_and_cleanup_on_a_cgroup_v2_kernel(tmp_path: Path) -> None:
    require_root()
    qemu = require_binary("qemu-system-x86_64", "qemu-system-x86")
    require_binary("cpio", "cpio")
    if not Path("/bin/busybox").is_file():
        pytest.fail("/bin/busybox not found: install the Debian package busybox-static")
    if os.stat(REPO).st_dev != os.stat("/").st_dev:
        pytest.fail(f"{REPO} must be on the root filesystem (the VM sees the host's root over 9p)")
    kernel, modules = _kernel()
    initramfs = _initramfs(tmp_path, modules)
    res = subprocess.run(
        [qemu, "-accel", "tcg", "-m", "1536", "-smp", "2", "-kernel", str(kernel), "-initrd", str(initramfs),
         "-append", "console=ttyS0 panic=-1 quiet", "-nographic", "-no-reboot", "-nodefaults",
         "-serial", "stdio", "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on"],
        capture_output=True, text=True, errors="replace", timeout=600, stdin=subprocess.DEVNULL)
    lines = [line.split("V2RESULT ", 1)[1] for line in res.stdout.splitlines() if "V2RESULT " in line]
    assert lines, f"the VM printed no result:\n{res.stdout[-3000:]}\n{res.stderr[-2000:]}"
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
