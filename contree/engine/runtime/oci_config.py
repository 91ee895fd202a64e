"""The hardened OCI runtime config of a sandbox (RUNTIME §4.1). Pure: builds a dict, writes nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec

from contree.engine.runtime import seccomp

# The 11 capabilities podman grants (CapEff 0x800405fb). No SYS_ADMIN, NET_RAW, MKNOD, SYS_PTRACE, …
CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_NET_BIND_SERVICE",
    "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID", "CAP_SYS_CHROOT",
]

MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]

# Wanted rlimits (soft = hard); clamped to the engine's own hard limits because raising needs
# CAP_SYS_RESOURCE, which this host's root lacks (RUNTIME §1).
WANTED_RLIMITS = {"RLIMIT_NOFILE": 1024, "RLIMIT_NPROC": 4096, "RLIMIT_CORE": 0}

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class IdMapping(msgspec.Struct, kw_only=True):
    containerID: int
    hostID: int
    size: int


class ConfigOptions(msgspec.Struct, kw_only=True):
    """Everything the config depends on besides the process itself."""
    rootfs: Path
    hostname: str = "linuxkit"
    cgroups_path: str
    netns_path: str | None = None  # None: a fresh network namespace with only `lo`
    memory_bytes: int | None = None
    pids_limit: int | None = 256
    cpu_quota: float | None = None
    rlimits: dict[str, int] = msgspec.field(default_factory=lambda: dict(WANTED_RLIMITS))
    seccomp: bool = True
    seccomp_bpf_b64: str | None = None  # crun only: precompiled filter, skips the per-start compile
    shm_bytes: int = 64 << 20
    extra_mounts: list[dict[str, Any]] = msgspec.field(default_factory=list)
    uid_mappings: list[IdMapping] | None = None  # a new user namespace when set
    gid_mappings: list[IdMapping] | None = None
    userns_path: str | None = None  # join this (already mapped) user namespace instead


def clamp_rlimits(hard: dict[str, int]) -> dict[str, int]:
    """min(wanted, current hard) for every rlimit the sandbox gets."""
    out = {}
    for name, wanted in WANTED_RLIMITS.items():
        h = hard.get(name)
        out[name] = wanted if h is None or h < 0 else min(wanted, h)
    return out


def clamp_nproc(wanted: int) -> int:
    """`wanted` processes, or fewer when the engine's own hard RLIMIT_NPROC is lower (raising it fails)."""
    hard = host_hard_rlimits()["RLIMIT_NPROC"]
    return wanted if hard < 0 else min(wanted, hard)


def host_hard_rlimits() -> dict[str, int]:
    import resource

    out = {}
    for name in WANTED_RLIMITS:
        hard = resource.getrlimit(getattr(resource, name))[1]
        out[name] = -1 if hard == resource.RLIM_INFINITY else hard
    return out


def process_section(argv: list[str], env: list[str], cwd: str, uid: int, gid: int,
                    rlimits: dict[str, int]) -> dict[str, Any]:
    if not any(e.startswith("PATH=") for e in env):
        env = [f"PATH={DEFAULT_PATH}", *env]
    return {
        "terminal": False,
        "user": {"uid": uid, "gid": gid, "additionalGids": []},
        "args": argv,
        "env": env,
        "cwd": cwd or "/",
        "capabilities": {k: list(CAPABILITIES) for k in ("bounding", "effective", "permitted")}
        | {"inheritable": [], "ambient": []},
        "rlimits": [{"type": k, "hard": v, "soft": v} for k, v in rlimits.items()],
        "noNewPrivileges": True,
    }


def _mounts(opts: ConfigOptions) -> list[dict[str, Any]]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", f"size={opts.shm_bytes}"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        *opts.extra_mounts,
    ]


def _resources(opts: ConfigOptions) -> dict[str, Any]:
    res: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if opts.memory_bytes is not None:
        res["memory"] = {"limit": opts.memory_bytes, "swap": opts.memory_bytes}
    if opts.pids_limit is not None:
        res["pids"] = {"limit": opts.pids_limit}
    if opts.cpu_quota is not None:
        res["cpu"] = {"quota": int(opts.cpu_quota * 100_000), "period": 100_000}
    return res


def build_config(opts: ConfigOptions, process: dict[str, Any]) -> dict[str, Any]:
    namespaces: list[dict[str, str]] = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")]
    network: dict[str, str] = {"type": "network"}
    if opts.netns_path:
        network["path"] = opts.netns_path  # prepared by network.py; otherwise a fresh netns with only lo
    namespaces.append(network)
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "resources": _resources(opts),
        "maskedPaths": [p for p in MASKED_PATHS if p != "/sys/devices/virtual/powercap"
                        or os.path.exists(p)],
        "readonlyPaths": list(READONLY_PATHS),
    }
    if opts.cgroups_path:  # "": a rootless engine with no cgroup delegated to it
        linux["cgroupsPath"] = opts.cgroups_path
    if opts.userns_path is not None:
        namespaces.append({"type": "user", "path": opts.userns_path})
    elif opts.uid_mappings is not None:
        namespaces.append({"type": "user"})
        linux["uidMappings"] = [msgspec.to_builtins(m) for m in opts.uid_mappings]
        linux["gidMappings"] = [msgspec.to_builtins(m) for m in (opts.gid_mappings or opts.uid_mappings)]
    annotations: dict[str, str] = {}
    if opts.seccomp:
        linux["seccomp"] = seccomp.profile_dict()
        if opts.seccomp_bpf_b64:
            annotations["run.oci.seccomp_bpf_data"] = opts.seccomp_bpf_b64
    return {
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": str(opts.rootfs), "readonly": False},
        "hostname": opts.hostname,
        "mounts": _mounts(opts),
        "linux": linux,
        "annotations": annotations,
    }
