"""Shared fixtures for the embedded-engine tests (root, overlayfs, a busybox rootfs)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from contree.engine.bootstrap import build_busybox_rootfs
from contree.engine.overlay import mounts_under, unmount


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the engine tests need root (overlay mounts, trusted.* xattrs, whiteout device nodes)")


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install the Debian package {package}")
    return path


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox root filesystem built once per session; treat it as read-only."""
    require_root()
    if not Path("/bin/busybox").is_file():
        pytest.fail("/bin/busybox not found: install the Debian package busybox-static")
    root = tmp_path_factory.mktemp("busybox") / "rootfs"
    build_busybox_rootfs(root)
    return root


@pytest.fixture
def mount_guard(tmp_path: Path) -> Iterator[Path]:
    """`tmp_path`, with every mount left below it detached at teardown (even when the test failed)."""
    require_root()
    yield tmp_path
    for point in mounts_under(tmp_path):
        unmount(point)
