"""The engine's own subordinate id range (issue 17, item 10), on a scratch /etc."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from contree.engine.runtime import subids
from contree.engine.runtime.subids import NAME, SubidError, engine_range


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """An /etc with useradd's login.defs settings, two accounts and empty subordinate id files."""
    (tmp_path / "login.defs").write_text("SUB_UID_MIN\t100000\nSUB_UID_MAX\t600100000\n"
                                         "SUB_GID_MIN\t100000\nSUB_GID_MAX\t600100000\n")
    (tmp_path / "passwd").write_text("root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n")
    (tmp_path / "group").write_text("root:x:0:\nalice:x:1000:\n")
    for name in ("subuid", "subgid"):
        (tmp_path / name).write_text("")
        (tmp_path / name).chmod(0o644)
    return tmp_path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_first_start_allocates_the_lowest_free_range_in_both_files(etc: Path) -> None:
    (etc / "subuid").write_text("alice:100000:65536\n")
    (etc / "subgid").write_text("alice:100000:65536\n")
    got = engine_range(allocate=True, etc=etc)
    assert got == subids.IdRange(165536, 165536, 65536)
    for name in ("subuid", "subgid"):
        assert _lines(etc / name) == ["alice:100000:65536", f"{NAME}:165536:65536"]
        assert (etc / name).stat().st_mode & 0o777 == 0o644  # the file's own mode is kept
    assert engine_range(allocate=False, etc=etc) == got  # found again, nothing added
    assert not list(etc.glob("sub*.lock")) and not list(etc.glob(".subuid.*"))


def test_allocation_skips_ranges_of_either_file_and_account_ids(etc: Path) -> None:
    (etc / "subuid").write_text("a:100000:65536\nb:300000:10\n")
    (etc / "subgid").write_text("a:165536:65536\n")
    with open(etc / "passwd", "a") as fh:
        fh.write("ldapish:x:231072:231072::/:/bin/sh\n")  # an account id inside the next gap
    got = engine_range(allocate=True, etc=etc)
    assert got.uid == got.gid == 231073
    assert got.uid >= 300010 or got.uid + got.size <= 300000


def test_a_missing_range_without_root_names_the_fix(etc: Path) -> None:
    with pytest.raises(SubidError, match="make install-system"):
        engine_range(allocate=False, etc=etc)


def test_an_overlapping_range_is_refused_with_the_fix_named(etc: Path) -> None:
    (etc / "subuid").write_text(f"{NAME}:100000:65536\nuser:100000:65536\n")
    (etc / "subgid").write_text(f"{NAME}:100000:65536\n")
    with pytest.raises(SubidError, match=r"shared with user:100000:65536.*remove its line from"):
        engine_range(etc=etc)


def test_an_explicit_base_inside_a_users_range_is_refused(etc: Path) -> None:
    (etc / "subuid").write_text("user:100000:65536\n")
    with pytest.raises(SubidError, match="shared with user:100000:65536"):
        subids.check_base(100000, 300000, etc=etc)
    subids.check_base(200000, 200000, etc=etc)


def test_a_too_small_entry_is_not_ours(etc: Path) -> None:
    (etc / "subuid").write_text(f"{NAME}:100000:1000\n")
    (etc / "subgid").write_text(f"{NAME}:100000:1000\n")
    got = engine_range(allocate=True, etc=etc)
    assert got.uid == got.gid == 101000


def test_concurrent_starts_allocate_one_range(etc: Path) -> None:
    results: list[subids.IdRange] = []
    threads = [threading.Thread(target=lambda: results.append(engine_range(allocate=True, etc=etc)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert [line for line in _lines(etc / "subuid") if line.startswith(NAME)] == [f"{NAME}:100000:65536"]


def test_useradds_lock_is_waited_for_and_a_dead_holders_is_broken(etc: Path) -> None:
    lock = etc / "subuid.lock"
    lock.write_text(str(os.getpid()))  # held by a live process (this one)
    timer = threading.Timer(0.3, lock.unlink)
    timer.start()
    engine_range(allocate=True, etc=etc)
    timer.join()
    (etc / "subuid").write_text("")
    (etc / "subgid").write_text("")
    lock.write_text("999999999")  # no such process: stale, as shadow's tools judge it
    assert engine_range(allocate=True, etc=etc).uid == 100000
    assert not lock.exists()


def test_malformed_lines_are_skipped() -> None:
    assert subids.parse("# c\nx:1:2\nbad\ny:a:b\nz:5:0\n") == [subids.Entry("x", 1, 2)]
