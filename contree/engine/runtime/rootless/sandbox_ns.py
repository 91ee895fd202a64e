"""Each sandbox's own user namespace (and, with networking, its network namespace) in a rootless engine.

The namespaces are made by a helper, `unshare --user` (util-linux), started with:

* a user id of its own in the engine's namespace (`OwnerPool`) and RLIMIT_NPROC = the sandbox's pids
  limit: the kernel charges every task of the new namespace, whatever its uid, to that id and refuses
  a fork past the limit it had when the namespace was made (ucounts). So the limit counts the whole
  sandbox, and sandboxes never share a count, neither with each other nor with the engine;
* a map of the engine's ids onto themselves (`ids.sandbox_extents`), written by the engine, which holds
  CAP_SETUID over its own namespace: container id u is the same u the engine sees on disk;
* with networking, a network namespace made after the map exists (its sysctls then belong to the
  sandbox's root), with IPv6 off, `lo` up and the egress filter loaded by `iptables-restore`. The sandbox
  gets no CAP_NET_ADMIN, so it can neither change nor drop the filter.

Both namespaces are kept by bind mounts under the engine's private run directory (its own tmpfs, in its
own mount namespace) until `close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from contree.engine.runtime.netns import end_helper
from contree.engine.runtime.rootless.ids import IdPlan, map_text, sandbox_extents
from contree.engine.storage.overlay import bind_mount

_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

# Run in the new network namespace, made inside the sandbox's user namespace once its maps exist (so its
# sysctls belong to the sandbox's root): IPv6 off (the filter is IPv4), lo up, the filter loaded.
# $0: iptables-restore, $1: its input, $2: ip.
_NET_SETUP = (
    'for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 /proc/sys/net/ipv6/conf/default/disable_ipv6; do '
    '[ -e "$f" ] && echo 1 > "$f"; done; '
    '"$2" link set lo up || exit 1; '
    'printf "%s" "$1" | "$0" -w || exit 1; '
    'echo net; read _'
)


class NamespaceSetupError(RuntimeError):
    pass


class OwnerPool:
    """Ids of the engine's namespace that own sandbox namespaces, one per live sandbox (from the top of
    the mapped range down; id 0, the engine's own, only when nothing else is mapped)."""

    def __init__(self, size: int) -> None:
        self._free = list(range(1, size)) if size > 1 else [0]
        self._shared = size <= 1

    def take(self) -> int:
        if self._shared:
            return 0
        if not self._free:
            raise NamespaceSetupError("no free owner id for another sandbox namespace")
        return self._free.pop()

    def give(self, owner: int) -> None:
        if not self._shared:
            self._free.append(owner)


class SandboxNamespaces:
    """A sandbox's user namespace (`userns`) and optional network namespace (`netns`), kept by binds."""

    def __init__(self, name: str, userns: Path, netns: Path | None, owner: int, pids: int | None) -> None:
        self.name = name
        self.userns = userns
        self.netns = netns
        self.owner = owner
        self.pids = pids

    def close(self) -> None:
        """Drop the binds (lazily: pasta holds the netns file open until it sees it deleted)."""
        for path in (self.netns, self.userns):
            if path is None:
                continue
            if _libc.umount2(os.fsencode(path), _MNT_DETACH) != 0:
                err = ctypes.get_errno()
                if err not in (22, 2):  # EINVAL: not mounted; ENOENT: gone
                    raise OSError(err, f"umount {path}: {os.strerror(err)}")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _tool(name: str) -> str:
    from contree.engine.runtime.hostcheck import find_binary

    path = find_binary(name)
    if path is None:
        package = {"iptables-restore": "iptables", "ip": "iproute2"}.get(name, "util-linux")
        raise NamespaceSetupError(f"{name} not found: install the Debian package {package}")
    return path


async def create(directory: Path, plan: IdPlan, owners: OwnerPool, *, pids: int | None,
                 filter_rules: str | None) -> SandboxNamespaces:
    """New namespaces for one sandbox, bound under `directory`; `pids`: its task limit (None: only the
    user's own); `filter_rules` (iptables-restore input) asks for a network namespace filtered by them."""
    name = secrets.token_hex(6)
    owner = owners.take()
    done = SandboxNamespaces(name, directory / f"{name}.user", None, owner, pids)
    try:
        # The user namespace: made by a helper running as `owner` with the pids limit.
        nproc = "unlimited" if pids is None else str(pids)
        argv = [_tool("prlimit"), f"--nproc={nproc}:{nproc}", "--", _tool("unshare"), "--user", "--",
                "/bin/sh", "-c", "echo ready; read _"]
        async with _helper(argv, user=owner) as helper:
            await helper.expect(b"ready\n", "cannot create a sandbox user namespace")
            for kind, extents in (("uid_map", plan.uid_extents), ("gid_map", plan.gid_extents)):
                with open(f"/proc/{helper.pid}/{kind}", "w") as fh:  # noqa: ASYNC230 - procfs, no disk
                    fh.write(map_text(sandbox_extents(extents, plan.size)))
            _bind(helper.pid, "user", done.userns)
        if filter_rules is not None:
            # The network namespace: made inside it by the engine's root (root there too, so it keeps its
            # capabilities across exec, which the owner, an ordinary id there, would not).
            netns = directory / f"{name}.net"
            # --preserve-credentials: no setgroups, which a single-id engine's namespaces refuse.
            argv = [_tool("nsenter"), f"--user={done.userns}", "--preserve-credentials", "--",
                    _tool("unshare"), "--net", "--", "/bin/sh", "-c", _NET_SETUP, _tool("iptables-restore"),
                    filter_rules, _tool("ip")]
            async with _helper(argv) as helper:
                await helper.expect(b"net\n", "cannot set up the sandbox's network namespace and its egress "
                                    "filter")
                _bind(helper.pid, "net", netns)
            done.netns = netns
    except BaseException:
        with contextlib.suppress(OSError):
            done.close()
        owners.give(owner)
        raise
    return done


class _Helper:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid

    async def expect(self, line: bytes, what: str) -> None:
        assert self.proc.stdout is not None
        if await asyncio.wait_for(self.proc.stdout.readline(), 10) != line:
            raise NamespaceSetupError(f"{what}: {await _err(self.proc)}")


@contextlib.asynccontextmanager
async def _helper(argv: list[str], *, user: int | None = None) -> AsyncIterator[_Helper]:
    """A process that makes namespaces and waits (reading stdin) while we bind them; ended on exit."""
    pipe = asyncio.subprocess.PIPE
    if user is None or user == os.geteuid():  # (a single-id engine may not even call setgroups)
        proc = await asyncio.create_subprocess_exec(*argv, stdin=pipe, stdout=pipe, stderr=pipe)
    else:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=pipe, stdout=pipe, stderr=pipe, user=user,
                                                    group=user, extra_groups=[])
    try:
        yield _Helper(proc)
    finally:
        await end_helper(proc)


def _bind(pid: int, kind: str, target: Path) -> None:
    target.touch()
    try:
        bind_mount(Path(f"/proc/{pid}/ns/{kind}"), target)
    except OSError:
        target.unlink()
        raise


async def _err(proc: asyncio.subprocess.Process) -> str:
    assert proc.stderr is not None
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), 2)
    try:
        data = await asyncio.wait_for(proc.stderr.read(), 2)
    except TimeoutError:
        data = b""
    text = " ".join(data.decode(errors="replace").split())
    return text or f"exit status {proc.returncode}"


def release(ns: SandboxNamespaces, owners: OwnerPool) -> None:
    try:
        ns.close()
    finally:
        owners.give(ns.owner)


def require_tools() -> list[str]:
    """Tools the namespaces need that this host lacks (Debian packages named)."""
    missing = [f"{t} (util-linux)" for t in ("prlimit", "unshare", "nsenter") if shutil.which(t) is None]
    from contree.engine.runtime.hostcheck import find_binary

    if find_binary("iptables-restore") is None:
        missing.append("iptables-restore (iptables)")
    if find_binary("ip") is None:
        missing.append("ip (iproute2)")
    return missing
