"""A throwaway VM for what this host cannot show: Debian's kernel (`linux-image-amd64`) booted under qemu
(TCG: nested KVM does not get past the kernel's decompressor here) with a pure cgroup v2 hierarchy and
this host's root read-only over 9p; /tmp and /run are the VM's own tmpfs. `run_in_vm(script)` runs a
shell script as the VM's root with the host's tree as its root (switch_root, not chroot: the kernel
refuses user namespaces to a chrooted process) and returns the console's output. Under a minute per
boot.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

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
{shares}
cp /script /host/tmp/.vm-script
exec switch_root /host /bin/sh -c '/bin/sh /tmp/.vm-script; /bin/busybox poweroff -f'

"""


REPO = Path(__file__).resolve().parents[1]
NINEP = "trans=virtio,version=9p2000.L,ro,msize=524288"
VM_TMPFS = (Path("/tmp"), Path("/run"))  # the VM's own: host files below them need a share of their own


def _shares() -> list[tuple[str, Path]]:
    """(mount tag, host dir) for what the VM must see below its own tmpfs: this checkout (a CI clone may
    live in /tmp)."""
    return [("repo", REPO)] if any(REPO.is_relative_to(d) for d in VM_TMPFS) else []


def _share_mounts() -> str:
    return "\n".join(
        f"mkdir -p /host{path} && mount -t 9p -o {NINEP} {tag} /host{path}"
        f' || echo "VM: no 9p share {tag}"'
        for tag, path in _shares()
    )


def _require(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} not found: install the Debian package {package}")
    return path


def _kernel() -> tuple[Path, Path]:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        pytest.fail("no kernel image in /boot for the VM: install the Debian package linux-image-amd64")
    kernel = kernels[-1]
    modules = Path("/lib/modules") / kernel.name.removeprefix("vmlinuz-") / "kernel"
    if not modules.is_dir():
        pytest.fail(f"no modules for {kernel.name}: reinstall the Debian package linux-image-amd64")
    return kernel, modules


def _initramfs(tmp: Path, modules: Path, script: str) -> Path:
    root = tmp / "initramfs"
    for d in ("bin", "mod", "proc", "sys", "dev", "host"):
        (root / d).mkdir(parents=True)
    if not Path("/bin/busybox").is_file():
        pytest.fail("/bin/busybox not found: install the Debian package busybox-static")
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    names = []
    for mod in MODULES:
        src = modules / f"{mod}.ko"
        if not src.exists():
            pytest.fail(f"kernel module {src} missing (the VM needs virtio and 9p modules)")
        shutil.copy2(src, root / "mod")
        names.append(Path(mod).name)
    init = root / "init"
    init.write_text(INIT.format(modules=" ".join(names), shares=_share_mounts()))
    init.chmod(0o755)
    (root / "script").write_text(script)
    listing = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    archive = subprocess.run(["cpio", "-o", "-H", "newc"], cwd=root, input=listing, capture_output=True,
                             check=True).stdout
    out = tmp / "initramfs.gz"
    out.write_bytes(gzip.compress(archive, compresslevel=1))
    return out


def run_in_vm(script: str, tmp: Path, *, timeout: float = 900) -> str:
    qemu = _require("qemu-system-x86_64", "qemu-system-x86")
    _require("cpio", "cpio")
    kernel, modules = _kernel()
    initramfs = _initramfs(tmp, modules, script)
    res = subprocess.run(
        [qemu, "-accel", "tcg", "-m", "1536", "-smp", "2", "-kernel", str(kernel), "-initrd", str(initramfs),
         "-append", "console=ttyS0 panic=-1 quiet", "-nographic", "-no-reboot", "-nodefaults",
         "-serial", "stdio", "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on",
         *(arg for tag, path in _shares()
           for arg in ("-virtfs", f"local,path={path},mount_tag={tag},security_model=none,readonly=on"))],
        capture_output=True, text=True, errors="replace", timeout=timeout, stdin=subprocess.DEVNULL)
    return res.stdout + res.stderr
