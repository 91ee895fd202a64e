"""The on-disk layer format shared by import (`contree.oci.extract`) and the engine's store: overlay-format
directories, whiteouts as character devices 0:0, and overlay's own metadata in extended attributes.

Overlay keeps that metadata (an opaque directory's marker above all) in `trusted.overlay.*` when it is
mounted by root on the host, and in `user.overlay.*` when it is mounted inside a user namespace (the
`userxattr` mount option, kernel >= 5.11): only the host's root may write `trusted.*`. So a root engine's
layers mark opaque directories with `trusted.overlay.opaque`, a rootless engine's with
`user.overlay.opaque`; each engine reads and writes only its own kind, chosen by where the process runs.
Both namespaces are overlay's bookkeeping, never content: images cannot set them and archives never
show them.
"""

from __future__ import annotations

import functools

OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")


@functools.cache
def in_initial_userns() -> bool:
    """Whether this process sees the host's ids unchanged (it is not inside a user namespace)."""
    try:
        with open("/proc/self/uid_map") as fh:
            return fh.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


def overlay_prefix() -> str:
    """The xattr namespace of overlay's metadata for mounts made by this process."""
    return "trusted.overlay." if in_initial_userns() else "user.overlay."


def opaque_xattr() -> str:
    """The xattr (value `y`) that marks an opaque directory in this process's layers."""
    return overlay_prefix() + "opaque"


def needs_userxattr() -> bool:
    """Overlay mounted inside a user namespace must keep its metadata in `user.*` (`userxattr`)."""
    return not in_initial_userns()


def is_overlay_xattr(name: str) -> bool:
    return name.startswith(OVERLAY_XATTR_PREFIXES)
