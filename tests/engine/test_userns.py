"""User namespaces: root in a sandbox is host uid BASE, layers keep container ids (RUNTIME §9)."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from contree import api
from contree.engine.local import LocalEngine
from contree.engine.runtime.sandbox import RuntimeConfig
from contree.engine.runtime.subids import engine_range
from contree.engine.runtime.userns import IdMap
from contree.engine.storage.overlay import mount_overlay, unmount
from contree.engine.storage.store import Store
from tests.contract.conftest import run, stderr_of, stdout_of, wait_done

pytestmark = pytest.mark.engine

BASE = 100000  # any range works for the tests without a sandbox


def _engine_base() -> int:
    """The host uid of a sandbox's root: the engine's own range (allocated on first use when missing)."""
    return engine_range().uid


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the user namespace tests need root (idmapped mounts, overlay)")


# ---------------------------------------------------------------- no sandbox


def test_shift_round_trip_keeps_modes_and_whiteouts(tmp_path: Path) -> None:
    _require_root()
    gid_base = BASE + 300000  # /etc/subgid may give the engine another range than /etc/subuid
    idmap = IdMap.create(BASE, gid_base=gid_base)
    try:
        lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
        for d in (lower, upper, work, merged):
            d.mkdir()
        mount_overlay([lower], upper, work, merged)
        try:
            (merged / "d").mkdir()
            (merged / "d" / "suid").write_text("x")
            os.chown(merged / "d" / "suid", 1000, 1001)
            os.chmod(merged / "d" / "suid", 0o4755)
            os.symlink("suid", merged / "d" / "link")
            os.lchown(merged / "d" / "link", 7, 8)
            assert idmap.shift_in(upper, merged) == 4  # upper root, d, suid, link
            st = os.lstat(merged / "d" / "suid")
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (BASE + 1000, gid_base + 1001, 0o4755)
            assert os.lstat(upper / "d" / "suid").st_uid == BASE + 1000  # on disk, not just cached
            assert os.lstat(merged / "d" / "link").st_uid == BASE + 7
            assert (os.lstat(merged).st_uid, os.lstat(merged).st_gid) == (BASE, gid_base)
        finally:
            unmount(merged)
        os.mknod(upper / "d" / "gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))  # a whiteout
        assert idmap.shift_out(upper) == 4
        st = os.lstat(upper / "d" / "suid")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1001, 0o4755)
        assert os.lstat(upper / "d" / "link").st_uid == 7
        assert os.lstat(upper / "d" / "gone").st_uid == 0 and os.lstat(upper).st_uid == 0
    finally:
        idmap.close()


def test_shift_out_keeps_file_capabilities_with_their_root_moved(tmp_path: Path) -> None:
    """`setcap` in a sandbox stores v3 capabilities naming the sandbox's root by host id (BASE); the
    commit's chown would drop them, and a layer must name its root as container id 0."""
    _require_root()
    idmap = IdMap.create(BASE)
    try:
        upper = tmp_path / "upper"
        upper.mkdir()
        tool = upper / "ping"
        tool.write_bytes(b"\x7fELF")
        os.lchown(tool, BASE, BASE)
        net_raw = 1 << 13
        v3 = b"".join(x.to_bytes(4, "little") for x in (0x03000001, net_raw, 0, 0, 0, BASE))
        os.setxattr(tool, "security.capability", v3)
        assert os.getxattr(tool, "security.capability") == v3
        idmap.shift_out(upper)
        assert (os.lstat(tool).st_uid, os.lstat(tool).st_gid) == (0, 0)
        caps = os.getxattr(tool, "security.capability")
        assert int.from_bytes(caps[4:8], "little") == net_raw
        # Root 0 is stored as v2 (20 bytes, no root id) by the kernel; a v3 one must name root 0.
        assert len(caps) == 20 or int.from_bytes(caps[20:24], "little") == 0, caps.hex()
    finally:
        idmap.close()


def test_idmapped_lowers_show_layer_owners_shifted(tmp_path: Path) -> None:
    _require_root()
    idmap = IdMap.create(BASE)
    try:
        lower = tmp_path / "lower"
        lower.mkdir()
        (lower / "f").write_text("x")
        os.chown(lower / "f", 1000, 1000)
        (lower / "far").write_text("x")
        os.chown(lower / "far", 70000, 70000)  # outside the mapped range
        merged, empty = tmp_path / "m", tmp_path / "empty"
        merged.mkdir()
        empty.mkdir()
        with idmap.lowers([lower, empty]) as views:
            mount_overlay(views, None, None, merged)
        try:
            assert os.lstat(merged / "f").st_uid == BASE + 1000
            assert os.lstat(merged / "far").st_uid == 65534  # the kernel's overflow id
        finally:
            unmount(merged)
        assert os.lstat(lower / "f").st_uid == 1000  # the layer itself is never changed
    finally:
        idmap.close()


def test_detection_refuses_a_filesystem_without_idmapped_mounts(mount_guard: Path) -> None:
    """The probe runs where the layers live: an overlay (no idmapped mounts on 6.x) is refused."""
    from contree.engine.runtime.userns import UsernsUnavailable

    lower, upper, work, merged = (mount_guard / n for n in ("l", "u", "w", "m"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    mount_overlay([lower], upper, work, merged)
    with pytest.raises(UsernsUnavailable, match="idmapped mounts unsupported"):
        IdMap.create(BASE, probe_dir=merged)
    IdMap.create(BASE, probe_dir=lower).close()


# ---------------------------------------------------------------- LocalEngine


@pytest.fixture
async def engine(tmp_path: Path, busybox_rootfs: Path) -> AsyncIterator[tuple[LocalEngine, str]]:
    """A LocalEngine with default settings, seeded with busybox plus /owned (uid 1000) and /etc/passwd
    naming uid 1000."""
    eng = LocalEngine(tmp_path / "home")
    await eng.start()
    try:
        store = eng.store
        assert store is not None
        yield eng, _seed_owned(store, busybox_rootfs)
    finally:
        await eng.close()


def _seed_owned(store: Store, busybox_rootfs: Path) -> str:
    stage = store.staging_dir("seed")
    layer = stage / "layer"
    shutil.copytree(busybox_rootfs, layer, symlinks=True)
    (layer / "owned").write_text("data\n")
    os.chown(layer / "owned", 1000, 1000)
    (layer / "home").mkdir(exist_ok=True)
    (layer / "home" / "u").mkdir()
    os.chown(layer / "home" / "u", 1000, 1000)
    with open(layer / "etc" / "passwd", "a") as f:
        f.write("u:x:1000:1000::/home/u:/bin/sh\n")
    return store.create_image_from_layer_dirs([layer], tag="busybox:latest").uuid


async def test_on_by_default(engine: tuple[LocalEngine, str]) -> None:
    eng, _ = engine
    assert eng.runtime is not None and eng.runtime.idmap is not None
    assert eng.runtime.idmap.base == _engine_base()


async def test_image_owner_seen_inside_and_through_inspect(engine: tuple[LocalEngine, str]) -> None:
    eng, image = engine
    resp = await run(eng, image, "id -u; ls -ln /owned | awk '{print $3, $4}'; stat -c %u /bin/busybox",
                     disposable=True)
    assert resp.status == "SUCCESS", resp
    assert stdout_of(resp) == "0\n1000 1000\n0\n"
    listing = await eng.list_directory(image, "/")
    owned = [f for f in listing.files if f.path.endswith("owned")]
    assert owned and (owned[0].uid, owned[0].gid) == (1000, 1000)


async def test_chown_commits_container_ids(engine: tuple[LocalEngine, str]) -> None:
    eng, image = engine
    resp = await run(eng, image, "chown 1234:1235 /owned && touch /new && mkdir -p /x/y && chown -R 5:6 /x")
    assert resp.status == "SUCCESS", stderr_of(resp)
    child = resp.result_image_uuid
    assert child and child != image
    listing = await eng.list_directory(child, "/")
    by_name = {f.path.rsplit("/", 1)[-1]: f for f in listing.files}
    assert (by_name["owned"].uid, by_name["owned"].gid) == (1234, 1235)
    assert (by_name["new"].uid, by_name["x"].uid) == (0, 5)
    store = eng.store
    assert store is not None
    top = store.layer_paths(store.get(child))[0]
    assert os.lstat(top / "owned").st_uid == 1234  # no host id ever reaches a layer
    assert os.lstat(top / "new").st_uid == 0
    assert os.lstat(top).st_uid == 0
    again = await run(eng, child, "stat -c %u:%g /owned /new /x/y", disposable=True)
    assert stdout_of(again) == "1234:1235\n0:0\n5:6\n"


async def test_process_and_upper_files_are_in_the_host_range(engine: tuple[LocalEngine, str]) -> None:
    eng, image = engine
    store = eng.store
    assert store is not None
    marker = "31.4159"
    spawned = await eng.spawn(api.InstanceSpawnRequest(
        command=f"touch /mine && su u -s /bin/sh -c 'touch /home/u/theirs' && exec sleep {marker}",
        shell=True, image=image, timeout=60))
    try:
        base = _engine_base()
        pid = await _find_process("sleep", marker)
        assert _uids(pid) == [base] * 4
        upper = store.sandboxes_dir / spawned.uuid / "upper"
        assert os.lstat(upper / "mine").st_uid == base
        assert os.lstat(upper / "home" / "u" / "theirs").st_uid == base + 1000
    finally:
        await eng.cancel_operation(spawned.uuid)
        await wait_done(eng, spawned.uuid)


def _uids(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid of a host process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no Uid line for pid {pid}")


def _scan(want: bytes) -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/cmdline").read_bytes() == want:
                    return int(entry)
            except OSError:
                continue
    return None


async def _find_process(name: str, arg: str, limit: float = 30) -> int:
    want = f"{name}\0{arg}\0".encode()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while loop.time() < deadline:
        pid = _scan(want)
        if pid is not None:
            return pid
        await asyncio.sleep(0.05)
    raise AssertionError(f"no process `{name} {arg}` appeared within {limit} s")


async def test_injected_files_belong_to_their_uid_inside(engine: tuple[LocalEngine, str]) -> None:
    eng, image = engine
    up = await eng.upload_file(b"hello\n")
    resp = await run(eng, image, "stat -c %u:%g /data/in && echo more >> /data/in && stat -c %u /data",
                     files={"/data/in": api.InjectedFile(uuid=up.uuid, uid=1000, gid=1000, mode="0600")},
                     uid=1000, gid=1000)
    assert resp.status == "SUCCESS", stderr_of(resp)
    assert stdout_of(resp) == "1000:1000\n0\n"
    child = resp.result_image_uuid
    assert child
    store = eng.store
    assert store is not None
    top = store.layer_paths(store.get(child))[0]
    st = os.lstat(top / "data" / "in")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (1000, 0o600)
    assert (top / "data" / "in").read_text() == "hello\nmore\n"


async def test_nested_user_namespace_still_refused(engine: tuple[LocalEngine, str]) -> None:
    eng, image = engine
    resp = await run(eng, image, "unshare -U id; echo rc=$?", disposable=True)
    assert "rc=1" in stdout_of(resp)
    assert "Operation not permitted" in stderr_of(resp)


async def test_opt_out_runs_as_host_root(tmp_path: Path, busybox_rootfs: Path) -> None:
    _require_root()
    eng = LocalEngine(tmp_path / "home", runtime_config=RuntimeConfig(
        state_dir=tmp_path / "home" / "runtime", userns=False))
    await eng.start()
    try:
        assert eng.runtime is not None and eng.runtime.idmap is None
        store = eng.store
        assert store is not None
        stage = store.staging_dir("seed")
        shutil.copytree(busybox_rootfs, stage / "layer", symlinks=True)
        image = store.create_image_from_layer_dirs([stage / "layer"], tag="busybox:latest")
        resp = await run(eng, image.uuid, "cat /proc/self/uid_map", disposable=True)
        assert stdout_of(resp).split() == ["0", "0", "4294967295"]
    finally:
        await eng.close()


async def test_a_store_written_without_userns_keeps_working_with_it(tmp_path: Path,
                                                                     busybox_rootfs: Path) -> None:
    """Layers always hold container ids, so switching userns on needs no migration (and back)."""
    _require_root()
    home = tmp_path / "home"
    off = LocalEngine(home, runtime_config=RuntimeConfig(state_dir=home / "runtime", userns=False))
    await off.start()
    try:
        assert off.store is not None
        image = _seed_owned(off.store, busybox_rootfs)
        resp = await run(off, image, "chown 1234 /owned")
        assert resp.status == "SUCCESS" and resp.result_image_uuid
        child = resp.result_image_uuid
    finally:
        await off.close()
    on = LocalEngine(home)
    await on.start()
    try:
        assert on.runtime is not None and on.runtime.idmap is not None
        resp = await run(on, child, "stat -c %u /owned && chown 4321 /owned && echo x >> /owned")
        assert resp.status == "SUCCESS" and stdout_of(resp) == "1234\n", stderr_of(resp)
        listing = await on.list_directory(resp.result_image_uuid or "", "/")
        assert [f.uid for f in listing.files if f.path.endswith("owned")] == [4321]
    finally:
        await on.close()


async def test_unsupported_host_falls_back_with_a_logged_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _require_root()
    from contree.engine.runtime import sandbox
    from contree.engine.runtime.userns import UsernsUnavailable

    def refuse(*_: object, **__: object) -> IdMap:
        raise UsernsUnavailable(1, "simulated: user.max_user_namespaces = 0")

    monkeypatch.setattr(sandbox.IdMap, "create", refuse)
    with pytest.raises(sandbox.NoRuntimeAvailable, match="simulated"):
        await sandbox.SandboxRuntime.create(RuntimeConfig(state_dir=tmp_path / "a", userns=True,
                                                          network_mode="none"))
    rt = await sandbox.SandboxRuntime.create(RuntimeConfig(state_dir=tmp_path / "b", network_mode="none"))
    try:
        assert rt.idmap is None
        assert "WITHOUT a user namespace" in caplog.text and "simulated" in caplog.text
    finally:
        await rt.close()
