"""Sandbox networking: veth + NAT reaches an "outside" host the test creates in its own network namespace,
while the host's own services and private ranges are refused; `networking=False` gives only `lo`."""

from __future__ import annotations

import asyncio
import ctypes
import os
import random
import socket
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest

from contree.engine.runtime import netns
from contree.engine.runtime import network as netmod
from contree.engine.runtime.network import NetworkManager
from contree.engine.runtime.paths import NETNS_DIR, USERNS_DIR
from contree.engine.runtime.sandbox import SandboxRuntime, SandboxSpec
from tests.engine.test_runtime_support import open_runtime, require_runtime_prereqs, run

pytestmark = pytest.mark.engine

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture
async def runtime(mount_guard: Path) -> AsyncIterator[SandboxRuntime]:
    async with open_runtime(mount_guard, network_mode="nat") as rt:
        yield rt


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class OutsideHost:
    """A network namespace joined to the host by a veth pair: stands in for a machine on the internet."""

    def __init__(self, prefix: str) -> None:
        n = random.randrange(1, 63) * 4
        self.name = f"ctest-{uuid.uuid4().hex[:8]}"
        self.host_if = f"cto{uuid.uuid4().hex[:8]}"
        base = prefix.rsplit(".", 1)[0]
        self.host_ip, self.ip = f"{base}.{n + 1}", f"{base}.{n + 2}"
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", "eth0", "netns", self.name)
            _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            _ip("-n", self.name, "addr", "add", f"{self.ip}/30", "dev", "eth0")
            _ip("-n", self.name, "link", "set", "eth0", "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
            _ip("-n", self.name, "route", "add", "default", "via", self.host_ip)
        except BaseException:
            self.close()
            raise

    def socket(self) -> socket.socket:
        """A listening TCP socket inside the namespace (sockets keep the netns they were made in)."""
        result: list[socket.socket | BaseException] = []

        def make() -> None:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            target = os.open(NETNS_DIR / self.name, os.O_RDONLY)
            try:
                if _libc.setns(target, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
                try:
                    s = socket.socket()
                    s.bind((self.ip, 0))
                    s.listen()
                    result.append(s)
                finally:
                    _libc.setns(own, _CLONE_NEWNET)
            except BaseException as exc:
                result.append(exc)
            finally:
                os.close(own)
                os.close(target)

        t = threading.Thread(target=make)
        t.start()
        t.join()
        got = result[0]
        if isinstance(got, BaseException):
            raise got
        return got

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@pytest.fixture
def outside(runtime: SandboxRuntime) -> Iterator[OutsideHost]:
    # Created after the runtime: the filter treats networks already attached to the host as the host's.
    host = OutsideHost("198.51.100.0")
    yield host
    host.close()


class Banner:
    """A TCP server that greets and records the peer address of every connection."""

    def __init__(self) -> None:
        self.peers: list[str] = []
        self.server: asyncio.AbstractServer | None = None

    async def serve(self, sock: socket.socket | None = None, host: str = "127.0.0.1") -> int:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.peers.append(writer.get_extra_info("peername")[0])
            writer.write(b"hello-from-server\n")
            await writer.drain()
            writer.close()

        if sock is not None:
            self.server = await asyncio.start_server(on_conn, sock=sock)
        else:
            self.server = await asyncio.start_server(on_conn, host, 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def _probe(ip: str, port: int) -> str:
    return f"nc -w 3 {ip} {port} </dev/null && echo \" CONNECTED\" || echo \" FAILED\""


async def test_nat_reaches_an_outside_host_masqueraded(runtime: SandboxRuntime, rootfs: Path,
                                                       outside: OutsideHost) -> None:
    banner = Banner()
    port = await banner.serve(sock=outside.socket())
    try:
        r = await run(runtime, rootfs, _probe(outside.ip, port))
    finally:
        banner.close()
    assert "hello-from-server" in r.out and "CONNECTED" in r.out, r.out + r.err
    assert banner.peers == [outside.host_ip]  # MASQUERADE: the outside sees the host, not 10.231.x.x
    assert r.network.mode == "nat" and r.network.error is None
    assert r.network.configured.ip4 and r.network.configured.ip4.startswith("10.231.")
    eth0 = next(i for i in r.network.interfaces if i.name == "eth0")
    assert eth0.rx_bytes > 0 and eth0.tx_bytes > 0
    assert {i.name for i in r.network.interfaces} == {"lo", "eth0"}


async def test_host_services_are_refused(runtime: SandboxRuntime, rootfs: Path,
                                         outside: OutsideHost) -> None:
    loop_banner, any_banner = Banner(), Banner()
    loop_port = await loop_banner.serve(host="127.0.0.1")
    any_port = await any_banner.serve(host="0.0.0.0")
    try:
        # 127.0.0.1 is the sandbox's own loopback; the gateway and the host's other addresses hit INPUT.
        script = "; ".join([
            _probe("127.0.0.1", loop_port),
            "GW=$(ip route | awk '/default/ {print $3}')", _probe("$GW", any_port),
            _probe(outside.host_ip, any_port),
        ])
        r = await run(runtime, rootfs, script)
    finally:
        loop_banner.close()
        any_banner.close()
    assert r.out.count("FAILED") == 3 and "CONNECTED" not in r.out, r.out + r.err
    assert not loop_banner.peers and not any_banner.peers


async def test_private_ranges_are_not_forwarded(runtime: SandboxRuntime, rootfs: Path) -> None:
    private = OutsideHost("172.31.250.0")
    banner = Banner()
    try:
        port = await banner.serve(sock=private.socket())
        r = await run(runtime, rootfs, _probe(private.ip, port))
    finally:
        banner.close()
        private.close()
    assert "FAILED" in r.out and not banner.peers, r.out + r.err


async def test_networking_off_gives_only_loopback(runtime: SandboxRuntime, rootfs: Path) -> None:
    r = await run(runtime, rootfs, "ip -o link | cut -d: -f2", networking=False)
    assert r.out.split() == ["lo"]
    assert r.network.mode == "none" and r.network.error is None


async def test_resolv_conf_points_at_the_host_resolver(runtime: SandboxRuntime, rootfs: Path) -> None:
    r = await run(runtime, rootfs, "cat /etc/resolv.conf")
    resolvers = [x for x in netmod.host_resolvers() if not x.startswith("127.")]
    assert r.out == "".join(f"nameserver {x}\n" for x in resolvers[:3])
    assert r.network.configured.nameserver == (resolvers[0] if resolvers else None)


async def test_without_a_usable_network_the_run_has_lo_and_says_why(
        mount_guard: Path, rootfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netmod, "missing_tools", lambda: ["iptables-restore"])
    async with open_runtime(mount_guard, network_mode="auto") as rt:
        r = await run(rt, rootfs, "ip -o link | cut -d: -f2")
    assert r.out.split() == ["lo"]
    assert r.network.error and "iptables" in r.network.error


async def test_concurrent_managers_never_share_an_address(tmp_path: Path) -> None:
    require_runtime_prereqs()
    a = NetworkManager("nat", subnet="10.231.0.0/24", ipam_dir=tmp_path)
    b = NetworkManager("nat", subnet="10.231.0.0/24", ipam_dir=tmp_path)
    slots = []
    for _ in range(31):
        for mgr in (a, b):
            slot, _stale = await mgr._acquire_slot()
            slots.append(slot)
    slots.append((await a._acquire_slot())[0])  # 64 /30s in a /24, minus the network's first
    assert len({s.index for s in slots}) == 63 == len(slots)
    with pytest.raises(netns.NetworkError, match="no free"):
        await a._acquire_slot()
    slots.pop().release()
    again, _ = await b._acquire_slot()
    again.release()
    for s in slots:
        s.release()


async def test_a_dead_owners_netns_is_removed_when_its_slot_is_reused(tmp_path: Path) -> None:
    require_runtime_prereqs()
    mgr = NetworkManager("nat", subnet="10.231.0.0/29", ipam_dir=tmp_path)
    stale = f"ctest-{uuid.uuid4().hex[:8]}"
    _ip("netns", "add", stale)
    try:
        (mgr.ipam_dir).mkdir(parents=True, exist_ok=True)
        for index in range(1, 2):
            (mgr.ipam_dir / f"{index}.lock").write_text(f"{stale} ctnoneXXXX\n")
        slot, previous = await mgr._acquire_slot()
        await mgr._remove_stale(previous)
        slot.release()
        assert not (NETNS_DIR / stale).exists()
    finally:
        netns.delete_netns(stale)


def test_loopback_resolvers_are_not_handed_to_sandboxes(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\nnameserver 9.9.9.9\nnameserver ::1\n")
    real = netmod.host_resolvers
    monkeypatch.setattr(netmod, "host_resolvers", lambda: real(conf))
    assert NetworkManager("nat", ipam_dir=tmp_path).resolvers == ["9.9.9.9"]


def _chains() -> str:
    return subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout


async def test_rules_of_a_dead_instance_are_swept_and_live_ones_kept() -> None:
    require_runtime_prereqs()
    live = await NetworkManager.create("nat")
    dead = await NetworkManager.create("nat")
    try:
        os.close(dead._tag_fd)  # what the kernel does when the process dies without closing
        dead._tag_fd = -1
        assert f"{dead.chain}-FWD" in _chains()
        fresh = await NetworkManager.create("nat")
        await fresh.close()
        rules = _chains()
        assert f"{dead.chain}-" not in rules and f"-i {dead.if_prefix}+" not in rules
        assert f"{live.chain}-FWD" in rules and f"{live.chain}-NAT" in rules
    finally:
        await live.close()
    assert f"{live.chain}-" not in _chains()


async def test_slirp_reaches_outside_but_not_the_host_or_private_ranges(mount_guard: Path,
                                                                        rootfs: Path) -> None:
    async with open_runtime(mount_guard, network_mode="slirp") as rt:
        outside_host = OutsideHost("198.51.100.0")
        private = OutsideHost("172.31.251.0")
        out_banner, priv_banner, host_banner = Banner(), Banner(), Banner()
        try:
            out_port = await out_banner.serve(sock=outside_host.socket())
            priv_port = await priv_banner.serve(sock=private.socket())
            host_port = await host_banner.serve(host="0.0.0.0")
            r = await run(rt, rootfs, "; ".join([
                _probe(outside_host.ip, out_port), _probe(private.ip, priv_port),
                _probe("10.0.2.2", host_port), _probe(outside_host.host_ip, host_port)]))
        finally:
            for b in (out_banner, priv_banner, host_banner):
                b.close()
            outside_host.close()
            private.close()
        helpers = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).startswith("slirp4netns")
                   and f"contree-{rt.network.tag}-" in _cmdline(p)]
    assert r.out.startswith("hello-from-server\n CONNECTED\n"), r.out + r.err
    assert r.out.count("FAILED") == 3, r.out + r.err
    assert out_banner.peers == [outside_host.host_ip] and not priv_banner.peers and not host_banner.peers
    assert r.network.mode == "slirp" and r.network.configured.nameserver == "10.0.2.3"
    tap0 = next(i for i in r.network.interfaces if i.name == "tap0")
    assert tap0.rx_bytes > 0 and tap0.tx_bytes > 0
    assert helpers == [], "slirp4netns outlived its sandbox"


def _ip6_addrs(dev: str) -> str:
    return subprocess.run(["ip", "-6", "addr", "show", "dev", dev], capture_output=True, text=True,
                          check=True).stdout


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


async def test_the_veth_link_carries_no_ipv6_the_filter_does_not_cover(runtime: SandboxRuntime,
                                                                       rootfs: Path) -> None:
    sb_script = "ip -6 addr show dev eth0 | grep -c inet6; ip -6 route | grep -vc '^$'"
    r = await run(runtime, rootfs, f"{sb_script}; sleep 0.3")
    assert r.out.split()[0] == "0", r.out
    # Nor does the host end, checked on a live sandbox (the pair is gone after a run).
    sb = await runtime.start(SandboxSpec(sandbox_id="v6", rootfs=rootfs, argv=["sleep", "30"], stdin=False))
    try:
        host_if = sb._net.host_if
        assert host_if
        addrs = _ip6_addrs(host_if)
        assert "inet6" not in addrs, addrs
    finally:
        await sb.cleanup()


async def test_stale_rules_under_a_reclaimed_tag_are_replaced_not_doubled(
        monkeypatch: pytest.MonkeyPatch) -> None:
    require_runtime_prereqs()
    dead = await NetworkManager.create("nat")
    os.close(dead._tag_fd)  # died; its tag is free again
    dead._tag_fd = -1
    monkeypatch.setattr(netmod.random, "getrandbits", lambda bits: int(dead.tag, 16))
    again = await NetworkManager.create("nat")
    assert again.tag == dead.tag
    assert _chains().count(f"-A FORWARD -i {again.if_prefix}+ -j {again.chain}-FWD") == 1
    await again.close()
    assert f"{again.chain}-" not in _chains()


@pytest.mark.parametrize(("mode", "link"), [("nat", "eth0"), ("slirp", "tap0")])
async def test_sysfs_shows_the_sandboxes_own_network_not_the_hosts(mount_guard: Path, rootfs: Path,
                                                                   mode: str, link: str) -> None:
    """The prepared netns is owned by a user namespace of the sandbox's own, so the runtime mounts a
    sysfs for it; with a netns owned by the host's user namespace it would bind the host's /sys, which
    lists the host's interfaces and its cgroup tree (other sandboxes' names included)."""
    async with open_runtime(mount_guard, network_mode=mode) as rt:
        r = await run(rt, rootfs, "ls /sys/class/net; echo --; grep ' /sys ' /proc/self/mountinfo; echo --; "
                                  "find /sys/fs/cgroup -maxdepth 2 -name contree-engine")
    links, sysfs, cgroup_leak = r.out.split("--\n")
    assert sorted(links.split()) == sorted([link, "lo"]), r.out + r.err
    host = os.stat("/sys").st_dev
    assert f" {os.major(host)}:{os.minor(host)} " not in sysfs, f"the host's sysfs is bound: {sysfs}"
    assert cgroup_leak.strip() == "", f"the host's cgroup tree is visible: {cgroup_leak}"


async def test_a_cancelled_network_setup_leaves_nothing(mount_guard: Path) -> None:
    """A spare network is set up during a run's teardown, which an engine's shutdown may cancel at any
    point: nothing of it may stay."""
    async with open_runtime(mount_guard, network_mode="nat") as rt:
        for delay in (0.0, 0.001, 0.003, 0.006, 0.012):
            task = asyncio.ensure_future(rt.network.setup(True))
            await asyncio.sleep(delay)
            task.cancel()
            await asyncio.wait({task})
            if not task.cancelled() and task.exception() is None:
                await rt.network.teardown(task.result())  # it finished first: an ordinary teardown
            prefix = f"contree-{rt.network.tag}-"
            left = [n for d in (NETNS_DIR, USERNS_DIR) if d.is_dir()
                    for n in os.listdir(d) if n.startswith(prefix)]
            assert left == [], f"after a cancel at {delay * 1000:.0f} ms: {left}"


async def test_a_run_claims_the_spare_network_being_set_up(runtime: SandboxRuntime, rootfs: Path) -> None:
    """Back-to-back runs: the next run waits for the spare its predecessor's teardown is setting up
    (sooner ready than a new one) instead of setting up a second network; a claimer that is cancelled
    hands it back as an ordinary spare."""
    spec = SandboxSpec(sandbox_id="claim", rootfs=rootfs, argv=["true"], stdin=False)
    making = asyncio.ensure_future(runtime.make_spares(network=True))
    await asyncio.sleep(0)
    assert len(runtime._spares_coming) == 1
    staged = await runtime.stage(spec)
    await making
    try:
        assert staged.net.netns_name is not None and staged.net.info.mode == "nat"
        # The claimed one was replaced by the next spare, a namespace of its own.
        assert len(runtime._spare_nets) == 1 and runtime._spares_coming == []
        assert runtime._spare_nets[0].netns_name != staged.net.netns_name
    finally:
        await runtime.abort(staged)
    await runtime.network.teardown(runtime._spare_nets.pop())
    making = asyncio.ensure_future(runtime.make_spares(network=True))
    await asyncio.sleep(0)
    claimer = asyncio.ensure_future(runtime.stage(msgspec.structs.replace(spec, sandbox_id="claim2")))
    await asyncio.sleep(0.001)
    claimer.cancel()
    await asyncio.wait({claimer})
    await making
    assert len(runtime._spare_nets) == 1, "the cancelled claimer's spare was lost"
    assert not runtime.cgroups.exists("claim2") and not (runtime.bundles / "claim2").exists()
