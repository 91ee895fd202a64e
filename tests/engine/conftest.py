"""Shared fixtures for the embedded-engine tests (root, overlayfs, a busybox rootfs)."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from contree.engine.runtime.sandbox import SandboxRuntime
from contree.engine.storage.bootstrap import build_busybox_rootfs
from contree.engine.storage.overlay import mount_overlay, mounts_under, unmount
from contree.engine.storage.store import ImageConfig, ImageRecord, Store


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


@pytest.fixture
async def runtime(mount_guard: Path) -> AsyncIterator[SandboxRuntime]:
    """A sandbox runtime without networking (test_network overrides it with NAT); checked for leftovers."""
    from tests.engine.test_runtime_support import open_runtime  # that module imports this one

    async with open_runtime(mount_guard, network_mode="none") as rt:
        yield rt


@pytest.fixture
def rootfs(busybox_rootfs: Path, mount_guard: Path) -> Path:
    """A writable overlay over the busybox tree, prepared for the runtime's user namespace."""
    from tests.engine.test_runtime_support import overlay_rootfs

    return overlay_rootfs(busybox_rootfs, mount_guard)


@pytest.fixture
def store(mount_guard: Path) -> Iterator[Store]:
    """An empty store under `tmp_path/home` (closed and unmounted at teardown)."""
    s = Store(mount_guard / "home")
    yield s
    s.close()


@pytest.fixture
def busybox_image(store: Store, busybox_rootfs: Path) -> ImageRecord:
    """`busybox:latest` in the `store` fixture, built from the session's busybox rootfs."""
    stage = store.staging_dir("busybox")
    subprocess.run(["cp", "-a", f"{busybox_rootfs}/.", str(stage)], check=True)
    return store.create_image_from_layer_dir(stage, tag="busybox:latest",
                                             config=ImageConfig(env=["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]))


Mutation = Callable[[Path], object]


@pytest.fixture
def mutate() -> Callable[[Store, ImageRecord, Mutation], Path]:
    """Mount `image` with a fresh upper in the store's sandbox area, apply `fn(merged_root)` as root,
    unmount, delete work/ and return the upper dir (ready for `Store.commit_upper`)."""

    def run(store: Store, image: ImageRecord, fn: Mutation) -> Path:
        box = store.sandboxes_dir / uuid.uuid4().hex
        upper, work, merged = box / "upper", box / "work", box / "rootfs"
        for d in (upper, work, merged):
            d.mkdir(parents=True)
        mount_overlay(store.layer_paths(image), upper, work, merged)
        try:
            fn(merged)
        finally:
            unmount(merged)
        shutil.rmtree(work)
        return upper

    return run


@dataclass(frozen=True)
class LocalUser:
    """A throwaway unprivileged account made with `useradd` (so it also got useradd's default
    subordinate id ranges in /etc/subuid and /etc/subgid)."""
    name: str
    uid: int
    gid: int

    def run(self, script: str, *, timeout: float = 60, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        """`sh -c script` as this user (no supplementary groups), from `/`."""
        return subprocess.run(["/bin/sh", "-c", script], user=self.uid, group=self.gid, extra_groups=[],
                              cwd="/", env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **(env or {})},
                              capture_output=True, text=True, timeout=timeout, check=False)

    def subid_range(self, path: str) -> tuple[int, int]:
        """(start, count) of this user's entry in /etc/subuid or /etc/subgid."""
        for line in Path(path).read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == self.name:
                start, _, count = rest.partition(":")
                return int(start), int(count)
        raise AssertionError(f"useradd gave {self.name} no range in {path}")


@pytest.fixture
def throwaway_user() -> Iterator[LocalUser]:
    """A fresh local user, removed (with its subordinate ids) at teardown even when the test failed."""
    require_root()
    useradd = require_binary("useradd", "passwd")
    userdel = require_binary("userdel", "passwd")
    name = f"ctt{secrets.token_hex(4)}"
    subprocess.run([useradd, "--no-create-home", "--shell", "/bin/sh", name], check=True, capture_output=True)
    try:
        pw = pwd.getpwnam(name)
        yield LocalUser(name=name, uid=pw.pw_uid, gid=pw.pw_gid)
    finally:
        subprocess.run([userdel, "--force", name], check=False, capture_output=True)
