"""bootstrap.build_busybox_rootfs: a usable minimal root filesystem."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from contree.engine.cli import bootstrap_main
from contree.engine.storage.bootstrap import BUSYBOX_TAG, bootstrap_images
from contree.engine.storage.store import KIND_IMPORTED, Store


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


def test_bootstrap_busybox_image_is_tagged_and_idempotent(store: Store) -> None:
    [first] = bootstrap_images(store, ("busybox",))
    assert first.tag == BUSYBOX_TAG and first.kind == KIND_IMPORTED
    assert any(e.startswith("PATH=") for e in first.config.env)
    [again] = bootstrap_images(store, ("busybox",))
    assert again.uuid == first.uuid and len(store.list()) == 1
    r = store.resolver(first)
    assert r.lookup("/bin/sh", follow=False).is_symlink
    assert r.lookup("/bin/sh").is_regular
    assert list(store.tmp_dir.iterdir()) == []


def test_bootstrap_rejects_unknown_images(store: Store) -> None:
    with pytest.raises(ValueError, match="alpine"):
        bootstrap_images(store, ("alpine",))


def test_bootstrap_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    assert bootstrap_main(["--home", str(home), "--only", "busybox"]) == 0
    tag, image_uuid = capsys.readouterr().out.split()
    assert tag == BUSYBOX_TAG
    s = Store(home)
    try:
        assert s.resolve_tag(BUSYBOX_TAG) == image_uuid
    finally:
        s.close()
