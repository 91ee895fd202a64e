"""What this host can do for the sandbox runtime (RUNTIME §1, §3, §5.1), and which OCI runtime to use.

Detection is cheap and side-effect free, except `apply_hugetlb_fix`, which is the one host change crun
needs on hybrid cgroup hosts: crun refuses to run while the unified hierarchy owns a controller, and on
these VMs it owns `hugetlb`. Mounting a v1 hugetlb hierarchy moves the controller there.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import resource
import shutil
import subprocess
from enum import StrEnum
from pathlib import Path

import msgspec

from contree.layerformat import in_initial_userns

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
_CGROUP2_SUPER_MAGIC = 0x63677270
_TMPFS_MAGIC = 0x01021994
MIN_KERNEL = (6, 8)  # fsconfig lowerdir+ (RUNTIME §6.1)

# Debian package that provides each runtime, for error messages.
RUNTIME_PACKAGES = {"crun": "crun", "runc": "runc", "runsc": "runsc"}


class CgroupMode(StrEnum):
    V1 = "v1"
    HYBRID = "hybrid"
    V2 = "v2"


class NoRuntimeAvailable(Exception):
    """No OCI runtime can start a sandbox here; the message says what to install or fix."""


class HostInfo(msgspec.Struct, kw_only=True):
    is_root: bool  # root on the host itself (not root inside a user namespace)
    kernel: tuple[int, int]
    cgroup_mode: CgroupMode
    # The directory holding the unified hierarchy (`/sys/fs/cgroup` on v2, `…/unified` on hybrid).
    unified_root: Path | None
    v1_controllers: dict[str, Path]  # controller name -> hierarchy mount point (v1/hybrid only)
    nofile_hard: int
    nproc_hard: int
    hugetlb_fix_applied: bool = False
    # Root inside a user namespace of its own: the rootless engine (contree/engine/runtime/rootless/).
    rootless: bool = False


class _Statfs(ctypes.Structure):
    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_ulong),
        ("f_bfree", ctypes.c_ulong),
        ("f_bavail", ctypes.c_ulong),
        ("f_files", ctypes.c_ulong),
        ("f_ffree", ctypes.c_ulong),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Statfs)]


def fs_magic(path: Path) -> int:
    buf = _Statfs()
    if _libc.statfs(str(path).encode(), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return int(buf.f_type) & 0xFFFFFFFF


def kernel_version() -> tuple[int, int]:
    parts = platform.release().split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def _v1_mounts() -> dict[str, Path]:
    """Controller -> mount point of every cgroup v1 hierarchy, from /proc/self/mountinfo."""
    found: dict[str, Path] = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fstype, _source, opts = ([*right.split(), "", "", ""])[:3]
            if fstype != "cgroup":
                continue
            mount_point = Path(left.split()[4].replace("\\040", " "))
            for opt in opts.split(","):
                if opt.startswith("name="):
                    found[opt] = mount_point
                elif opt not in ("rw", "ro", "relatime", "noatime", "nosuid", "nodev", "noexec") \
                        and "=" not in opt:
                    found[opt] = mount_point
    return found


def cgroup_mode(root: Path = CGROUP_ROOT) -> tuple[CgroupMode, Path | None]:
    magic = fs_magic(root)
    if magic == _CGROUP2_SUPER_MAGIC:
        return CgroupMode.V2, root
    unified = root / "unified"
    if unified.is_dir():
        try:
            if fs_magic(unified) == _CGROUP2_SUPER_MAGIC:
                return CgroupMode.HYBRID, unified
        except OSError:
            pass
    return CgroupMode.V1, None


def unified_controllers(unified_root: Path | None) -> list[str]:
    if unified_root is None:
        return []
    try:
        return (unified_root / "cgroup.controllers").read_text().split()
    except OSError:
        return []


def detect() -> HostInfo:
    mode, unified = cgroup_mode()
    return HostInfo(
        is_root=os.geteuid() == 0 and in_initial_userns(),
        rootless=os.geteuid() == 0 and not in_initial_userns(),
        kernel=kernel_version(),
        cgroup_mode=mode,
        unified_root=unified,
        v1_controllers={} if mode is CgroupMode.V2 else _v1_mounts(),
        nofile_hard=resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        nproc_hard=resource.getrlimit(resource.RLIMIT_NPROC)[1],
    )


def needs_hugetlb_fix(info: HostInfo) -> bool:
    return info.cgroup_mode is CgroupMode.HYBRID and bool(unified_controllers(info.unified_root))


def apply_hugetlb_fix(info: HostInfo) -> bool:
    """Move every controller out of the unified hierarchy of a hybrid host (RUNTIME §3). Idempotent.

    Returns True when the unified hierarchy is (now) empty. Never touches a pure v2 host.
    """
    if not needs_hugetlb_fix(info):
        return info.cgroup_mode is not CgroupMode.V2
    if not info.is_root:
        return False
    for ctrl in unified_controllers(info.unified_root):
        target = CGROUP_ROOT / ctrl
        try:
            target.mkdir(exist_ok=True)
            subprocess.run(["mount", "-t", "cgroup", "-o", ctrl, "cgroup", str(target)],
                           check=True, capture_output=True, timeout=10)
            log.warning("hybrid cgroups: mounted the %s controller as a v1 hierarchy at %s so crun can run "
                        "(RUNTIME §3)", ctrl, target)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("hybrid cgroups: could not move %s out of the unified hierarchy: %s", ctrl, exc)
            return False
    info.v1_controllers = _v1_mounts()
    info.hugetlb_fix_applied = True
    return not unified_controllers(info.unified_root)


def find_binary(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/bin") / name, Path("/usr/sbin") / name) if p.is_file()), None)


def check_requirements(info: HostInfo) -> list[str]:
    """Problems that make the embedded runtime impossible on this host (empty list = fine)."""
    problems = []
    if not info.is_root and not info.rootless:
        problems.append("as a non-root user the embedded engine runs as the engine service, in a user "
                        "namespace of its own: start it with `contree-mcp engine serve` (MCP servers start "
                        "it by themselves); `contree-mcp engine check` says what this host lacks for it")
    if info.kernel < MIN_KERNEL:
        problems.append(f"kernel {info.kernel[0]}.{info.kernel[1]} is older than 6.8 (overlay lowerdir+)")
    return problems


def select_runtime(info: HostInfo, wanted: str) -> tuple[str, str]:
    """Pick the OCI runtime: crun, unless it cannot work here (then runc); runsc only on request."""
    if wanted not in ("auto", "crun", "runc", "runsc"):
        raise ValueError(f"unknown runtime {wanted!r}")
    crun_problem = None
    crun = find_binary("crun")
    if crun is None:
        crun_problem = "crun is not installed (Debian package crun)"
    elif (not info.rootless and not apply_hugetlb_fix(info)
          and info.cgroup_mode is not CgroupMode.V2):  # rootless: no cgroups of crun's own
        crun_problem = ("crun refuses hybrid cgroups while the unified hierarchy owns controllers, "
                        "and they could not be moved (RUNTIME §3)")
    if wanted in ("auto", "crun") and crun_problem is None and crun is not None:
        return "crun", crun
    if wanted == "crun":
        raise NoRuntimeAvailable(crun_problem or "crun unusable")
    if wanted in ("auto", "runc"):
        runc = find_binary("runc")
        if runc is not None:
            if wanted == "auto":
                log.warning("using runc: %s", crun_problem)
            return "runc", runc
        raise NoRuntimeAvailable(
            f"no usable OCI runtime: {crun_problem}; runc is not installed either "
            "(apt-get install crun runc)")
    runsc = find_binary("runsc")
    if runsc is None:
        raise NoRuntimeAvailable("runsc (gVisor) is not installed (Debian package runsc)")
    return "runsc", runsc
