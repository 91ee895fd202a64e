"""overlay.mount_overlay / unmount through the new mount API."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from contree.engine.storage.overlay import MAX_LOWERS, OverlayError, is_mountpoint, mount_overlay, unmount


def _layer(root: Path, name: str, files: dict[str, str]) -> Path:
    d = root / name
    d.mkdir()
    for rel, text in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    return d


def test_top_layer_wins_and_writes_go_to_upper(mount_guard: Path) -> None:
    top = _layer(mount_guard, "top", {"f": "top"})
    bottom = _layer(mount_guard, "bottom", {"f": "bottom", "g": "g"})
    upper, work, merged = mount_guard / "u", mount_guard / "w", mount_guard / "m"
    for d in (upper, work, merged):
        d.mkdir()
    mount_overlay([top, bottom], upper, work, merged)
    assert is_mountpoint(merged)
    assert (merged / "f").read_text() == "top"
    (merged / "new").write_text("n")
    unmount(merged)
    assert not is_mountpoint(merged)
    assert sorted(os.listdir(upper)) == ["new"]
    assert (bottom / "f").read_text() == "bottom"


def test_single_lower_without_upper_is_readonly(mount_guard: Path) -> None:
    layer = _layer(mount_guard, "only", {"a/b": "x"})
    os.mknod(layer / "gone", 0o600 | 0o020000, os.makedev(0, 0))  # a whiteout stays hidden
    merged = mount_guard / "m"
    merged.mkdir()
    mount_overlay([layer], None, None, merged)
    try:
        assert sorted(os.listdir(merged)) == ["a"]
        with pytest.raises(OSError) as info:
            (merged / "new").write_text("x")
        assert info.value.errno == errno.EROFS
    finally:
        unmount(merged)


def test_single_lower_mounts_leave_nothing_behind(mount_guard: Path) -> None:
    """The empty second lower of a one-layer mount is nothing on disk: a process that made such mounts
    leaves no directory in its TMPDIR (one `contree-empty-lower-*` per process used to stay in /tmp)."""
    layer = _layer(mount_guard, "only", {"f": "x"})
    tmp = mount_guard / "tmp"
    tmp.mkdir()
    script = textwrap.dedent("""
        import os, sys
        from pathlib import Path
        from contree.engine.storage.overlay import mount_overlay, unmount
        layer, base = Path(sys.argv[1]), Path(sys.argv[2])
        for i in range(2):
            merged = base / f"m{i}"
            merged.mkdir()
            mount_overlay([layer], None, None, merged)
            try:
                assert os.listdir(merged) == ["f"] and (merged / "f").read_text() == "x"
            finally:
                unmount(merged)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script, str(layer), str(mount_guard)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "TMPDIR": str(tmp)},
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
    assert sorted(os.listdir(tmp)) == []


def test_many_lowers_mount_past_the_legacy_page_limit(mount_guard: Path) -> None:
    layers = [_layer(mount_guard, f"layer-with-a-long-name-{i:04d}", {f"f{i}": str(i)}) for i in range(200)]
    merged = mount_guard / "m"
    merged.mkdir()
    mount_overlay(layers, None, None, merged)
    try:
        assert len(os.listdir(merged)) == 200
    finally:
        unmount(merged)


def test_too_many_lowers_is_a_clear_error(mount_guard: Path) -> None:
    with pytest.raises(OverlayError, match="kernel limit of 500"):
        mount_overlay([mount_guard] * (MAX_LOWERS + 1), None, None, mount_guard)


def test_missing_lower_names_the_target(mount_guard: Path) -> None:
    merged = mount_guard / "m"
    merged.mkdir()
    with pytest.raises(OverlayError, match="overlay mount on"):
        mount_overlay([mount_guard / "nope", mount_guard / "nope2"], None, None, merged)
    assert not is_mountpoint(merged)


def test_mount_is_nodev(mount_guard: Path) -> None:
    layer = _layer(mount_guard, "l", {})
    os.mknod(layer / "null", 0o666 | 0o020000, os.makedev(1, 3))
    merged = mount_guard / "m"
    merged.mkdir()
    mount_overlay([layer], None, None, merged)
    try:
        with pytest.raises(PermissionError):
            (merged / "null").read_bytes()
    finally:
        unmount(merged)


def test_unmount_of_busy_mount_detaches(mount_guard: Path) -> None:
    layer = _layer(mount_guard, "l", {"f": "x"})
    merged = mount_guard / "m"
    merged.mkdir()
    mount_overlay([layer], None, None, merged)
    fd = os.open(merged / "f", os.O_RDONLY)
    try:
        os.chdir(merged)
        unmount(merged)
        assert not is_mountpoint(merged)
    finally:
        os.chdir("/")
        os.close(fd)


def test_unmount_of_plain_directory_is_a_no_op(tmp_path: Path) -> None:
    unmount(tmp_path)
