"""The machine's shared engine service (README "A system service"): root runs the engine on a socket of
group `G`; a member's `contree-mcp` uses it instead of starting a rootless engine of its own, a
non-member's starts its own; the shared engine never reads a local archive for another user."""

from __future__ import annotations

import contextlib
import grp
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from contree.service.control import ControlConnection, ServiceGone, probe
from tests.rootless.test_user_install import run, session
from tests.rootless_env import RootlessUser
from tests.tools.conftest import server_command

pytestmark = pytest.mark.engine


class Shared:
    def __init__(self, base: Path, group: str) -> None:
        self.base = base
        self.group = group
        self.home = base / "engine"
        self.socket = base / "run" / "engine.sock"


@pytest.fixture
def shared_service() -> Iterator[Shared]:
    """`contree-mcp engine serve --socket … --socket-group G` as root, with busybox bootstrapped; the
    group, the service and its files are removed afterwards."""
    group = f"ctg{secrets.token_hex(3)}"
    subprocess.run(["groupadd", group], check=True, capture_output=True)
    base = Path(tempfile.mkdtemp(prefix="contree-shared-", dir="/var/tmp"))
    base.chmod(0o711)  # like /run/contree-engine: members traverse it, nobody lists it
    shared = Shared(base, group)
    try:
        boot = subprocess.run([*server_command(), "images", "bootstrap", "--home", str(shared.home), "--only",
                               "busybox"], capture_output=True, text=True, timeout=300, check=False)
        assert boot.returncode == 0, boot.stderr
        started = subprocess.run(
            [*server_command(), "engine", "serve", "--home", str(shared.home), "--socket", str(shared.socket),
             "--socket-group", group, "--idle-exit", "never", "--detach"],
            capture_output=True, text=True, timeout=180, check=False)
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip() == f"ready {shared.socket}"
        yield shared
    finally:
        with contextlib.suppress(ServiceGone), ControlConnection(shared.home, pin=True,
                                                                 socket=shared.socket) as conn:
            conn.stop("now")
            assert conn.wait_exit(60), "the shared service did not stop"
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run(["groupdel", group], check=False, capture_output=True)


@contextlib.contextmanager
def member(user: RootlessUser, group: str) -> Iterator[None]:
    subprocess.run(["gpasswd", "-a", user.name, group], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["gpasswd", "-d", user.name, group], check=False, capture_output=True)


def test_the_shared_socket_is_for_the_group_only(shared_service: Shared) -> None:
    st = os.stat(shared_service.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_uid == 0
    assert st.st_gid == grp.getgrnam(shared_service.group).gr_gid
    status = probe(shared_service.home, socket=shared_service.socket)
    assert status is not None and status.socket == str(shared_service.socket)


async def test_a_member_uses_the_shared_engine_and_a_non_member_its_own(rootless_user: RootlessUser,
                                                                        shared_service: Shared) -> None:
    env = {"CONTREE_ENGINE_SYSTEM_SOCKET": str(shared_service.socket)}
    own_socket = rootless_user.engine_home / "engine.sock"
    with member(rootless_user, shared_service.group):
        if own_socket.exists():  # an earlier test started the user's rootless engine: not this one
            with ControlConnection(rootless_user.engine_home, pin=True) as conn:
                conn.stop("now")
                conn.wait_exit(60)
        async with session(rootless_user, env=env, groups=True) as s:
            r = await run(s, "cat /proc/self/uid_map")
            # Root mode's ids: the engine's own range, not the user's subordinate ids.
            start, _ = rootless_user.subordinate("subuid")
            assert r["exit_code"] == 0 and str(start) not in r["stdout"], r
            status = probe(shared_service.home, socket=shared_service.socket)
            assert status is not None and status.clients, "the member's server is a client of the shared one"
            archive = rootless_user.home / "image.tar"
            archive.write_bytes(b"not even a tar")
            os.chown(archive, rootless_user.uid, rootless_user.gid)
            refused = await s.call_tool("import_image", {
                "registry_url": f"oci-archive:{archive}",
                "i_accept_that_anonymous_access_might_be_rate_limited": True})
            text = refused.content[0].text
            assert "outside the directories allowed" in text and "SUCCESS" not in text, text
        assert not own_socket.exists(), "no rootless engine was started for the member"
    # Not a member (no supplementary groups): the user's own rootless engine.
    rootless_user.cli("images", "bootstrap", "--only", "busybox")
    async with session(rootless_user, env=env) as s:
        r = await run(s, "echo own")
        assert r["stdout"] == "own\n"
    assert own_socket.exists()
    own = probe(rootless_user.engine_home)
    assert own is not None and own.home == str(rootless_user.engine_home)


def test_a_second_service_cannot_take_the_shared_socket(shared_service: Shared) -> None:
    other = shared_service.base / "other-home"
    res = subprocess.run(
        [*server_command(), "engine", "serve", "--home", str(other), "--socket", str(shared_service.socket),
         "--detach"], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 3 and "another engine service listens on" in res.stdout, res
    assert probe(shared_service.home, socket=shared_service.socket) is not None  # still the first one


def test_the_systemd_unit_is_valid_and_runs_the_shared_service(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze not found: install the Debian package systemd")
    unit = (Path(__file__).resolve().parents[2] / "packaging" / "systemd" / "contree-engine.service"
            ).read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert "--socket /run/contree-engine/engine.sock" in unit and "--socket-group contree" in unit
    assert "--idle-exit never" in unit and "KillMode=mixed" in unit
    local = tmp_path / "contree-engine.service"
    local.write_text(unit.replace("/usr/local/bin/contree-mcp", server_command()[0]))
    res = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert exec_start.startswith("ExecStart=/usr/local/bin/contree-mcp engine serve ")
