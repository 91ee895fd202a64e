"""Base images: `busybox:latest` (Debian's busybox-static) and `debian:bookworm` (mmdebstrap), RUNTIME §11."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

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
