"""Network namespaces: what every network mode of the runtime shares (root's NAT and slirp4netns in
network.py, the rootless engine's slirp4netns/pasta in rootless/network.py).

A sandbox's network is a `SandboxNetwork` (its namespace, the user namespace owning it, the host end of
its link, its resolv.conf) described to the API as a `NetworkInfo`. The plumbing: namespaces kept by bind
mounts under `/run/netns` (owned, under user namespaces, by a user namespace of its own under
`/run/contree-engine/userns`: only then may the sandbox mount a sysfs that shows its own interfaces),
their deletion without a process, interface counters read from inside, helper processes, and the ranges
no sandbox may reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import threading
from pathlib import Path

import msgspec

from contree.engine.runtime.paths import NETNS_DIR, USERNS_DIR
from contree.engine.runtime.userns import write_id_maps
from contree.engine.storage.overlay import bind_mount

log = logging.getLogger(__name__)

# Destinations a sandbox must never reach (besides the host itself, handled by INPUT).
BLOCKED_RANGES = [
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
]

_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class InterfaceCounters(msgspec.Struct, kw_only=True):
    name: str
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0


class NetConfigured(msgspec.Struct, kw_only=True):
    ip4: str | None = None
    gw: str | None = None
    nameserver: str | None = None


class NetworkInfo(msgspec.Struct, kw_only=True):
    mode: str  # "nat" | "slirp" | "none"
    interfaces: list[InterfaceCounters] = msgspec.field(default_factory=list)
    configured: NetConfigured = msgspec.field(default_factory=NetConfigured)
    error: str | None = None


class NetworkError(RuntimeError):
    pass


async def run_tool(*argv: str, stdin: str | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    if proc.returncode != 0:
        raise NetworkError(f"{' '.join(argv[:3])} failed: {err.decode(errors='replace').strip()}")
    return out.decode()


_CLONE_NEWNET = 0x40000000
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


def parse_net_dev(text: str) -> list[InterfaceCounters]:
    out = []
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(":")
        f = rest.split()
        if len(f) >= 10:
            out.append(InterfaceCounters(name=name.strip(), rx_bytes=int(f[0]), rx_packets=int(f[1]),
                                         tx_bytes=int(f[8]), tx_packets=int(f[9])))
    return out


def netns_counters(netns_path: str) -> list[InterfaceCounters]:
    """/proc/net/dev of another network namespace, read by a short-lived thread that joins it (a pool
    thread must never be left in a foreign namespace)."""
    result: list[object] = []

    def inside() -> None:
        target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(target, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            with open("/proc/thread-self/net/dev") as fh:
                result.append(fh.read())
        except OSError as exc:
            result.append(exc)
        finally:
            os.close(target)

    t = threading.Thread(target=inside, name="netns-counters")
    t.start()
    t.join()
    got = result[0] if result else OSError("no result")
    if isinstance(got, BaseException):
        raise got
    assert isinstance(got, str)
    return parse_net_dev(got)


def delete_netns_prefixed(prefix: str) -> None:
    for where in (NETNS_DIR, USERNS_DIR):
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(where):
                if name.startswith(prefix):
                    delete_netns(name)


def delete_netns(name: str) -> None:
    """`ip netns del` without a process: detach the bind mounts that keep the namespace (and the user
    namespace that owns it, if any) alive."""
    for path in (NETNS_DIR / name, USERNS_DIR / name):
        if _libc.umount2(str(path).encode(), _MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
                log.warning("umount %s: %s", path, os.strerror(err))
        try:
            path.unlink()
        except FileNotFoundError:
            pass


async def make_owned_netns(name: str, base: int, gid_base: int, size: int) -> str:
    """A network namespace `NETNS_DIR/<name>` owned by a fresh user namespace that maps container ids
    0..size-1 to host uids base.. and gids gid_base..; returns that user namespace's file
    (`USERNS_DIR/<name>`).

    A helper (`unshare -U -n sh`, util-linux) creates both and waits while we write its id maps and
    bind its namespaces to the two files; `unshare --map-users` would go through newuidmap, which
    /etc/subuid does not allow."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise NetworkError("unshare not found: install the Debian package util-linux")
    proc = await asyncio.create_subprocess_exec(
        unshare, "--user", "--net", "--", "/bin/sh", "-c", "echo ready; read x",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        if await asyncio.wait_for(proc.stdout.readline(), 10) != b"ready\n":
            err = (await proc.stderr.read()).decode(errors="replace").strip()
            raise NetworkError(f"cannot create the sandbox's user and network namespaces: {err}")
        write_id_maps(proc.pid, base, gid_base, size)
        for ns, target in (("net", NETNS_DIR / name), ("user", USERNS_DIR / name)):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
            try:
                bind_mount(Path(f"/proc/{proc.pid}/ns/{ns}"), target)
            except OSError as exc:
                raise NetworkError(f"cannot keep the {ns} namespace at {target}: {exc.strerror}") from exc
    except BaseException:
        delete_netns(name)
        raise
    finally:
        await end_helper(proc)
    return str(USERNS_DIR / name)


async def end_helper(proc: asyncio.subprocess.Process, patience: float = 5.0) -> None:
    """Close the stdin a namespace helper waits on and reap it (killed if it does not go)."""
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), patience)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def slirp4netns_ready(ready_r: int, proc: asyncio.subprocess.Process, patience: float = 10.0) -> None:
    """Wait for the byte slirp4netns writes on its ready fd once the tap is up; NetworkError with its
    stderr when it ends without it."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bytes] = loop.create_future()
    os.set_blocking(ready_r, False)

    def readable() -> None:
        if not fut.done():
            try:
                fut.set_result(os.read(ready_r, 1))
            except BlockingIOError:
                return
    loop.add_reader(ready_r, readable)
    try:
        got = await asyncio.wait_for(fut, patience)
    finally:
        loop.remove_reader(ready_r)
    if got != b"1":
        err = b""
        if proc.stderr is not None:
            with contextlib.suppress(TimeoutError):
                err = await asyncio.wait_for(proc.stderr.read(), 2)
        lines = [ln for ln in err.decode(errors="replace").splitlines() if "to syslog" not in ln]
        raise NetworkError(f"slirp4netns failed: {' '.join(' '.join(lines).split())}")


def namespace_counters(net: SandboxNetwork) -> list[InterfaceCounters] | None:
    """The sandbox's interfaces read inside its network namespace; None when it cannot be entered."""
    if net.netns_path and os.path.exists(net.netns_path):
        try:
            return netns_counters(net.netns_path)
        except OSError as exc:
            log.debug("counters of %s: %s", net.netns_path, exc)
    return None


class SandboxNetwork(msgspec.Struct, kw_only=True):
    """What `setup` prepared for one sandbox; hand to `teardown` exactly once."""
    info: NetworkInfo
    netns_path: str | None = None  # None: let the runtime create a fresh netns (only `lo`)
    netns_name: str | None = None
    userns_path: str | None = None  # the user namespace that owns netns_path: the sandbox joins both
    host_if: str | None = None
    resolv_conf: str = ""
    slot: object | None = None  # Slot, kept opaque for msgspec
    helper: object | None = None  # slirp4netns: (asyncio process, exit-fd write end)
