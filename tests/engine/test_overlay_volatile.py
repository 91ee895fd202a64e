"""Sandbox overlays are mounted `volatile`: unmounting one must not sync the whole filesystem that
holds the upper (that sync was most of what a committing run cost on a busy disk)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from contree.engine.storage.overlay import mount_overlay, unmount


def _is_volatile(target: Path) -> bool:
    opts = _super_options(target)
    return "volatile" in opts or "fsync=volatile" in opts  # newer kernels show the latter


def _super_options(target: Path) -> set[str]:
    want = os.path.realpath(target)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == want:
            return set(line.split(" - ", 1)[1].split()[2].split(","))
    raise AssertionError(f"{target} is not mounted")


def _dirs(root: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, merged = (root / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    (lower / "old").write_text("old")
    return lower, upper, work, merged


@pytest.mark.parametrize("volatile", [True, False])
def test_upper_mount_is_volatile_by_default_and_keeps_writes(mount_guard: Path, volatile: bool) -> None:
    lower, upper, work, merged = _dirs(mount_guard)
    if volatile:
        mount_overlay([lower], upper, work, merged)
    else:
        mount_overlay([lower], upper, work, merged, volatile=False)
    try:
        assert _is_volatile(merged) is volatile
        (merged / "new").write_text("new")
        os.unlink(merged / "old")
    finally:
        unmount(merged)
    # After the unmount the upper holds the change set, as a commit expects.
    assert (upper / "new").read_text() == "new"
    assert os.major(os.lstat(upper / "old").st_rdev) == 0  # whiteout
    assert (lower / "old").read_text() == "old"


def test_read_only_mount_has_no_volatile(mount_guard: Path) -> None:
    lower, _upper, _work, merged = _dirs(mount_guard)
    mount_overlay([lower], None, None, merged)
    try:
        assert not _is_volatile(merged)
        assert (merged / "old").read_text() == "old"
    finally:
        unmount(merged)
