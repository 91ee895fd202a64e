"""The host boundary around sandboxes (issue 17): what the host's other users can reach of the engine.

Each test is one of the red team's reproductions, run as a throwaway local user made with `useradd`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from contree import api
from contree.engine.local import LocalEngine
from contree.engine.runtime.sandbox import NoRuntimeAvailable, RuntimeConfig
from contree.engine.storage.home import UnsafeHome, prepare_home
from contree.engine.storage.overlay import _unescape
from tests.contract.conftest import run, stderr_of, stdout_of, wait_done
from tests.engine.conftest import LocalUser, require_root
from tests.engine.test_userns import _find_process, _uids

pytestmark = pytest.mark.engine


@pytest.fixture
def open_parent() -> Iterator[Path]:
    """A directory every local user may traverse (like /var/lib or /srv), removed at teardown."""
    require_root()
    parent = Path(tempfile.mkdtemp(prefix="contree-boundary-"))
    parent.chmod(0o755)
    try:
        yield parent
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
async def engine(open_parent: Path, busybox_rootfs: Path) -> AsyncIterator[tuple[LocalEngine, str]]:
    """An engine whose home is in `open_parent`, seeded with busybox plus the host's own `cat` (a binary
    that runs on the host, as `cp /bin/cat` in a Debian image would give)."""
    eng = LocalEngine(open_parent / "home")
    await eng.start()
    try:
        store = eng.store
        assert store is not None
        stage = store.staging_dir("seed")
        shutil.copytree(busybox_rootfs, stage / "layer", symlinks=True)
        shutil.copy2("/bin/cat", stage / "layer" / "hostcat")
        yield eng, store.create_image_from_layer_dirs([stage / "layer"], tag="busybox:latest").uuid
    finally:
        await eng.close()


def _mount_options(point: Path) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if _unescape(fields[4]) == os.fspath(point):
                return fields[5].split(",")
    raise AssertionError(f"{point} is not mounted")


async def test_no_local_user_reaches_a_setuid_file_or_any_content_of_a_layer(
        engine: tuple[LocalEngine, str], open_parent: Path, throwaway_user: LocalUser) -> None:
    """A `disposable=false` run makes `/x` a setuid-root copy of cat; neither the committed layer nor a
    running sandbox of it (rootfs bind, bundle, runtime state) lets another user run or read anything."""
    eng, image = engine
    assert eng.store is not None and eng.runtime is not None
    secret = open_parent / "root-only"
    secret.write_text("root's secret\n")
    secret.chmod(0o600)
    marker = f"marker-{secrets.token_hex(6)}"
    made = await run(eng, image, f"cp /hostcat /x && chmod 4755 /x && echo {marker} > /{marker}")
    assert made.status == "SUCCESS" and made.result_image_uuid, stderr_of(made)
    layer = eng.store.layer_paths(eng.store.get(made.result_image_uuid))[0]
    st = os.stat(layer / "x")
    assert st.st_uid == 0 and st.st_mode & stat.S_ISUID, "the run did not make a setuid-root file"

    env_secret = f"env-{secrets.token_hex(6)}"
    sleeper = await eng.spawn(api.InstanceSpawnRequest(
        command="exec sleep 47.5", shell=True, image=made.result_image_uuid, timeout=60,
        env={"TOKEN": env_secret}))
    try:
        await _find_process("sleep", "47.5")
        rt = eng.runtime
        bind = rt.rootfs_binds / sleeper.uuid
        merged = eng.store.sandboxes_dir / sleeper.uuid / "rootfs"
        assert (bind / "x").exists() and (merged / "x").exists()
        places = [eng.home, rt.rootfs_binds, rt.bundles, rt.root_dir]
        setuid_copies = (layer / "x", bind / "x", merged / "x")
        attack = "\n".join([
            *(f'"{x}" "{secret}" 2>/dev/null && echo "RAN {x}"' for x in setuid_copies),
            f"find {' '.join(map(str, places))} \\( -perm -4000 -o -name {marker} \\) -print 2>/dev/null",
            f"grep -rl {env_secret} {' '.join(map(str, places))} 2>/dev/null",
            f"cat {eng.home}/images.db {eng.home}/operations.db >/dev/null 2>&1 && echo 'READ the databases'",
            "true",
        ])
        seen = throwaway_user.run(attack)
        assert seen.returncode == 0, seen.stderr
        assert seen.stdout == "", f"{throwaway_user.name} reached the engine's files:\n{seen.stdout}"
        for view in (bind, merged):  # and root's own views of a sandbox's tree never honour setuid
            assert {"nosuid", "nodev"} <= set(_mount_options(view)), view
    finally:
        await eng.cancel_operation(sleeper.uuid)
        await wait_done(eng, sleeper.uuid)


def test_home_is_created_owner_only(open_parent: Path) -> None:
    home = open_parent / "a" / "home"
    assert prepare_home(home) == []
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


async def test_a_home_made_readable_by_an_earlier_version_is_repaired(
        open_parent: Path, busybox_rootfs: Path, caplog: pytest.LogCaptureFixture) -> None:
    home = open_parent / "home"
    eng = LocalEngine(home)
    await eng.start()
    await eng.close()
    lax = [home, home / "layers", home / "blobs", home / "blobs" / "sha256", home / "operations"]
    for d in lax:
        d.chmod(0o755)
    for f in (home / "images.db", home / "operations.db", home / "blobs" / "files.db"):
        f.chmod(0o644)
    eng = LocalEngine(home)
    await eng.start()
    try:
        assert "made it owner-only" in caplog.text
        for d in lax:
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        for f in home.rglob("*.db*"):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    finally:
        await eng.close()


def test_a_home_of_another_user_is_refused(open_parent: Path, throwaway_user: LocalUser) -> None:
    home = open_parent / "theirs"
    home.mkdir(mode=0o700)
    os.chown(home, throwaway_user.uid, throwaway_user.gid)
    with pytest.raises(UnsafeHome, match=f"belongs to uid {throwaway_user.uid}.*chown"):
        prepare_home(home)


def test_a_home_below_a_directory_others_can_write_is_refused(open_parent: Path) -> None:
    shared = open_parent / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # not sticky: anyone could rename the home away and put their own there
    with pytest.raises(UnsafeHome, match=f"chmod go-w {shared}"):
        prepare_home(shared / "home")
    shared.chmod(0o1777)  # like /tmp: only the owner of an entry may rename it
    prepare_home(shared / "home")


async def test_a_users_default_subordinate_ids_cannot_reach_a_sandboxs_processes(
        engine: tuple[LocalEngine, str], throwaway_user: LocalUser) -> None:
    """`useradd` delegates a range of host ids to every new user; through newuidmap the user becomes
    those ids. The sandboxes' ids must not be among them: `kill -0` on a sandbox's process fails."""
    eng, image = engine
    uids, gids = throwaway_user.subid_range("/etc/subuid"), throwaway_user.subid_range("/etc/subgid")
    as_their_root = (f"unshare --map-users={uids[0]},0,{uids[1]} --map-groups={gids[0]},0,{gids[1]} "
                     "--setuid 0 --setgid 0 --")
    sleeper = await eng.spawn(api.InstanceSpawnRequest(command="exec sleep 48.25", shell=True, image=image,
                                                       timeout=60))
    try:
        pid = await _find_process("sleep", "48.25")
        sandbox_root = _uids(pid)[0]
        works = throwaway_user.run(f"{as_their_root} id -u")
        assert works.stdout == "0\n", f"the attack itself does not work here: {works.stderr}"
        attack = throwaway_user.run(f"{as_their_root} kill -0 {pid}")
        assert attack.returncode != 0 and "not permitted" in attack.stderr, (
            f"{throwaway_user.name} (host ids {uids[0]}+{uids[1]}) signalled a sandbox process of host "
            f"uid {sandbox_root}")
        assert not uids[0] <= sandbox_root < uids[0] + uids[1]
    finally:
        await eng.cancel_operation(sleeper.uuid)
        await wait_done(eng, sleeper.uuid)


async def test_start_refuses_a_range_that_a_user_holds(open_parent: Path, throwaway_user: LocalUser) -> None:
    start, _ = throwaway_user.subid_range("/etc/subuid")
    home = open_parent / "home"
    eng = LocalEngine(home, runtime_config=RuntimeConfig(state_dir=home / "runtime", userns_base=start,
                                                         network_mode="none"))
    with pytest.raises(NoRuntimeAvailable, match=f"shared with {throwaway_user.name}:{start}:"):
        await eng.start()


@pytest.mark.parametrize("userns", [None, False], ids=["userns", "no-userns"])
async def test_a_sandboxs_mountinfo_shows_no_host_path(open_parent: Path, busybox_rootfs: Path,
                                                      userns: bool | None) -> None:
    """Overlay names its layers in mountinfo as they were given, and binds show their source's path
    inside its filesystem: neither may tell a sandbox where the engine home or its bundle is."""
    home = open_parent / "home"
    eng = LocalEngine(home, runtime_config=RuntimeConfig(state_dir=home / "runtime", userns=userns))
    await eng.start()
    try:
        assert eng.store is not None and eng.runtime is not None
        stage = eng.store.staging_dir("seed")
        shutil.copytree(busybox_rootfs, stage / "layer", symlinks=True)
        image = eng.store.create_image_from_layer_dirs([stage / "layer"]).uuid
        done = await run(eng, image, "cat /proc/self/mountinfo", disposable=True)
        mountinfo = stdout_of(done)
        assert " / / " in mountinfo and "/etc/hosts" in mountinfo, mountinfo
        for host_path in (str(home), str(open_parent), "/run/contree-engine", eng.runtime.engine_id):
            shown = [line for line in mountinfo.splitlines() if host_path in line]
            assert not shown, f"{host_path} is visible inside the sandbox:\n" + "\n".join(shown)
    finally:
        await eng.close()
