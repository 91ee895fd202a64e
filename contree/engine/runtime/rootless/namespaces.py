"""Entering the rootless engine's user, mount and pid namespaces.

`enter(home)` runs in a non-root process while it is still single-threaded (the kernel refuses
`unshare(CLONE_NEWUSER)` to a multithreaded caller) and returns only in the engine process:

    caller (the user)  unshare(USER); a forked helper writes the maps (ids.py, newuidmap/newgidmap);
      │                setresuid(0); unshare(NS | PID); `/` made recursively private
      └─ outer         waits for init, passes SIGTERM/SIGINT/SIGHUP on, exits with its status
          └─ init      pid 1 of the new pid namespace: reaps orphans, passes signals on, exits with the
              │        engine's status
              └─ engine  pid 2: mounts a /proc of its pid namespace, returns to the caller's code

Inside, the engine is root over its own files (the home belongs to container id 0, i.e. to the user) and
over its own namespaces, so the store, overlay mounts (with `userxattr`) and crun work as in root mode.
Everything the engine starts (crun, sandboxes, pasta, its watchdog) lives in its pid namespace: when the
engine process ends, however it ends, init exits and the kernel kills every one of them; every mount it
made (overlays, tmpfs, namespace binds) lives in its mount namespace and goes with it. A crash leaves
nothing on the host but the home's scratch directories, which the next start's recovery removes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

from contree.engine.runtime import rootless
from contree.engine.runtime.rootless import delegation, ids

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]

_plan: ids.IdPlan | None = None  # the engine's maps, once entered
_delegation: delegation.Delegation | None = None  # the cgroup the engine took over (--cgroup-scope)


class NamespaceError(RuntimeError):
    """The engine's namespaces could not be set up; the message names the fix."""


def delegated() -> delegation.Delegation | None:
    """The cgroup delegated to this engine, when it took one over (`enter(cgroup_scope=True)`)."""
    return _delegation


def plan() -> ids.IdPlan | None:
    """The engine namespace's id maps (None outside a rootless engine)."""
    return _plan


def _unshare(flags: int, what: str) -> None:
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        hint = ""
        if flags & _CLONE_NEWUSER and err in (errno.EPERM, errno.ENOSPC, errno.EACCES):
            hint = (" (unprivileged user namespaces are off: user.max_user_namespaces = 0, "
                    "kernel.unprivileged_userns_clone = 0, or an AppArmor/SELinux policy; "
                    "`contree-mcp engine check` names the fix)")
        raise NamespaceError(f"cannot create the engine's {what}: {os.strerror(err)}{hint}")


def enter(home: Path, *, close_in_supervisors: Iterable[int] = (), cgroup_scope: bool = False) -> ids.IdPlan:
    """Become the rootless engine process (see the module doc); returns its id plan. `close_in_
    supervisors`: descriptors only the engine may keep (a readiness pipe whose reader waits for EOF).
    `cgroup_scope`: this process's cgroup was delegated to it alone; sandboxes get limits there
    (`delegation.py`)."""
    global _plan, _delegation
    if rootless.active():
        return _plan or ids.plan_for()  # already inside (a re-entry from the same process tree)
    if os.geteuid() == 0:
        raise NamespaceError("the rootless engine is for non-root users; root runs the engine directly")
    if threading.active_count() != 1:
        raise NamespaceError("entering the engine's namespaces needs a single-threaded process")
    from contree.engine.storage.home import prepare_home

    prepare_home(home, before_userns=True)  # checked with the host's ids, remembered for inside
    scope = None
    if cgroup_scope:
        try:
            scope = delegation.find()
            delegation.take_over(scope)
        except (delegation.DelegationError, OSError) as exc:
            raise NamespaceError(f"--cgroup-scope: {exc}") from None
    the_plan = ids.plan_for()
    _enter_userns(the_plan)
    _unshare(_CLONE_NEWNS | _CLONE_NEWPID, "mount and pid namespaces")
    if _libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        raise NamespaceError(f"cannot make the engine's mounts private: {os.strerror(ctypes.get_errno())}")
    keep_closed = list(close_in_supervisors)
    sys.stdout.flush()
    sys.stderr.flush()
    init = os.fork()
    if init:
        _supervise(init, keep_closed)  # never returns
    engine = os.fork()
    if engine:
        _supervise(engine, keep_closed, reap_all=True)  # init; never returns
    _plan = the_plan
    rootless._host_pid = _own_host_pid()
    if scope is not None:
        try:
            delegation.settle(scope)
        except OSError as exc:
            raise NamespaceError(f"--cgroup-scope: cannot split {scope.rel}: {exc}") from None
        _delegation = scope
    if _libc.mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None) != 0:
        err = ctypes.get_errno()
        raise NamespaceError(f"cannot mount /proc for the engine's pid namespace: {os.strerror(err)} "
                             "(a container whose /proc has masked paths refuses it)")
    return the_plan


def enter_userns() -> ids.IdPlan:
    """Enter only the engine's user (and a private mount) namespace, as root inside, with no home to
    check or create: for a command run there (`contree-mcp engine unshare rm -rf HOME`)."""
    global _plan
    if rootless.active():
        return _plan or ids.plan_for()
    the_plan = ids.plan_for()
    _enter_userns(the_plan)
    _unshare(_CLONE_NEWNS, "mount namespace")
    _plan = the_plan
    return the_plan


def _enter_userns(the_plan: ids.IdPlan) -> None:
    """unshare(CLONE_NEWUSER), then a forked helper (still in the parent namespace, as newuidmap
    requires) writes our maps; we become root inside."""
    me = os.getpid()
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    helper = os.fork()
    if helper == 0:  # pragma: no cover - runs in the forked helper
        code = 1
        try:
            os.close(go_w)
            os.close(err_r)
            if os.read(go_r, 1) == b"g":
                ids.write_maps(me, the_plan)
                code = 0
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(err_w, str(exc).encode()[:4000])
        finally:
            os._exit(code)
    os.close(go_r)
    os.close(err_w)
    try:
        try:
            _unshare(_CLONE_NEWUSER, "user namespace")
            os.write(go_w, b"g")
        finally:
            os.close(go_w)  # without the go byte (unshare failed) the helper just exits
            _, status = os.waitpid(helper, 0)
        message = os.read(err_r, 4096).decode(errors="replace").strip()
    finally:
        os.close(err_r)
    if os.waitstatus_to_exitcode(status) != 0:
        raise NamespaceError(message or "writing the engine's id maps failed")
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    if not the_plan.single:
        os.setgroups([])  # the user's supplementary groups (shown as nobody inside) are no sandbox's


def _own_host_pid() -> int:
    """Our pid in the host's pid namespace, read from the host's /proc while it is still mounted."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("NSpid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return os.getpid()


def _supervise(child: int, close: list[int], *, reap_all: bool = False) -> None:
    """The outer process and init: wait for `child` (init also reaps every orphan of the pid
    namespace), pass termination signals on, then exit with the child's status."""
    for fd in close:
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(OSError):
        os.chdir("/")  # never pin a directory of the starter's
    for sig in _FORWARDED:
        signal.signal(sig, lambda number, _frame: _pass_on(child, number))
    while True:
        try:
            pid, status = os.wait() if reap_all else os.waitpid(child, 0)
        except ChildProcessError:
            os._exit(1)
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


def _pass_on(child: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(child, number)  # our own unreaped child: its pid cannot have been reused
