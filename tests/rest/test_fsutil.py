"""contree.fsutil.write_private: 0600 from creation on, atomic, no temp file left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from contree.fsutil import exclusive_file, write_private


def test_write_private_creates_0600_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "secret.json"
    write_private(target, "first é")
    assert target.read_text(encoding="utf-8") == "first é"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(target.parent).st_mode) == 0o700
    target.chmod(0o644)
    write_private(target, b"second")
    assert target.read_bytes() == b"second" and stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["secret.json"]


def test_write_private_failure_keeps_old_content_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    write_private(target, b"old")
    (tmp_path / "secret.d").mkdir()
    with pytest.raises(IsADirectoryError):
        write_private(tmp_path / "secret.d", b"new")  # rename onto a directory fails after the write
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret", "secret.d"]


def test_exclusive_file_keeps_a_complete_file_and_removes_a_failed_one(tmp_path: Path) -> None:
    done = tmp_path / "done"
    with exclusive_file(done) as fd:
        os.write(fd, b"all")
    assert done.read_bytes() == b"all" and stat.S_IMODE(os.stat(done).st_mode) == 0o600
    with pytest.raises(FileExistsError), exclusive_file(done):
        pass  # never overwrites
    assert done.read_bytes() == b"all"
    partial = tmp_path / "partial"
    with pytest.raises(ValueError), exclusive_file(partial) as fd:
        os.write(fd, b"half")
        raise ValueError("digest mismatch")
    assert not partial.exists()
