"""Per-sandbox network namespaces (RUNTIME §10): veth + NAT + filter, or loopback only.

Never the host network namespace. With NAT, a sandbox reaches the outside world but not the host's own
services (INPUT is rejected for packets from our veths) nor loopback, link-local, CGNAT or private
ranges (FORWARD rejects them), except DNS to the host's resolver.

Every engine instance owns iptables chains named after its random tag (`CT-<tag>-…`), matched on its
veth name prefix, so concurrent instances on one host never share or remove each other's rules. A tag is
held through an flock under `/run/contree-engine/tags/`; chains whose tag nobody holds belong to a dead
instance and are removed by the next instance that starts (`sweep_dead_rules`).
Addresses are /30s of a configurable /16; a slot is owned through an flock on a lock file under
`/run/contree-engine/ipam/`, which the kernel releases if the process dies, so concurrent instances
never collide and a crashed instance's slots become reusable (its leftover veth/netns are removed then).
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import ipaddress
import logging
import os
import random
import re
import shutil
from pathlib import Path

import msgspec

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
IPAM_DIR = Path("/run/contree-engine/ipam")
TAG_DIR = Path("/run/contree-engine/tags")
_CHAIN_RE = re.compile(r"\bCT-([0-9a-f]{4})-(FWD|RET|IN|NAT)\b")
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
    mode: str  # "nat" | "none"
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


async def sweep_dead_rules(keep: str | None = None) -> list[str]:
    """Remove the iptables rules and chains of engine instances that died without closing.

    A tag whose lock file nobody holds has no live owner. Jumps from built-in chains are found in
    `iptables-save` output and deleted as they were written, then the instance's own chains.
    """
    try:
        saved = await _run("iptables-save")
    except (NetworkError, OSError):
        return []
    tags = {m.group(1) for m in _CHAIN_RE.finditer(saved)} - {keep}
    removed = []
    for tag in sorted(tags):
        fd = _try_lock(TAG_DIR / f"{tag}.lock")
        if fd < 0:
            continue  # alive
        try:
            text = _deletion_script(saved, tag)
            try:
                await _run("iptables-restore", "-n", stdin=text)
                removed.append(f"removed iptables chains CT-{tag}-*")
            except NetworkError as exc:
                log.warning("could not remove the dead engine's chains CT-%s-*: %s", tag, exc)
        finally:
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
    """`ip netns del` without a process: detach the bind mount that keeps the namespace alive."""
    path = NETNS_DIR / name
    if _libc.umount2(str(path).encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            log.warning("umount %s: %s", path, os.strerror(err))
    try:
        path.unlink()
    except FileNotFoundError:
        pass


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
    host_if: str | None = None
    resolv_conf: str = ""
    slot: object | None = None  # Slot, kept opaque for msgspec


class NetworkManager:
    def __init__(self, mode: str, *, subnet: str = DEFAULT_SUBNET, ipam_dir: Path = IPAM_DIR,
                 error: str | None = None) -> None:
        self.mode = mode  # "nat" or "none"
        self.subnet = ipaddress.ip_network(subnet)
        if self.subnet.version != 4 or self.subnet.prefixlen > 29:
            raise ValueError("the sandbox subnet must be an IPv4 network of /29 or larger")
        self.ipam_dir = ipam_dir / str(self.subnet).replace("/", "_")
        self.error = error  # why networking is unavailable (mode "none" after "auto")
        self.tag = f"{random.getrandbits(16):04x}"
        self.chain = f"CT-{self.tag}"
        self.if_prefix = f"ct{self.tag}"
        self.resolvers = [r for r in host_resolvers()]
        self._rules_installed = False
        self._tag_fd = -1

    # ---- engine-level setup ----

    @classmethod
    async def create(cls, mode: str = "auto", *, subnet: str = DEFAULT_SUBNET,
                     ipam_dir: Path = IPAM_DIR) -> NetworkManager:
        if mode not in ("auto", "nat", "none", "slirp"):
            raise ValueError(f"unknown network mode {mode!r}")
        if mode == "none":
            return cls("none", subnet=subnet, ipam_dir=ipam_dir,
                       error="networking is disabled by the operator (--network none)")
        problem = None
        if mode == "slirp":
            problem = "the slirp4netns network mode is not implemented yet; use nat"
        elif os.geteuid() != 0:
            problem = "veth + NAT networking needs root"
        else:
            missing = missing_tools()
            if missing:
                problem = "missing " + ", ".join(missing) + " (install the Debian packages iproute2 iptables)"
        if problem:
            if mode == "nat" or mode == "slirp":
                raise NetworkError(problem)
            return cls("none", subnet=subnet, ipam_dir=ipam_dir, error=problem)
        mgr = cls("nat", subnet=subnet, ipam_dir=ipam_dir)
        try:
            mgr._claim_tag()
            await sweep_dead_rules(keep=mgr.tag)
            await mgr._install_rules()
        except (NetworkError, OSError) as exc:
            mgr._release_tag()
            if mode == "nat":
                raise
            return cls("none", subnet=subnet, ipam_dir=ipam_dir, error=f"NAT setup failed: {exc}")
        return mgr

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

    def _jumps(self, op: str) -> tuple[list[str], list[str]]:
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
        text = "\n".join([
            "*filter", *flt_jumps, *(f"-F {c}-{s}" for s in ("FWD", "RET", "IN")),
            *(f"-X {c}-{s}" for s in ("FWD", "RET", "IN")), "COMMIT",
            "*nat", *nat_jumps, f"-F {c}-NAT", f"-X {c}-NAT", "COMMIT", "",
        ])
        await _run("iptables-restore", "-n", stdin=text)
        self._rules_installed = False
        self._release_tag()

    def chains(self) -> list[str]:
        return [f"{self.chain}-{s}" for s in ("FWD", "RET", "IN", "NAT")]

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
        if (NETNS_DIR / netns).exists():
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
                await _run("ip", "-b", "-", stdin="\n".join([
                    f"netns add {netns}",
                    f"link add {host_if} type veth peer name eth0 netns {netns}",
                    f"addr add {host_ip}/30 dev {host_if}",
                    f"link set {host_if} up", ""]))
                await _run("ip", "-n", netns, "-b", "-", stdin="\n".join([
                    f"addr add {sbx_ip}/30 dev eth0", "link set eth0 up", "link set lo up",
                    f"route add default via {host_ip}", ""]))
            except NetworkError:
                await self.teardown(net)
                raise
            return net
        except BaseException:
            slot.release()
            raise

    def counters(self, net: SandboxNetwork) -> list[InterfaceCounters]:
        """eth0 as the sandbox sees it: the host end's counters with rx/tx swapped."""
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
        if net.netns_name:
            net.info.interfaces = self.counters(net) or net.info.interfaces
            # The veth pair dies with the namespace (asynchronously); the slot's next owner removes
            # the host end if it is still there (`_remove_stale`), so nothing waits here.
            delete_netns(net.netns_name)
            net.netns_name = None
        if isinstance(net.slot, Slot):
            net.slot.release()
            net.slot = None
