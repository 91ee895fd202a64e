"""The root engine's sandbox networks (RUNTIME §10): veth + NAT + filter, slirp4netns + egress filter, or
loopback only (the namespaces themselves: netns.py).

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
import ipaddress
import logging
import os
import random
import re
import shutil
from pathlib import Path

from contree.engine.runtime.netns import (
    BLOCKED_RANGES,
    InterfaceCounters,
    NetConfigured,
    NetworkError,
    NetworkInfo,
    SandboxNetwork,
    delete_netns,
    delete_netns_prefixed,
    make_owned_netns,
    namespace_counters,
    run_tool,
    slirp4netns_ready,
)
from contree.engine.runtime.paths import IPAM_DIR, NETNS_DIR, TAG_DIR
from contree.fsutil import try_lock

log = logging.getLogger(__name__)

_CHAIN_RE = re.compile(r"\bCT-([0-9a-f]{4})-(FWD|RET|IN|NAT|OUT)\b")
SLIRP_CONFIG = {"ip4": "10.0.2.100/24", "gw": "10.0.2.2", "nameserver": "10.0.2.3"}
DEFAULT_SUBNET = "10.231.0.0/16"

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


def _unified_root() -> Path:
    """The cgroup2 mount: `/sys/fs/cgroup` on v2 hosts, `/sys/fs/cgroup/unified` on hybrid ones."""
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                return Path(left.split()[4])
    raise NetworkError("no cgroup2 hierarchy is mounted: the slirp egress filter needs one")


def _rmdir_quiet(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


async def sweep_dead_rules(own: str | None = None) -> list[str]:
    """Remove the iptables rules and chains of engine instances that died without closing.

    A tag whose lock file nobody holds has no live owner; `own` is the tag the caller just locked, so
    anything already under it was left by a dead previous holder. Jumps from built-in chains are found
    in `iptables-save` output and deleted as they were written, then the instance's own chains.
    """
    try:
        saved = await run_tool("iptables-save")
    except (NetworkError, OSError):
        return []
    tags = {m.group(1) for m in _CHAIN_RE.finditer(saved)}
    removed = []
    for tag in sorted(tags):
        fd = -1
        if tag != own:
            fd = try_lock(TAG_DIR / f"{tag}.lock", make_parents=True)
            if fd < 0:
                continue  # alive
        try:
            text = _deletion_script(saved, tag)
            delete_netns_prefixed(f"contree-{tag}-")
            with contextlib.suppress(NetworkError):
                _rmdir_quiet(_unified_root() / f"contree-net-{tag}")
            try:
                await run_tool("iptables-restore", "-n", stdin=text)
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
            fd = try_lock(TAG_DIR / f"{self.tag}.lock", make_parents=True)
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
            await run_tool("iptables-restore", "-n", stdin="\n".join(
                ["*filter", *self._egress_rules(), *flt_jumps, "COMMIT", ""]))
            self._rules_installed = True
            return
        text = "\n".join([
            "*filter", *self._filter_rules(), *flt_jumps, "COMMIT",
            "*nat", f":{c}-NAT - [0:0]", f"-A {c}-NAT ! -d {self.subnet} -j MASQUERADE", *nat_jumps, "COMMIT",
            "",
        ])
        await run_tool("iptables-restore", "-n", stdin=text)
        self._rules_installed = True

    async def close(self) -> None:
        if not self._rules_installed:
            return
        flt_jumps, nat_jumps = self._jumps("-D")
        c = self.chain
        if self.mode == "slirp":
            await run_tool("iptables-restore", "-n", stdin="\n".join(
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
        await run_tool("iptables-restore", "-n", stdin=text)
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
            fd = try_lock(path)
            if fd < 0:
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
                await run_tool("ip", "link", "del", host_if)
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
                await run_tool("ip", "-b", "-", stdin="\n".join([
                    *([] if net.userns_path else [f"netns add {netns}"]),
                    f"link add {host_if} type veth peer name eth0 netns {netns}",
                    f"addr add {host_ip}/30 dev {host_if}",
                    # No IPv6 link-local address: the filter is IPv4 only, so the host must not be
                    # reachable over IPv6 on this link at all.
                    f"link set {host_if} addrgenmode none",
                    f"link set {host_if} up", ""]))
                await run_tool("ip", "-n", netns, "-b", "-", stdin="\n".join([
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
            await run_tool("ip", "netns", "add", netns)
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
