"""Per-sandbox network namespaces (RUNTIME §10): veth + NAT + filter, slirp4netns + egress filter, or
loopback only.

Never the host network namespace. With NAT, a sandbox reaches the outside world but not the host's own
services (INPUT is rejected for packets from our veths) nor loopback, link-local, CGNAT or private
ranges (FORWARD rejects them), except DNS to the host's resolver.

Every engine instance owns iptables chains named after its random tag (`CT-<tag>-…`), matched on its
veth name prefix, so concurrent instances on one host never share or remove each other's rules. A tag is
held through an flock under `/run/contree-engine/tags/`; chains whose tag nobody holds belong to a dead
instance and are removed by the next instance that starts (`sweep_dead_rules`).
slirp4netns opens the sandbox's sockets as a host process, so it runs in a cgroup of its own
(`contree-net-<tag>` in the unified hierarchy) and an OUTPUT chain matched with `-m cgroup --path` refuses
the host itself (anything routed via `lo`) and private ranges, like the NAT filter.

With user namespaces, a sandbox's netns is owned by a user namespace of its own (the engine's id
mapping), which the sandbox then joins: only then may it mount a sysfs that shows its own interfaces. A
netns owned by the host's user namespace makes the runtime bind the host's /sys instead, which shows
the host's interfaces and cgroup tree (the sandbox's own `lo` only netns, made by the runtime, always
was owned by the sandbox).

Addresses are /30s of a configurable /16; a slot is owned through an flock on a lock file under
`/run/contree-engine/ipam/`, which the kernel releases if the process dies, so concurrent instances
never collide and a crashed instance's slots become reusable (its leftover veth/netns are removed then).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import ipaddress
import logging
import os
import random
import re
import shutil
import threading
from pathlib import Path

import msgspec

from contree.engine.overlay import bind_mount
from contree.engine.userns import write_id_maps

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
USERNS_DIR = Path("/run/contree-engine/userns")  # the owner of `NETNS_DIR/<name>` is `USERNS_DIR/<name>`
IPAM_DIR = Path("/run/contree-engine/ipam")
TAG_DIR = Path("/run/contree-engine/tags")
_CHAIN_RE = re.compile(r"\bCT-([0-9a-f]{4})-(FWD|RET|IN|NAT|OUT)\b")
SLIRP_CONFIG = {"ip4": "10.0.2.100/24", "gw": "10.0.2.2", "nameserver": "10.0.2.3"}
DEFAULT_SUBNET = "10.231.0.0/16"

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


async def _run(*argv: str, stdin: str | None = None) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    if proc.returncode != 0:
        raise NetworkError(f"{' '.join(argv[:3])} failed: {err.decode(errors='replace').strip()}")
    return out.decode()


def host_resolvers(path: Path = Path("/etc/resolv.conf")) -> list[str]:
    found = []
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                try:
                    if ipaddress.ip_address(parts[1]).version == 4:
                        found.append(parts[1])
                except ValueError:
                    continue
    except OSError:
        pass
    return found


def missing_tools() -> list[str]:
    return [b for b in ("ip", "iptables-restore") if shutil.which(b) is None]


def _enable_forwarding() -> None:
    fwd = Path("/proc/sys/net/ipv4/ip_forward")
    if fwd.read_text().strip() != "1":
        fwd.write_text("1")
        log.warning("enabled net.ipv4.ip_forward for sandbox NAT networking")


def _link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


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


def _unified_root() -> Path:
    """The cgroup2 mount: `/sys/fs/cgroup` on v2 hosts, `/sys/fs/cgroup/unified` on hybrid ones."""
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                return Path(left.split()[4])
    raise NetworkError("no cgroup2 hierarchy is mounted: the slirp egress filter needs one")


def _delete_netns_prefixed(prefix: str) -> None:
    for where in (NETNS_DIR, USERNS_DIR):
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(where):
                if name.startswith(prefix):
                    delete_netns(name)


def _rmdir_quiet(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def _try_lock(path: Path) -> int:
    """An flock'ed fd on `path`, or -1 when a live process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return -1
    return fd


async def sweep_dead_rules(own: str | None = None) -> list[str]:
    """Remove the iptables rules and chains of engine instances that died without closing.

    A tag whose lock file nobody holds has no live owner; `own` is the tag the caller just locked, so
    anything already under it was left by a dead previous holder. Jumps from built-in chains are found
    in `iptables-save` output and deleted as they were written, then the instance's own chains.
    """
    try:
        saved = await _run("iptables-save")
    except (NetworkError, OSError):
        return []
    tags = {m.group(1) for m in _CHAIN_RE.finditer(saved)}
    removed = []
    for tag in sorted(tags):
        fd = -1
        if tag != own:
            fd = _try_lock(TAG_DIR / f"{tag}.lock")
            if fd < 0:
                continue  # alive
        try:
            text = _deletion_script(saved, tag)
            _delete_netns_prefixed(f"contree-{tag}-")
            with contextlib.suppress(NetworkError):
                _rmdir_quiet(_unified_root() / f"contree-net-{tag}")
            try:
                await _run("iptables-restore", "-n", stdin=text)
                removed.append(f"removed iptables chains CT-{tag}-*")
            except NetworkError as exc:
                log.warning("could not remove the dead engine's chains CT-%s-*: %s", tag, exc)
        finally:
            if fd >= 0:
                os.close(fd)
    if removed:
        log.warning("%s", "; ".join(removed))
    return removed


def _deletion_script(saved: str, tag: str) -> str:
    out: list[str] = []
    table = None
    jumps: list[str] = []
    chains: list[str] = []
    for line in [*saved.splitlines(), "*end"]:
        if line.startswith("*"):
            if table is not None and (jumps or chains):
                out += [f"*{table}", *jumps, *(f"-F {c}" for c in chains), *(f"-X {c}" for c in chains),
                        "COMMIT"]
            table, jumps, chains = line[1:], [], []
        elif line.startswith(f":CT-{tag}-"):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A ") and f"-j CT-{tag}-" in line and not line.startswith(f"-A CT-{tag}-"):
            jumps.append("-D " + line[3:])
    return "\n".join([*out, ""])


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


class Slot:
    """One /30 of the pool, held through an flock for as long as the sandbox lives."""

    def __init__(self, index: int, fd: int, lock_path: Path) -> None:
        self.index = index
        self.fd = fd
        self.lock_path = lock_path

    def release(self) -> None:
        # The file keeps naming the netns and veth: the next owner removes them if they linger.
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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


class NetworkManager:
    def __init__(self, mode: str, *, subnet: str = DEFAULT_SUBNET, ipam_dir: Path = IPAM_DIR,
                 error: str | None = None) -> None:
        self.mode = mode  # "nat", "slirp" or "none"
        self.subnet = ipaddress.ip_network(subnet)
        if self.subnet.version != 4 or self.subnet.prefixlen > 29:
            raise ValueError("the sandbox subnet must be an IPv4 network of /29 or larger")
        self.ipam_dir = ipam_dir / str(self.subnet).replace("/", "_")
        self.error = error  # why networking is unavailable (mode "none" after "auto")
        self.tag = f"{random.getrandbits(16):04x}"
        self.chain = f"CT-{self.tag}"
        self.if_prefix = f"ct{self.tag}"
        # A loopback resolver (systemd-resolved's 127.0.0.53) would be the sandbox's own lo.
        self.resolvers = [r for r in host_resolvers() if not ipaddress.ip_address(r).is_loopback]
        self._rules_installed = False
        self._tag_fd = -1
        self._seq = 0
        self.egress_cgroup: Path | None = None  # slirp mode
        # (uid base, gid base, size) when sandboxes run in a user namespace: each netns is then owned by
        # one of its own.
        self.userns_map: tuple[int, int, int] | None = None

    # ---- engine-level setup ----

    @classmethod
    async def create(cls, mode: str = "auto", *, subnet: str = DEFAULT_SUBNET,
                     ipam_dir: Path = IPAM_DIR) -> NetworkManager:
        if mode not in ("auto", "nat", "none", "slirp"):
            raise ValueError(f"unknown network mode {mode!r}")
        if mode == "none":
            return cls("none", subnet=subnet, ipam_dir=ipam_dir,
                       error="networking is disabled by the operator (--network none)")
        errors: list[str] = []
        for candidate in (("nat", "slirp") if mode == "auto" else (mode,)):
            mgr = cls(candidate, subnet=subnet, ipam_dir=ipam_dir)
            try:
                await mgr._start()
                if errors:
                    log.warning("sandbox networking uses %s: %s", candidate, "; ".join(errors))
                return mgr
            except (NetworkError, OSError) as exc:
                mgr._release_tag()
                errors.append(f"{candidate}: {exc}")
        if mode != "auto":
            raise NetworkError(errors[0])
        return cls("none", subnet=subnet, ipam_dir=ipam_dir,
                   error="no sandbox network could be set up (" + "; ".join(errors) + ")")

    async def _start(self) -> None:
        if os.geteuid() != 0:
            raise NetworkError(f"{self.mode} networking needs root (rootless mode is not implemented yet)")
        missing = missing_tools() + (["slirp4netns"] if self.mode == "slirp" and
                                     shutil.which("slirp4netns") is None else [])
        if missing:
            raise NetworkError("missing " + ", ".join(missing) +
                               " (install the Debian packages iproute2 iptables slirp4netns)")
        self._claim_tag()
        await sweep_dead_rules(own=self.tag)
        if self.mode == "slirp":
            self.egress_cgroup = _unified_root() / f"contree-net-{self.tag}"
            self.egress_cgroup.mkdir(exist_ok=True)
        await self._install_rules()

    def _claim_tag(self) -> None:
        for _ in range(64):
            fd = _try_lock(TAG_DIR / f"{self.tag}.lock")
            if fd >= 0:
                self._tag_fd = fd
                self.chain, self.if_prefix = f"CT-{self.tag}", f"ct{self.tag}"
                return
            self.tag = f"{random.getrandbits(16):04x}"
        raise NetworkError("no free engine network tag")

    def _release_tag(self) -> None:
        # Lock files stay: unlinking one could let two processes lock different inodes of one name.
        if self._tag_fd >= 0:
            os.close(self._tag_fd)
            self._tag_fd = -1

    def _filter_rules(self) -> list[str]:
        c = self.chain
        rules = [f":{c}-FWD - [0:0]", f":{c}-RET - [0:0]", f":{c}-IN - [0:0]"]
        for r in self.resolvers:
            for proto in ("udp", "tcp"):
                rules.append(f"-A {c}-FWD -p {proto} -d {r}/32 --dport 53 -j ACCEPT")
        for net in [*BLOCKED_RANGES, *self._host_subnets()]:
            rules.append(f"-A {c}-FWD -d {net} -p tcp -j REJECT --reject-with tcp-reset")
            rules.append(f"-A {c}-FWD -d {net} -j REJECT --reject-with icmp-net-prohibited")
        rules.append(f"-A {c}-FWD -j ACCEPT")
        rules.append(f"-A {c}-RET -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT")
        rules.append(f"-A {c}-RET -j DROP")
        rules.append(f"-A {c}-IN -p tcp -j REJECT --reject-with tcp-reset")
        rules.append(f"-A {c}-IN -j REJECT --reject-with icmp-port-unreachable")
        return rules

    def _egress_rules(self) -> list[str]:
        c = self.chain
        rules = [f":{c}-OUT - [0:0]"]
        for r in self.resolvers:
            for proto in ("udp", "tcp"):
                rules.append(f"-A {c}-OUT -p {proto} -d {r}/32 --dport 53 -j ACCEPT")
        # Every address of the host itself is routed through lo, whatever its range.
        rules.append(f"-A {c}-OUT -o lo -p tcp -j REJECT --reject-with tcp-reset")
        rules.append(f"-A {c}-OUT -o lo -j REJECT --reject-with icmp-port-unreachable")
        for net in [*BLOCKED_RANGES, *self._host_subnets()]:
            rules.append(f"-A {c}-OUT -d {net} -p tcp -j REJECT --reject-with tcp-reset")
            rules.append(f"-A {c}-OUT -d {net} -j REJECT --reject-with icmp-net-prohibited")
        return rules

    def _jumps(self, op: str) -> tuple[list[str], list[str]]:
        if self.mode == "slirp":
            return [f"{op} OUTPUT -m cgroup --path contree-net-{self.tag} -j {self.chain}-OUT"], []
        c, p = self.chain, self.if_prefix
        flt = [f"{op} FORWARD -i {p}+ -j {c}-FWD", f"{op} FORWARD -o {p}+ -j {c}-RET",
               f"{op} INPUT -i {p}+ -j {c}-IN"]
        nat = [f"{op} POSTROUTING -s {self.subnet} -j {c}-NAT"]
        return flt, nat

    @staticmethod
    def _host_subnets() -> list[str]:
        """The host's own IPv4 networks (e.g. the eth0 LAN), read from the kernel's routing table."""
        nets = set()
        try:
            with open("/proc/net/route") as fh:
                next(fh)
                for line in fh:
                    f = line.split()
                    dest, mask, flags = int(f[1], 16), int(f[7], 16), int(f[3], 16)
                    if dest == 0 or flags & 0x2:  # default route / via a gateway
                        continue
                    net = ipaddress.ip_network(
                        (ipaddress.IPv4Address(dest.to_bytes(4, "little")),
                         bin(mask).count("1")), strict=False)
                    nets.add(str(net))
        except (OSError, StopIteration, ValueError):
            pass
        return sorted(nets)

    async def _install_rules(self) -> None:
        _enable_forwarding()
        flt_jumps, nat_jumps = self._jumps("-I")
        c = self.chain
        if self.mode == "slirp":
            await _run("iptables-restore", "-n", stdin="\n".join(
                ["*filter", *self._egress_rules(), *flt_jumps, "COMMIT", ""]))
            self._rules_installed = True
            return
        text = "\n".join([
            "*filter", *self._filter_rules(), *flt_jumps, "COMMIT",
            "*nat", f":{c}-NAT - [0:0]", f"-A {c}-NAT ! -d {self.subnet} -j MASQUERADE", *nat_jumps, "COMMIT",
            "",
        ])
        await _run("iptables-restore", "-n", stdin=text)
        self._rules_installed = True

    async def close(self) -> None:
        if not self._rules_installed:
            return
        flt_jumps, nat_jumps = self._jumps("-D")
        c = self.chain
        if self.mode == "slirp":
            await _run("iptables-restore", "-n", stdin="\n".join(
                ["*filter", *flt_jumps, f"-F {c}-OUT", f"-X {c}-OUT", "COMMIT", ""]))
            self._rules_installed = False
            self._release_tag()
            if self.egress_cgroup is not None:
                _rmdir_quiet(self.egress_cgroup)
            return
        text = "\n".join([
            "*filter", *flt_jumps, *(f"-F {c}-{s}" for s in ("FWD", "RET", "IN")),
            *(f"-X {c}-{s}" for s in ("FWD", "RET", "IN")), "COMMIT",
            "*nat", *nat_jumps, f"-F {c}-NAT", f"-X {c}-NAT", "COMMIT", "",
        ])
        await _run("iptables-restore", "-n", stdin=text)
        self._rules_installed = False
        self._release_tag()

    def chains(self) -> list[str]:
        return [f"{self.chain}-{s}" for s in ("FWD", "RET", "IN", "NAT", "OUT")]

    # ---- address pool ----

    def _slot_count(self) -> int:
        return self.subnet.num_addresses // 4

    async def _acquire_slot(self) -> tuple[Slot, str]:
        self.ipam_dir.mkdir(parents=True, exist_ok=True)
        n = self._slot_count()
        start = random.randrange(1, n)
        for k in range(n - 1):
            index = 1 + (start - 1 + k) % (n - 1)
            path = self.ipam_dir / f"{index}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            stale = os.pread(fd, 4096, 0).decode(errors="replace").split()
            return Slot(index, fd, path), " ".join(stale)
        raise NetworkError(f"no free /30 left in {self.subnet}")

    async def _remove_stale(self, stale: str) -> None:
        """A slot's previous owner died without cleaning up: remove its netns and veth."""
        parts = stale.split()
        if len(parts) != 2:
            return
        netns, host_if = parts
        delete_netns(netns)
        if _link_exists(host_if):
            try:
                await _run("ip", "link", "del", host_if)
            except NetworkError as exc:
                log.warning("stale veth %s: %s", host_if, exc)

    # ---- per sandbox ----

    def _resolv_conf(self) -> str:
        return "".join(f"nameserver {r}\n" for r in self.resolvers[:3])

    async def setup(self, enabled: bool) -> SandboxNetwork:
        if not enabled:
            return SandboxNetwork(info=NetworkInfo(mode="none"))
        if self.mode == "slirp":
            return await self._setup_slirp()
        if self.mode != "nat":
            return SandboxNetwork(info=NetworkInfo(mode="none", error=self.error))
        slot, stale = await self._acquire_slot()
        try:
            if stale:
                await self._remove_stale(stale)
            base = int(self.subnet.network_address) + 4 * slot.index
            host_ip, sbx_ip = ipaddress.IPv4Address(base + 1), ipaddress.IPv4Address(base + 2)
            netns = f"contree-{self.tag}-{slot.index}"
            host_if = f"{self.if_prefix}{slot.index:04x}"
            os.ftruncate(slot.fd, 0)
            os.pwrite(slot.fd, f"{netns} {host_if}\n".encode(), 0)
            net = SandboxNetwork(
                info=NetworkInfo(mode="nat", configured=NetConfigured(
                    ip4=f"{sbx_ip}/30", gw=str(host_ip),
                    nameserver=self.resolvers[0] if self.resolvers else None)),
                netns_path=str(NETNS_DIR / netns), netns_name=netns, host_if=host_if,
                resolv_conf=self._resolv_conf(), slot=slot)
            try:
                if self.userns_map is not None:
                    net.userns_path = await make_owned_netns(netns, *self.userns_map)
                await _run("ip", "-b", "-", stdin="\n".join([
                    *([] if net.userns_path else [f"netns add {netns}"]),
                    f"link add {host_if} type veth peer name eth0 netns {netns}",
                    f"addr add {host_ip}/30 dev {host_if}",
                    # No IPv6 link-local address: the filter is IPv4 only, so the host must not be
                    # reachable over IPv6 on this link at all.
                    f"link set {host_if} addrgenmode none",
                    f"link set {host_if} up", ""]))
                await _run("ip", "-n", netns, "-b", "-", stdin="\n".join([
                    f"addr add {sbx_ip}/30 dev eth0", "link set eth0 addrgenmode none", "link set eth0 up",
                    "link set lo up",
                    f"route add default via {host_ip}", ""]))
            except BaseException:  # a cancel too (a spare is set up during an engine's shutdown)
                await self.teardown(net)
                raise
            return net
        except BaseException:
            slot.release()
            raise

    async def _setup_slirp(self) -> SandboxNetwork:
        assert self.egress_cgroup is not None
        self._seq += 1
        netns = f"contree-{self.tag}-s{self._seq}"
        userns_path = None
        if self.userns_map is not None:
            userns_path = await make_owned_netns(netns, *self.userns_map)
        else:
            await _run("ip", "netns", "add", netns)
        net = SandboxNetwork(
            info=NetworkInfo(mode="slirp", configured=NetConfigured(**SLIRP_CONFIG)),
            netns_path=str(NETNS_DIR / netns), netns_name=netns, userns_path=userns_path,
            resolv_conf=f"nameserver {SLIRP_CONFIG['nameserver']}\n")
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        exit_r, exit_w = os.pipe2(os.O_CLOEXEC)
        try:
            # The helper joins the egress cgroup before exec'ing slirp4netns, so every socket it ever
            # opens is matched by the OUTPUT filter.
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.egress_cgroup / "cgroup.procs"),
                shutil.which("slirp4netns") or "slirp4netns", "--configure", "--mtu=65520",
                "--disable-host-loopback", "--netns-type=path", f"--ready-fd={ready_w}",
                f"--exit-fd={exit_r}", net.netns_path or "", "tap0",
                pass_fds=(ready_w, exit_r), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            net.helper = (proc, exit_w)
            os.close(ready_w)
            os.close(exit_r)
            ready_w = exit_r = -1
            await slirp4netns_ready(ready_r, proc)
            return net
        except BaseException:
            await self.teardown(net)
            raise
        finally:
            for fd in (ready_r, ready_w, exit_r):
                if fd >= 0:
                    os.close(fd)

    def counters(self, net: SandboxNetwork) -> list[InterfaceCounters]:
        """Every interface as the sandbox sees it, read inside its namespace; for a veth whose
        namespace cannot be entered, the host end's counters with rx/tx swapped."""
        inside = namespace_counters(net)
        if inside is not None:
            return inside
        if not net.host_if:
            return []
        stats = Path(f"/sys/class/net/{net.host_if}/statistics")

        def rd(name: str) -> int:
            try:
                return int((stats / name).read_text())
            except (OSError, ValueError):
                return 0

        return [InterfaceCounters(name="eth0", rx_bytes=rd("tx_bytes"), tx_bytes=rd("rx_bytes"),
                                  rx_packets=rd("tx_packets"), tx_packets=rd("rx_packets"))]

    async def teardown(self, net: SandboxNetwork) -> None:
        """Idempotent: deleting the netns destroys the veth pair with it."""
        if isinstance(net.helper, tuple):
            proc, exit_w = net.helper
            net.helper = None
            os.close(exit_w)  # slirp4netns exits when its exit fd reaches EOF
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if net.netns_name:
            net.info.interfaces = self.counters(net) or net.info.interfaces
            # The veth pair dies with the namespace (asynchronously); the slot's next owner removes
            # the host end if it is still there (`_remove_stale`), so nothing waits here.
            delete_netns(net.netns_name)
            net.netns_name = None
        if isinstance(net.slot, Slot):
            net.slot.release()
            net.slot = None
