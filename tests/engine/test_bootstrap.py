"""bootstrap.build_busybox_rootfs: a usable minimal root filesystem."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path


def test_busybox_rootfs_layout(busybox_rootfs: Path) -> None:
    assert os.readlink(busybox_rootfs / "bin" / "sh") == "/bin/busybox"
    assert (busybox_rootfs / "bin" / "busybox").stat().st_mode & 0o111
    assert stat.S_IMODE((busybox_rootfs / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((busybox_rootfs / "root").stat().st_mode) == 0o700
    for d in ("proc", "sys", "dev"):
        assert (busybox_rootfs / d).is_dir()
    assert (busybox_rootfs / "etc" / "passwd").read_text().startswith("root:x:0:0:")
    assert "root:x:0:" in (busybox_rootfs / "etc" / "group").read_text()


def test_busybox_rootfs_runs_a_shell(busybox_rootfs: Path) -> None:
    out = subprocess.run(["chroot", str(busybox_rootfs), "/bin/sh", "-c", "echo hi; id -un; ls /usr/bin/env"],
                         capture_output=True, text=True, check=True, timeout=30)
    assert out.stdout.split() == ["hi", "root", "/usr/bin/env"]
