"""Base images: `busybox:latest` (Debian's busybox-static) and `debian:bookworm` (mmdebstrap), RUNTIME §11."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from contree.engine.storage.store import (
    KIND_IMPORTED,
    ImageConfig,
    ImageRecord,
    Store,
    remove_tree,
)
from contree.errors import NotFound

BUSYBOX = Path("/bin/busybox")

_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"
_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


class BootstrapError(RuntimeError):
    """A base image could not be built (the message names the missing Debian package)."""


def _busybox_binary() -> Path:
    if not BUSYBOX.is_file():
        raise BootstrapError(f"{BUSYBOX} not found: install the Debian package busybox-static")
    if not _is_static(BUSYBOX):
        raise BootstrapError(f"{BUSYBOX} is not statically linked: install the Debian package busybox-static")
    return BUSYBOX


def _is_static(binary: Path) -> bool:
    # A dynamically linked ELF carries a PT_INTERP segment naming the loader.
    data = binary.read_bytes()[:8192]
    return b"/lib64/ld-linux" not in data and b"/lib/ld-linux" not in data and b"ld-musl" not in data


def build_busybox_rootfs(target: Path) -> None:
    """Fill `target` (an empty or missing directory) with a minimal busybox root filesystem."""
    binary = _busybox_binary()
    target.mkdir(parents=True, exist_ok=True)
    for d, mode in (("bin", 0o755), ("sbin", 0o755), ("usr/bin", 0o755), ("usr/sbin", 0o755),
                    ("etc", 0o755), ("root", 0o700), ("tmp", 0o1777), ("proc", 0o555), ("sys", 0o555),
                    ("dev", 0o755), ("home", 0o755), ("var/tmp", 0o1777), ("run", 0o755)):
        p = target / d
        p.mkdir(parents=True, exist_ok=True)
        p.chmod(mode)  # mkdir's mode is filtered by the umask; sticky bits need an explicit chmod
    dest = target / "bin" / "busybox"
    shutil.copyfile(binary, dest)
    dest.chmod(0o755)
    applets = subprocess.run([str(binary), "--list-full"], capture_output=True, text=True, check=True).stdout
    for rel in applets.split():
        rel = rel.strip("/")
        if not rel or rel == "bin/busybox" or ".." in rel.split("/"):
            continue
        link = target / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not os.path.lexists(link):
            os.symlink("/bin/busybox", link)
    for name, text, mode in (("etc/passwd", _PASSWD, 0o644), ("etc/group", _GROUP, 0o644),
                             ("etc/hosts", _HOSTS, 0o644), ("etc/hostname", "contree\n", 0o644),
                             ("etc/resolv.conf", "", 0o644)):
        p = target / name
        p.write_text(text)
        p.chmod(mode)


BUSYBOX_TAG = "busybox:latest"
DEBIAN_TAG = "debian:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
KINDS = ("busybox", "debian")


def build_debian_rootfs(target: Path, *, mirror: str = DEBIAN_MIRROR, timeout: float = 900) -> None:
    """`mmdebstrap --variant=minbase --include=ca-certificates,python3 bookworm` into `target` (~30 s).

    A rootless engine runs it inside its user namespace, where it is root: mmdebstrap's root mode then
    works as for the root engine (it warns that it cannot mount /sys in the chroot; nothing needs it)."""
    exe = shutil.which("mmdebstrap")
    if exe is None:
        raise BootstrapError("mmdebstrap not found: install the Debian package mmdebstrap")
    cmd = [exe, "--quiet", "--variant=minbase", "--include=ca-certificates,python3", "bookworm", str(target),
           mirror]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-5:])
        raise BootstrapError(f"mmdebstrap failed (exit {res.returncode}): {tail}")


def bootstrap_images(
    store: Store, which: Sequence[str] = KINDS, *, mirror: str = DEBIAN_MIRROR
) -> list[ImageRecord]:
    """Create and tag the base images that are missing; an existing tag means nothing to do."""
    unknown = set(which) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown base images {sorted(unknown)}; choose from {', '.join(KINDS)}")
    out: list[ImageRecord] = []
    with _home_lock(store.home):
        for kind in which:
            tag = BUSYBOX_TAG if kind == "busybox" else DEBIAN_TAG
            try:
                out.append(store.get(store.resolve_tag(tag)))
                continue
            except NotFound:
                pass
            stage = store.staging_dir(f"bootstrap-{kind}")
            try:
                rootfs = stage / "rootfs"
                if kind == "busybox":
                    build_busybox_rootfs(rootfs)
                else:
                    build_debian_rootfs(rootfs, mirror=mirror)
                out.append(store.create_image_from_layer_dir(
                    rootfs, tag=tag, config=ImageConfig(env=[_PATH]), kind=KIND_IMPORTED, source="bootstrap"))
            finally:
                remove_tree(stage)
    return out


@contextlib.contextmanager
def _home_lock(home: Path) -> Iterator[None]:
    """One bootstrap at a time per engine home (a second caller waits, then finds the tag)."""
    with open(home / "bootstrap.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
