"""`contree-mcp engine check`: can this user run the engine here, and what to fix when not.

For a non-root user every piece of the rootless engine is checked, most of them by trying it in a
forked child (nothing in this process changes): user namespaces, the user's subordinate ids and the
setuid helpers that map them, overlay inside a user namespace (on the home's filesystem, whiteouts
included), crun, pasta or slirp4netns, the egress filter inside a network namespace, and cgroup
delegation. Each problem comes with its fix (e.g. Ubuntu 24.04's AppArmor restriction on unprivileged
user namespaces). Root gets the root engine's basics. Then, when the home holds a store, the store is
checked as before (`Store.check`, `--repair` runs start-up recovery).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import pwd
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from contree.engine.runtime import hostcheck
from contree.engine.runtime.rootless import ids
from contree.engine.runtime.subids import NAME as ENGINE_RANGE_NAME
from contree.engine.runtime.subids import parse

OK, WARN, FAIL = "ok", "warn", "FAIL"
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


@dataclass
class Finding:
    status: str  # OK | WARN | FAIL
    what: str
    detail: str
    fix: str = ""


def _sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return None


def _in_child(probe: Callable[[], str]) -> tuple[bool, str]:
    """Run `probe` in a forked child (its namespaces never touch this process): (succeeded, message)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            result = {"ok": True, "message": probe()}
        except BaseException as exc:
            result = {"ok": False, "message": str(exc) or type(exc).__name__}
        with contextlib.suppress(OSError):
            os.write(w, json.dumps(result).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    try:
        result = json.loads(data)
        return bool(result["ok"]), str(result["message"])
    except (ValueError, KeyError):
        return False, "the probe died"


def _unshare(flags: int) -> None:
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def _own_single_map() -> None:
    """Map just ourselves as root in the user namespace we are in (allowed to its creator)."""
    uid, gid = os.getuid(), os.getgid()
    _unshare(_CLONE_NEWUSER)
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1\n")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1\n")


def _mount(source: str, target: str, fstype: str, data: str) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), 0, data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype}: {os.strerror(err)}")


# ---------------------------------------------------------------------- the checks


def check_kernel() -> Finding:
    major, minor = hostcheck.kernel_version()
    if (major, minor) < hostcheck.MIN_KERNEL:
        return Finding(FAIL, "kernel", f"{major}.{minor}: the engine needs 6.8 (overlay `lowerdir+`)",
                       "upgrade the kernel (Debian 12: bookworm-backports linux-image-amd64)")
    return Finding(OK, "kernel", f"{platform.release()} (>= 6.8: overlay lowerdir+ and in user namespaces)")


def check_userns() -> Finding:
    limit = _sysctl("user.max_user_namespaces")
    if limit == "0":
        return Finding(FAIL, "user namespaces", "user.max_user_namespaces = 0",
                       "as root: sysctl -w user.max_user_namespaces=15000 (and in /etc/sysctl.d/ to keep it)")
    clone = _sysctl("kernel.unprivileged_userns_clone")
    if clone == "0":
        return Finding(FAIL, "user namespaces", "kernel.unprivileged_userns_clone = 0",
                       "as root: sysctl -w kernel.unprivileged_userns_clone=1 (and in /etc/sysctl.d/)")

    def probe() -> str:
        _own_single_map()
        _unshare(_CLONE_NEWNS)
        _mount("tmpfs", "/tmp", "tmpfs", "size=1m")  # needs CAP_SYS_ADMIN in the new namespace
        return "created and usable"

    ok, message = _in_child(probe)
    if ok:
        return Finding(OK, "user namespaces", f"unprivileged ones work (max {limit})")
    if _sysctl("kernel.apparmor_restrict_unprivileged_userns") == "1":
        return Finding(FAIL, "user namespaces",
                       f"AppArmor restricts unprivileged user namespaces ({message})",
                       "Ubuntu 23.10+: as root, sysctl -w kernel.apparmor_restrict_unprivileged_userns=0 "
                       "(and in /etc/sysctl.d/60-userns.conf), or give the interpreter an AppArmor profile "
                       f"with `userns,` (profile contree-mcp {os.path.realpath(sys.executable)} "
                       "flags=(unconfined) { userns, } in /etc/apparmor.d/contree-mcp)")
    return Finding(FAIL, "user namespaces", message,
                   "allow unprivileged user namespaces (sysctls user.max_user_namespaces, "
                   "kernel.unprivileged_userns_clone; SELinux/AppArmor policy)")


def check_subids(name: str, uid: int) -> list[Finding]:
    out = []
    newuidmap, newgidmap = ids.helpers()
    for tool, binary in (("newuidmap", newuidmap), ("newgidmap", newgidmap)):
        if binary is None:
            out.append(Finding(FAIL, tool, "not found", "as root: apt-get install uidmap"))
            continue
        st = os.stat(binary)
        if not (st.st_mode & stat.S_ISUID and st.st_uid == 0) and not _has_file_caps(binary):
            out.append(Finding(FAIL, tool, f"{binary} is neither setuid root nor has file capabilities",
                               "as root: apt-get install --reinstall uidmap"))
    for file in ("subuid", "subgid"):
        path = ids.ETC / file
        mine = ids.subordinate_range(path, name, uid)
        if mine is None:
            free = _free_range()
            out.append(Finding(FAIL, f"/etc/{file}", f"no range for {name}: sandboxes could hold files of "
                               "only one owner (root) and run only as root (single-id mapping)",
                               f"as root: usermod --add-subuids {free} --add-subgids {free} {name}"))
            continue
        others = [str(e) for e in parse(_read(path)) if e.owner not in (name, str(uid))
                  and e.overlaps(mine.start, mine.length)]
        if others:
            out.append(Finding(FAIL, f"/etc/{file}", f"{name}'s range {mine.start}+{mine.length} overlaps "
                               f"{', '.join(others)}: either could reach the other's files and processes",
                               f"as root: give {name} a range no other entry overlaps (usermod --del-subuids/"
                               "--add-subuids)"))
        elif mine.length < ids.MAX_CONTAINER_ID + 1:
            out.append(Finding(WARN, f"/etc/{file}", f"{name} has {mine.length} subordinate ids: container "
                               f"ids above {mine.length} are unavailable (their files show as nobody)",
                               f"as root: give {name} 65536 ids (usermod --add-subuids/--add-subgids)"))
        else:
            out.append(Finding(OK, f"/etc/{file}", f"{name}:{mine.start}:{mine.length}"))
    if not any(f.status == FAIL for f in out):
        from contree.engine.runtime.rootless.namespaces import _enter_userns

        plan = ids.plan_for(uid)
        def probe() -> str:
            _enter_userns(plan)
            return "mapped"

        ok, message = _in_child(probe)
        out.append(Finding(OK if ok else FAIL, "id mapping", plan.describe() if ok else message,
                           "" if ok else "check the entries above and that newuidmap/newgidmap are setuid "
                           "root"))
    return out


def _has_file_caps(path: str) -> bool:
    try:
        return bool(os.getxattr(path, "security.capability"))
    except OSError:
        return False


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _free_range(size: int = 65536) -> str:
    """A range no entry of /etc/subuid or /etc/subgid holds (what useradd would pick)."""
    taken = parse(_read(ids.ETC / "subuid")) + parse(_read(ids.ETC / "subgid"))
    start = 100000
    moved = True
    while moved:
        moved = False
        for e in taken:
            if e.overlaps(start, size):
                start, moved = e.end, True
    return f"{start}-{start + size - 1}"


def check_overlay(where: Path) -> list[Finding]:
    def probe() -> str:
        _own_single_map()
        _unshare(_CLONE_NEWNS)
        with tempfile.TemporaryDirectory(prefix=".contree-check-", dir=where) as d:
            lower, upper, work, merged = (Path(d, n) for n in ("lower", "upper", "work", "merged"))
            for p in (lower, upper, work, merged):
                p.mkdir()
            (lower / "gone").write_text("x")
            (lower / "dir").mkdir()
            _mount("overlay", str(merged), "overlay",
                   f"lowerdir={lower},upperdir={upper},workdir={work},userxattr")
            (merged / "gone").unlink()  # a whiteout: a 0:0 character device made by overlay for us
            os.rmdir(merged / "dir")
            (merged / "dir").mkdir()  # an opaque directory: user.overlay.opaque
            st = os.lstat(upper / "gone")
            if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
                raise OSError("overlay made no whiteout")
            if os.getxattr(upper / "dir", "user.overlay.opaque") != b"y":
                raise OSError("overlay marked no opaque directory")
            _libc.umount2(str(merged).encode(), 2)
        return "mounts with userxattr; whiteouts and opaque directories work"

    ok, message = _in_child(probe)
    if ok:
        return [Finding(OK, "overlay in a user namespace", f"{message} (on {where})")]
    return [Finding(FAIL, "overlay in a user namespace", f"on {where}: {message}",
                    "put the engine home (--home, CONTREE_ENGINE_HOME) on a local ext4/xfs/btrfs filesystem; "
                    "overlay in a user namespace needs kernel >= 5.11")]


def check_runtime() -> list[Finding]:
    out = []
    crun = hostcheck.find_binary("crun")
    if crun is None:
        out.append(Finding(FAIL, "crun", "not found", "as root: apt-get install crun"))
    else:
        version = subprocess.run([crun, "--version"], capture_output=True, text=True, check=False).stdout
        out.append(Finding(OK, "crun", (version.splitlines() or ["?"])[0]))
    return out


def check_network() -> list[Finding]:
    from contree.engine.runtime.rootless.sandbox_ns import require_tools

    out = []
    pasta, slirp = hostcheck.find_binary("pasta"), hostcheck.find_binary("slirp4netns")
    if pasta is not None:
        out.append(Finding(OK, "pasta", f"{pasta} (sandbox networking)"))
    elif slirp is not None:
        out.append(Finding(WARN, "pasta", f"not found; slirp4netns ({slirp}) is used instead",
                           "as root: apt-get install passt"))
    else:
        out.append(Finding(FAIL, "pasta", "neither pasta nor slirp4netns: sandboxes get no network",
                           "as root: apt-get install passt"))
    missing = require_tools()
    if missing:
        out.append(Finding(FAIL, "network tools", "missing " + ", ".join(missing),
                           "as root: apt-get install " + " ".join(sorted({m.split("(")[1].rstrip(")")
                                                                         for m in missing}))))
        return out
    restore = hostcheck.find_binary("iptables-restore") or "iptables-restore"

    def probe() -> str:
        _own_single_map()
        _unshare(_CLONE_NEWNET)
        rules = "*filter\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -d 10.0.0.0/8 -j REJECT\nCOMMIT\n"
        res = subprocess.run([restore, "-w"], input=rules, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise OSError((res.stderr or res.stdout).strip() or f"iptables-restore exit {res.returncode}")
        return "iptables works inside a sandbox's network namespace"

    ok, message = _in_child(probe)
    out.append(Finding(OK if ok else FAIL, "egress filter", message,
                       "" if ok else "the kernel needs nf_tables (iptables-nft) usable in a network "
                       "namespace; without it sandboxes get no network"))
    return out


def check_cgroups() -> Finding:
    info = hostcheck.detect()
    if info.cgroup_mode is not hostcheck.CgroupMode.V2:
        return Finding(WARN, "cgroup delegation", f"cgroups {info.cgroup_mode.value}, none delegated: "
                       "sandboxes get a per-sandbox process limit; memory and CPU limits are not enforced",
                       "a cgroup v2 host with systemd delegates to users: systemd-run --user --scope "
                       "-p Delegate=yes contree-mcp engine serve --cgroup-scope; or use the system engine "
                       "service (README)")
    own = _own_cgroup()
    path = hostcheck.CGROUP_ROOT / own.lstrip("/")
    writable = os.access(path, os.W_OK) and os.access(path / "cgroup.subtree_control", os.W_OK)
    controllers = _read(path / "cgroup.controllers").split()
    if not writable:
        return Finding(WARN, "cgroup delegation", f"this session's cgroup {own} is not delegated to you: "
                       "per-sandbox process limits only; memory and CPU limits are not enforced",
                       "start the engine in a scope of its own: systemd-run --user --scope -p Delegate=yes "
                       "contree-mcp engine serve --cgroup-scope; or use the system engine service (README)")
    return Finding(OK, "cgroup delegation", f"{own} is yours (controllers: {' '.join(controllers) or '-'}); "
                   "a service started in a scope of its own with --cgroup-scope gives sandboxes limits there")


def _own_cgroup() -> str:
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        if line.startswith("0::"):
            return line[3:]
    return "/"


def rootless_findings(home: Path) -> list[Finding]:
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    findings = [check_kernel(), check_userns()]
    if findings[-1].status == FAIL:
        return findings  # nothing below can work
    findings += check_subids(name, uid)
    findings += check_overlay(_probe_dir(home))
    findings += check_runtime()
    findings += check_network()
    findings.append(check_cgroups())
    return findings


def root_findings() -> list[Finding]:
    findings = [check_kernel(), *check_runtime()]
    from contree.engine.runtime import subids

    try:
        found = subids.engine_range(allocate=False)
        findings.append(Finding(OK, "sandbox ids", f"{ENGINE_RANGE_NAME}: uids {found.uid}+{found.size}"))
    except subids.SubidError as exc:
        findings.append(Finding(WARN, "sandbox ids", str(exc), "it is allocated at the engine's first start"))
    tools = [t for t in ("ip", "iptables-restore") if hostcheck.find_binary(t) is None]
    if tools:
        findings.append(Finding(FAIL, "network tools", "missing " + ", ".join(tools),
                                "as root: apt-get install iproute2 iptables"))
    else:
        findings.append(Finding(OK, "network tools", "ip, iptables-restore"))
    return findings


def _probe_dir(home: Path) -> Path:
    """Where the overlay probe runs: the home, else its nearest existing parent we may write to."""
    for candidate in (home, *home.parents):
        if candidate.is_dir() and os.access(candidate, os.W_OK):
            return candidate
    return Path(tempfile.gettempdir())
