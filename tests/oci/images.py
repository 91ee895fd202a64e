"""Test image recipes (layers bottom first) shared by the OCI tests and the benchmark."""

from __future__ import annotations

import os

from tests.oci.harness import BuiltImage, Entry, build_image

IMAGE_CONFIG = {
    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello from the image"],
    "WorkingDir": "/srv/app",
    "User": "1000:1000",
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ["echo ready"],
    "Labels": {"org.example.test": "yes"},
}


def multi_layer(compression: tuple[str, str, str] = ("gzip", "zstd", "none")) -> BuiltImage:
    """Three layers (gzip, zstd, plain tar): owners, modes, links, xattrs, a whiteout, an opaque dir."""
    base = [
        Entry("bin", "dir", mode=0o755),
        Entry("bin/sh", data=b"#!shell\n", mode=0o755),
        Entry("bin/vi", data=b"vi binary\n", mode=0o755),
        Entry("bin/view", "hardlink", link="bin/vi"),
        Entry("etc", "dir", mode=0o755),
        Entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n", xattrs={"user.origin": "base-layer"}),
        Entry("etc/alt", "symlink", link="/etc/passwd"),
        Entry("home/user", "dir", mode=0o700, uid=1000, gid=1000),
        Entry("home/user/notes", data=b"mine\n", mode=0o600, uid=1000, gid=1000, mtime=1_600_000_000),
        Entry("usr/bin/su", data=b"su\n", mode=0o4755),
        Entry("run/fifo", "fifo", mode=0o600),
        Entry("opt/app", "dir", mode=0o755),
        Entry("opt/app/old.txt", data=b"old\n"),
        Entry("srv/app", "dir", mode=0o755),
    ]
    changes = [
        Entry("bin/.wh.vi"),
        Entry("opt/app", "dir", mode=0o755),
        Entry("opt/app/.wh..wh..opq"),
        Entry("opt/app/new.txt", data=b"new\n"),
        Entry("etc/motd", data=b"welcome\n"),
    ]
    top = [
        Entry("srv/app/hello.txt", data=b"hello world\n"),
        Entry("srv/app/blob.bin", data=os.urandom(300_000)),
    ]
    return build_image([base, changes, top], compression=list(compression), config=IMAGE_CONFIG)


def platform_image(arch: str) -> BuiltImage:
    return build_image([[Entry("arch.txt", data=arch.encode())]], config={"Env": [f"ARCH={arch}"]}, arch=arch)
