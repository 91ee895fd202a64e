"""Sandbox networking of a rootless engine: slirp4netns or pasta behind an egress filter.

A user cannot make veth pairs or NAT on the host, so a sandbox's network namespace is connected by a
user-mode stack running as the engine, which turns the sandbox's connections into sockets of its own on
the host: slirp4netns (Debian package slirp4netns) or pasta (package passt). `auto` takes slirp4netns when
it is installed: Debian 12's pasta (passt 0.0~git20230309) stalls 27-55 % of short TCP transfers from the
host into a sandbox on current kernels (the data is re-sent forever: passt's MSG_PEEK/MSG_TRUNC window
problem, podman#20170), slirp4netns none of them (docs/rootless.md). pasta is used when it is the only
stack, or on request (`CONTREE_ENGINE_NETWORK=pasta`). The policy is root mode's
(`contree/engine/runtime/network.py`):

* the host's loopback is unreachable: pasta runs with `--no-map-gw` (by default it maps the gateway
  address to the host's 127.0.0.1) and with every port forwarding off (`-t/-u/-T/-U none`; pasta's
  default, `auto`, would expose every port listening on the host's loopback inside the sandbox);
  slirp4netns runs with `--disable-host-loopback`;
* private, link-local, CGNAT, multicast and reserved ranges, the host's own networks and addresses are
  refused by an iptables filter *inside the sandbox's network namespace* (`sandbox_ns.py` loads it before
  the sandbox starts; the sandbox has no CAP_NET_ADMIN to change it). Only DNS to the forwarder address,
  which pasta/slirp4netns relay to the host's resolver, passes;
* IPv4 only (IPv6 is switched off in the namespace);
* `networking=false` gives a namespace with only `lo`.

Addresses are slirp's: the sandbox is 10.0.2.100/24, gateway 10.0.2.2, DNS 10.0.2.3 (whatever the host's
are: no host address reaches the sandbox).

Every sandbox also gets a user namespace of its own from here (its process limit, `sandbox_ns.py`), with
or without networking, so this module stands in for root mode's `NetworkManager` as a whole. Namespaces
are made ahead for the next runs (pasta takes ~30 ms to start), keyed by what they differ in.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import os
import shutil
from pathlib import Path

from contree.engine.runtime.netns import (
    BLOCKED_RANGES,
    InterfaceCounters,
    NetConfigured,
    NetworkInfo,
    SandboxNetwork,
    end_helper,
    namespace_counters,
    slirp4netns_ready,
)
from contree.engine.runtime.network import NetworkManager
from contree.engine.runtime.rootless import sandbox_ns
from contree.engine.runtime.rootless.ids import IdPlan

log = logging.getLogger(__name__)

ADDRESS, PREFIX, GATEWAY, DNS = "10.0.2.100", 24, "10.0.2.2", "10.0.2.3"
MTU = 65520
SPARES = 1  # namespaces kept ready per kind (networking, pids limit) that the last runs used
_KINDS_KEPT = 2  # kinds with spares (the most recently used)


class RootlessNetworkError(RuntimeError):
    pass


def host_local_addresses(fib_trie: Path = Path("/proc/net/fib_trie")) -> list[str]:
    """The host's own IPv4 addresses (its `local` routing table), whatever network they sit in."""
    found: set[str] = set()
    try:
        lines = fib_trie.read_text().splitlines()
    except OSError:
        return []
    for previous, line in itertools.pairwise(lines):
        if line.strip() == "/32 host LOCAL" and "|--" in previous:
            address = previous.split("|--")[1].strip()
            with contextlib.suppress(ValueError):
                found.add(str(ipaddress.IPv4Address(address)))
    return sorted(found)


def filter_rules() -> str:
    """iptables-restore input for a sandbox's network namespace (see the module doc)."""
    rules = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]",
             "-A OUTPUT -o lo -j ACCEPT"]
    for proto in ("udp", "tcp"):
        rules.append(f"-A OUTPUT -d {DNS}/32 -p {proto} --dport 53 -j ACCEPT")
    blocked = [*BLOCKED_RANGES, *NetworkManager._host_subnets(), *(f"{a}/32" for a in host_local_addresses())]
    for net in dict.fromkeys(blocked):
        rules.append(f"-A OUTPUT -d {net} -p tcp -j REJECT --reject-with tcp-reset")
        rules.append(f"-A OUTPUT -d {net} -j REJECT --reject-with icmp-net-prohibited")
    return "\n".join([*rules, "COMMIT", ""])


def pasta_argv(binary: str, userns: Path, netns: Path) -> list[str]:
    return [binary, "--runas", "0:0", "--quiet", "--config-net", "--ipv4-only", "--no-map-gw",
            "-t", "none", "-u", "none", "-T", "none", "-U", "none",
            "--address", ADDRESS, "--netmask", str(PREFIX), "--gateway", GATEWAY, "--dns-forward", DNS,
            "--ns-ifname", "eth0", "--mtu", str(MTU), "--no-dhcp", "--no-ndp", "--no-dhcpv6", "--no-ra",
            "--userns", str(userns), "--netns", str(netns)]


def _stderr_text(data: bytes) -> str:
    lines = [ln for ln in data.decode(errors="replace").splitlines() if "to syslog" not in ln]
    return " ".join(" ".join(lines).split())


class _Stack:
    """One sandbox's user-mode network process (slirp4netns only: pasta daemonizes and quits by itself
    once its namespace file is deleted)."""

    def __init__(self, proc: asyncio.subprocess.Process | None = None, exit_w: int = -1) -> None:
        self.proc = proc
        self.exit_w = exit_w

    async def stop(self) -> None:
        if self.exit_w >= 0:
            os.close(self.exit_w)  # slirp4netns exits when its exit fd reaches EOF
            self.exit_w = -1
        if self.proc is not None:
            proc, self.proc = self.proc, None
            await end_helper(proc)


class _Prepared:
    """What `SandboxNetwork.helper` holds for a rootless sandbox."""

    def __init__(self, namespaces: sandbox_ns.SandboxNamespaces, stack: _Stack | None) -> None:
        self.namespaces = namespaces
        self.stack = stack


class RootlessNetwork:
    """Root mode's `NetworkManager` for a rootless engine: `setup_for(networking, pids)` → `teardown`."""

    def __init__(self, directory: Path, plan: IdPlan, mode: str, *, error: str | None = None,
                 binary: str | None = None) -> None:
        self.directory = directory
        self.plan = plan
        self.mode = mode  # "pasta" | "slirp" | "none"
        self.error = error  # why there is no networking (mode "none")
        self.binary = binary
        self.owners = sandbox_ns.OwnerPool(plan.size)
        self._spares: dict[tuple[bool, int | None], list[SandboxNetwork]] = {}
        self._recent: list[tuple[bool, int | None]] = []
        self._making = 0
        self._closing = False

    @classmethod
    async def create(cls, wanted: str, directory: Path, plan: IdPlan) -> RootlessNetwork:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # noqa: ASYNC240 - a tmpfs, once
        missing = sandbox_ns.require_tools()
        if wanted == "none":
            return cls(directory, plan, "none",
                       error="networking is disabled by the operator (--network none)")
        candidates = {"pasta": ("pasta",), "slirp": ("slirp4netns",)}.get(wanted, ("slirp4netns", "pasta"))
        from contree.engine.runtime.hostcheck import find_binary

        for name in candidates:
            binary = find_binary(name)
            if binary is not None and not missing:
                return cls(directory, plan, "pasta" if name == "pasta" else "slirp", binary=binary)
        problems = missing + [f"{c} ({'passt' if c == 'pasta' else c})" for c in candidates
                              if find_binary(c) is None]
        error = "no sandbox network: missing " + ", ".join(problems) + " (install the Debian packages named)"
        if wanted not in ("auto", "nat"):
            raise RootlessNetworkError(error)
        log.warning("sandboxes run without network: %s", error)
        return cls(directory, plan, "none", error=error)

    # ---- per sandbox ----

    def check_ids(self, uid: int, gid: int) -> None:
        """A process can only run as an id the engine maps (all of 0..65535 with subordinate ids)."""
        if max(uid, gid) >= self.plan.size:
            why = f" ({self.plan.single_reason})" if self.plan.single_reason else ""
            raise ValueError(f"this rootless engine maps container ids 0..{self.plan.size - 1} only{why}: "
                             f"uid {uid} / gid {gid} cannot run")

    async def setup(self, enabled: bool) -> SandboxNetwork:
        return await self.setup_for(enabled, None)

    async def setup_for(self, enabled: bool, pids: int | None) -> SandboxNetwork:
        """A sandbox's namespaces (a spare when one of this kind is ready)."""
        networking = enabled and self.mode != "none"
        key = (networking, pids)
        if key in self._recent:
            self._recent.remove(key)
        self._recent.insert(0, key)
        del self._recent[_KINDS_KEPT:]
        spares = self._spares.get(key)
        if spares:
            net = spares.pop()
        else:
            net = await self._make(networking, pids)
        if enabled and not networking:
            net.info = NetworkInfo(mode="none", error=self.error)
        return net

    async def _make(self, networking: bool, pids: int | None) -> SandboxNetwork:
        rules = filter_rules() if networking else None
        namespaces = await sandbox_ns.create(self.directory, self.plan, self.owners, pids=pids,
                                             filter_rules=rules)
        net = SandboxNetwork(info=NetworkInfo(mode="none"), userns_path=str(namespaces.userns))
        net.helper = _Prepared(namespaces, None)
        if not networking:
            return net
        assert namespaces.netns is not None
        try:
            stack = await (self._pasta(namespaces) if self.mode == "pasta" else self._slirp(namespaces))
        except BaseException:
            sandbox_ns.release(namespaces, self.owners)
            raise
        net.helper = _Prepared(namespaces, stack)
        net.netns_path = str(namespaces.netns)
        net.netns_name = namespaces.name
        net.resolv_conf = f"nameserver {DNS}\n"
        net.info = NetworkInfo(mode=self.mode, configured=NetConfigured(
            ip4=f"{ADDRESS}/{PREFIX}", gw=GATEWAY, nameserver=DNS))
        return net

    async def _pasta(self, ns: sandbox_ns.SandboxNamespaces) -> _Stack:
        assert self.binary is not None and ns.netns is not None
        proc = await asyncio.create_subprocess_exec(
            *pasta_argv(self.binary, ns.userns, ns.netns), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 30)  # returns once pasta is set up and detached
        if proc.returncode != 0:
            raise RootlessNetworkError(f"pasta failed (exit {proc.returncode}): {_stderr_text(err)}")
        return _Stack()

    async def _slirp(self, ns: sandbox_ns.SandboxNamespaces) -> _Stack:
        assert self.binary is not None and ns.netns is not None
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        exit_r, exit_w = os.pipe2(os.O_CLOEXEC)
        stack = _Stack(exit_w=exit_w)
        try:
            stack.proc = await asyncio.create_subprocess_exec(
                self.binary, "--configure", f"--mtu={MTU}", "--disable-host-loopback", "--netns-type=path",
                f"--userns-path={ns.userns}", f"--ready-fd={ready_w}", f"--exit-fd={exit_r}", str(ns.netns),
                "eth0", pass_fds=(ready_w, exit_r), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            os.close(ready_w)
            os.close(exit_r)
            ready_w = exit_r = -1
            await slirp4netns_ready(ready_r, stack.proc)
            return stack
        except BaseException:
            await stack.stop()
            raise
        finally:
            for fd in (ready_r, ready_w, exit_r):
                if fd >= 0:
                    os.close(fd)

    def counters(self, net: SandboxNetwork) -> list[InterfaceCounters]:
        return namespace_counters(net) or []

    async def teardown(self, net: SandboxNetwork) -> None:
        """Idempotent. Deleting the namespace file also ends pasta."""
        prepared = net.helper
        net.helper = None
        if not isinstance(prepared, _Prepared):
            return
        if net.netns_path:
            net.info.interfaces = self.counters(net) or net.info.interfaces
        if prepared.stack is not None:
            await prepared.stack.stop()
        sandbox_ns.release(prepared.namespaces, self.owners)
        net.netns_name = None

    # ---- spares and life ----

    async def make_spares(self) -> None:
        """Make namespaces of the recently used kinds while nobody waits (after a run's teardown)."""
        if self._making:
            return
        self._making += 1
        try:
            for key in list(self._recent):
                while not self._closing and len(self._spares.setdefault(key, [])) < SPARES:
                    try:
                        net = await self._make(*key)
                    except Exception as exc:
                        log.debug("no spare sandbox namespace: %s", exc)
                        return
                    if self._closing:
                        await self.teardown(net)
                        return
                    self._spares[key].append(net)
            for key in [k for k in self._spares if k not in self._recent]:
                for net in self._spares.pop(key):
                    await self.teardown(net)
        finally:
            self._making -= 1

    async def close(self) -> None:
        self._closing = True
        for nets in self._spares.values():
            for net in nets:
                with contextlib.suppress(Exception):
                    await self.teardown(net)
        self._spares.clear()
        shutil.rmtree(self.directory, ignore_errors=True)
