"""`max_layer_bytes` enforced by the kernel as a run writes (issue 17 item 6): a run's upper lives on a
size- and inode-limited filesystem (upperfs), a commit copies it into the store, a run that reaches the
limit fails with nothing committed and nothing left on the host."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import struct
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from contree import api
from contree.engine.local import EngineLimits, LocalEngine
from contree.engine.runtime.limits import MIB, ResourceSettings
from contree.engine.storage import upperfs
from contree.engine.storage.overlay import mount_overlay, mounts_under, unmount
from contree.engine.storage.store import ImageRecord, LayerTooLarge, Store
from tests.contract.conftest import result_of, run, seed_busybox, stdout_of
from tests.engine.test_store import _simple_image, _view

pytestmark = pytest.mark.engine


# ---- the limit a run gets ----


def test_a_runs_layer_limit_leaves_its_processes_room_in_its_memory() -> None:
    assert upperfs.limit_for(1_000_000, 512 * MIB) == (1_000_000, "max_layer_bytes=1000000")
    limit, text = upperfs.limit_for(api.DEFAULT_MAX_LAYER_BYTES, 512 * MIB)
    assert limit == 448 * MIB  # 1/8 kept for the processes
    assert text.startswith(f"max_layer_bytes={448 * MIB} (of {api.DEFAULT_MAX_LAYER_BYTES} asked")
    assert upperfs.limit_for(1 << 30, 64 * MIB)[0] == 48 * MIB  # at least 16 MiB kept
    assert upperfs.limit_for(1 << 30, 16 * MIB)[0] == 1  # nothing left to store
    assert upperfs.limit_for(1 << 30, None, 256 * MIB)[0] == 256 * MIB  # no memory limit: the engine's cap
    assert upperfs.limit_for(1 << 30, None, None) == (1 << 30, "max_layer_bytes=1073741824")


# ---- the commit of an upper that lives on its own filesystem ----


def _upper_on_upperfs(store: Store, image: ImageRecord, budget: upperfs.LayerBudget,
                      change: Any) -> tuple[Path, Path]:
    """(sandbox dir with the layer filesystem still mounted, its upper) after `change(merged)`."""
    box = store.sandboxes_dir / uuid.uuid4().hex
    box.mkdir()
    upperfs.mount(box, budget)
    mount_overlay(store.layer_paths(image), box / "upper", box / "work", box / "rootfs")
    upperfs.seal(box, budget)
    try:
        change(box / "rootfs")
    finally:
        unmount(box / "rootfs")
    return box, box / "upper"


def _snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a layer holds, per path: type/mode, owner, size, mtime, device, link target, content
    digest, xattrs (minus overlay bookkeeping) and the other names of the same inode."""
    out: dict[str, tuple[Any, ...]] = {}
    names: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["", *dirnames, *filenames] if dirpath == os.fspath(root) else [*dirnames, *filenames]:
            path = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            xattrs = {x: os.getxattr(path, x, follow_symlinks=False)
                      for x in os.listxattr(path, follow_symlinks=False)
                      if not x.startswith("trusted.overlay.") or x == "trusted.overlay.opaque"}
            content: Any = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                names.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            mtime = None if rel == "." else st.st_mtime_ns  # the root is the layer dir itself
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, size, mtime, st.st_rdev, content,
                        sorted(xattrs.items()), (st.st_dev, st.st_ino))
    for rel, entry in out.items():  # inode numbers differ between filesystems; the groups must not
        out[rel] = (*entry[:-1], sorted(names.get(entry[-1], [rel])))
    return out


def _capability_xattr() -> bytes:
    """A VFS_CAP_REVISION_2 blob granting CAP_NET_BIND_SERVICE (bit 10), effective."""
    return struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


def test_a_commit_copies_every_kind_of_entry_exactly(store: Store, tmp_path: Path) -> None:
    base = _simple_image(store, {"del": "d", "dir1/old": "o", "dir2/b": "b", "dir3/c": "c", "keep": "k",
                                 "mod": "m", "owned": "o"})

    def change(root: Path) -> None:
        (root / "del").unlink()
        for p in (root / "dir1").iterdir():
            p.unlink()
        (root / "dir1").rmdir()
        (root / "dir1").mkdir()  # opaque
        (root / "dir1" / "new").write_text("n")
        os.rename(root / "dir3" / "c", root / "dir3" / "moved")
        (root / "mod").chmod(0o4750)
        os.chown(root / "owned", 1234, 5678)
        os.symlink("mod", root / "link")
        (root / "hard1").write_text("shared inode")
        os.link(root / "hard1", root / "hard2")
        with open(root / "sparse", "wb") as f:
            f.seek(50 << 20)
            f.write(b"end")
        os.mkfifo(root / "fifo")
        os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        (root / "nested" / "a" / "b").mkdir(parents=True)
        (root / "nested" / "a" / "b" / "f").write_bytes(b"0123456789" * 7000)
        os.setxattr(root / "keep", "user.note", b"kept")
        (root / "capped").write_bytes(b"\x7fELF")
        os.setxattr(root / "capped", "security.capability", _capability_xattr())
        os.utime(root / "nested" / "a", ns=(1_000_000_000, 1_500_000_000_123))
        os.utime(root / "link", ns=(2_000_000_000, 2_000_000_456), follow_symlinks=False)

    box, upper = _upper_on_upperfs(store, base, upperfs.LayerBudget.for_limit(64 * MIB), change)
    try:
        (box / "work").rename(box / "work-gone")  # what the engine does before a commit
        before = _snapshot(upper)
        child = store.commit_upper(upper, base, "op-copy", max_layer_bytes=64 * MIB)
        assert child is not None
        layer = store.layer_path(child.layers[0])
        assert _snapshot(layer) == before
        assert os.lstat(layer / "sparse").st_blocks * 512 <= 64 * 1024  # holes stay holes
        assert os.lstat(layer / "hard1").st_ino == os.lstat(layer / "hard2").st_ino
        assert child.size == sum(os.lstat(layer / n).st_size for n in ("mod", "owned", "link", "hard1",
                                                                     "sparse", "nested/a/b/f", "capped",
                                                                     "keep", "dir1/new", "dir3/moved"))
        view = _view(store, child, tmp_path)
        assert "del" not in view and "dir3/c" not in view and view["dir3/moved"][2] == "c"
        assert {k for k in view if k.startswith("dir1/")} == {"dir1/new"}
        assert view["mod"] == ("f", 0o4750, "m") and view["link"] == ("l", 0o777, "mod")
        assert not any(p.name.startswith("commit-") for p in store.tmp_dir.iterdir())
    finally:
        unmount(box)


def test_a_commit_above_the_limit_writes_nothing(store: Store) -> None:
    base = _simple_image(store, {"f": "x"})

    def change(root: Path) -> None:  # 700 KiB of data and 100 directories (4 KiB each in the store)
        (root / "data").write_bytes(b"\1" * 700 * 1024)
        for i in range(100):
            (root / f"d{i}").mkdir()

    limit = 1 << 20
    box, upper = _upper_on_upperfs(store, base, upperfs.LayerBudget.for_limit(limit), change)
    try:
        budget = upperfs.LayerBudget.for_limit(limit)
        assert upperfs.over_limit(upperfs.usage(box, budget), budget, limit) is None
        layers_before = set(store.layers_dir.iterdir())
        with pytest.raises(LayerTooLarge, match=r"above max_layer_bytes=1048576") as info:
            store.commit_upper(upper, base, None, max_layer_bytes=limit)
        assert info.value.status == 422
        assert set(store.layers_dir.iterdir()) == layers_before and len(store.list()) == 1
        assert list(store.tmp_dir.iterdir()) == []
    finally:
        unmount(box)


def test_the_kernel_refuses_data_and_entries_beyond_the_budget(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.mkdir()
    budget = upperfs.LayerBudget.for_limit(1_000_000)
    upperfs.mount(box, budget)
    upperfs.seal(box, budget)
    try:
        with pytest.raises(OSError, match="No space left"), open(box / "upper" / "big", "wb") as f:
            for _ in range(300):
                f.write(b"\0" * 4096)
                f.flush()
        used = upperfs.usage(box, budget)
        assert used.bytes_full and used.bytes <= 1_000_000 + 4096
        (box / "upper" / "big").unlink()
        made = 0
        with pytest.raises(OSError, match="No space left"):
            for made in range(10_000):
                (box / "upper" / f"d{made}").mkdir()
        used = upperfs.usage(box, budget)
        assert used.entries_full and made == budget.max_entries  # d0 … d243 made; "big"'s inode was freed
        assert "entries" in (upperfs.over_limit(used, budget, 1_000_000) or "")
    finally:
        unmount(box)


# ---- runs on the engine ----


@pytest.fixture
async def engine(mount_guard: Path, busybox_rootfs: Path) -> AsyncIterator[LocalEngine]:
    eng = LocalEngine(mount_guard / "home", limits=EngineLimits(resources=ResourceSettings(
        memory_bytes=512 * MIB, max_memory_bytes=1024 * MIB)))
    await eng.start()
    try:
        seed_busybox(eng, busybox_rootfs)
        yield eng
    finally:
        await eng.close()


class _Watch:
    """Polls, from the host, what a running sandbox's layer holds and what the engine home holds."""

    def __init__(self, engine: LocalEngine, limit: int) -> None:
        assert engine.store is not None
        self.limit = limit
        self.store = engine.store
        self.home_blocks = _blocks(engine.home)
        self.peak_bytes = self.peak_entries = self.peak_home_growth = 0
        # Two loops: the walk of the home can take long on a loaded machine, and the layer's peak lasts
        # only until the engine sees it full (LAYER_POLL) and ends the run.
        self._tasks = [asyncio.create_task(self._poll_layers()), asyncio.create_task(self._poll_home())]

    async def _poll_layers(self) -> None:
        while True:
            for box in self.store.sandboxes_dir.iterdir():
                if box.name.startswith("."):
                    continue
                try:
                    used = upperfs.usage(box, upperfs.LayerBudget.for_limit(self.limit))
                except OSError:
                    continue
                if used.bytes or used.entries:  # a layer filesystem, not a bare scratch dir
                    self.peak_bytes = max(self.peak_bytes, used.bytes)
                    self.peak_entries = max(self.peak_entries, used.entries)
            await asyncio.sleep(0.01)

    async def _poll_home(self) -> None:
        while True:
            growth = await asyncio.to_thread(_blocks, self.store.home)
            self.peak_home_growth = max(self.peak_home_growth, growth - self.home_blocks)
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()


def _blocks(root: Path) -> int:
    """Bytes allocated below `root` on its own filesystem (sandbox mounts are not followed)."""
    total = 0
    dev = os.lstat(root).st_dev
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if st.st_dev == dev:
                total += st.st_blocks * 512
        dirnames[:] = [d for d in dirnames if os.lstat(os.path.join(dirpath, d)).st_dev == dev]
    return total


async def _nothing_left(engine: LocalEngine) -> None:
    await engine.drain()  # the sandbox teardown follows the completion event
    assert engine.store is not None
    assert [p for p in engine.store.sandboxes_dir.iterdir() if not p.name.startswith(".spare-")] == []
    assert mounts_under(engine.home) == []


async def test_120000_mkdirs_under_a_small_limit_stop_at_it(engine: LocalEngine) -> None:
    image = await engine.resolve_tag("busybox:latest")
    layers = len(engine.store.list()) if engine.store else 0
    watch = _Watch(engine, 1_000_000)
    try:
        script = ("i=0; while [ $i -lt 120000 ]; do mkdir /d$i 2>/dev/null || break; i=$((i+1)); done; "
                  "echo made=$i")
        done = await run(engine, image, script, disposable=False, timeout=120,
                         resources_limits=api.InstanceResourcesLimits(max_layer_bytes=1_000_000))
    finally:
        watch.stop()
    made = int(stdout_of(done).strip().removeprefix("made="))
    budget = upperfs.LayerBudget.for_limit(1_000_000)
    assert made == budget.max_entries  # 244: one entry per 4 KiB of the limit
    assert done.status == "FAILED" and done.result_image_uuid is None
    assert "max_layer_bytes=1000000" in (done.error or "") and "entries" in (done.error or "")
    assert watch.peak_entries <= budget.max_entries and watch.peak_bytes <= 64 * 1024
    assert watch.peak_home_growth <= 256 * 1024, watch.peak_home_growth  # the event log, not the layer
    assert engine.store is not None and len(engine.store.list()) == layers
    await _nothing_left(engine)


async def test_a_big_write_under_a_100_mb_limit_stops_at_the_limit(engine: LocalEngine) -> None:
    image = await engine.resolve_tag("busybox:latest")
    watch = _Watch(engine, 100_000_000)
    try:
        # Once the layer is full the engine ends the run (it fails either way) instead of its sleep.
        done = await run(engine, image, "head -c 1000m /dev/zero > /big; sleep 600",
                         disposable=False, timeout=120,
                         resources_limits=api.InstanceResourcesLimits(max_layer_bytes=100_000_000))
    finally:
        watch.stop()
    assert done.status == "FAILED" and done.result_image_uuid is None
    assert "max_layer_bytes=100000000" in (done.error or "") and "ENOSPC" in (done.error or "")
    assert done.duration is not None and done.duration < 60  # stopped once full, not at its timeout
    assert 99_000_000 <= watch.peak_bytes <= 100_000_000 + 4096
    assert watch.peak_home_growth <= 256 * 1024, watch.peak_home_growth
    await _nothing_left(engine)


async def test_a_run_within_the_limit_commits_and_reports_the_limit(engine: LocalEngine) -> None:
    image = await engine.resolve_tag("busybox:latest")
    asked = api.InstanceResourcesLimits(max_layer_bytes=10_000_000)
    done = await run(engine, image, "head -c 5000000 /dev/urandom > /data; mkdir -p /a/b/c; echo ok",
                     disposable=False, resources_limits=asked)
    assert done.status == "SUCCESS" and done.result_image_uuid, done.error
    assert result_of(done).limits is not None and result_of(done).limits.max_layer_bytes == 10_000_000  # type: ignore[union-attr]
    check = await run(engine, done.result_image_uuid, "wc -c < /data; ls -d /a/b/c", disposable=True)
    assert stdout_of(check) == "5000000\n/a/b/c\n"
    await _nothing_left(engine)


async def test_the_layer_limit_leaves_the_runs_processes_room_in_its_memory(engine: LocalEngine) -> None:
    """A run's changes are memory charged to its cgroup: a writer that runs out of layer meets ENOSPC
    and a clear error, not the OOM killer."""
    image = await engine.resolve_tag("busybox:latest")
    asked = api.InstanceResourcesLimits(memory_bytes=128 * MIB, max_layer_bytes=1 << 30)
    done = await run(engine, image, "head -c 200m /dev/zero > /f; sleep 600", disposable=True,
                     resources_limits=asked, timeout=120)
    result = result_of(done)
    assert result.limits is not None and result.limits.max_layer_bytes == 112 * MIB
    assert result.state is not None and not result.state.oom_killed
    assert done.status == "FAILED" and "max_layer_bytes=117440512 (of 1073741824 asked" in (done.error or "")
    assert "memory limit, 134217728" in (done.error or "")
    plain = await run(engine, image, "true", disposable=True)
    assert result_of(plain).limits.max_layer_bytes == 448 * MIB  # type: ignore[union-attr]


async def test_injected_files_beyond_the_limit_fail_the_spawn_clearly(engine: LocalEngine) -> None:
    image = await engine.resolve_tag("busybox:latest")
    uploaded = await engine.upload_file(b"x" * 200_000)
    done = await run(engine, image, "true", disposable=False,
                     files={"/big": api.InjectedFile(uuid=uploaded.uuid)},
                     resources_limits=api.InstanceResourcesLimits(max_layer_bytes=100_000))
    assert done.status == "FAILED"
    assert "do not fit in max_layer_bytes=100000" in (done.error or "")
    await _nothing_left(engine)
