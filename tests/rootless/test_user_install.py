"""What a normal user meets (issue 13): a throwaway non-root user installs the project into a venv of its
own, checks readiness, bootstraps busybox and starts `contree-mcp` (stdio, no flags) through the official
SDK client (mcp 1.30). The engine behind it is the user's rootless engine service: container 0 is the
user, sandboxes are isolated from the host as in root mode, and sessions share it.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from contree.engine.storage.bootstrap import BUSYBOX_TAG
from contree.service.control import ControlConnection, probe
from tests.engine.test_network import OutsideHost
from tests.rootless_env import RootlessUser, throwaway_rootless_user
from tests.tools.test_sdk_tools import result

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def busybox(rootless_user: RootlessUser) -> str:
    """busybox:latest bootstrapped by the user with `contree-mcp images bootstrap` (before any server)."""
    out = rootless_user.cli("images", "bootstrap", "--only", "busybox").stdout
    tag, uuid = out.strip().splitlines()[-1].split("\t")
    assert tag == BUSYBOX_TAG
    return uuid


@asynccontextmanager
async def session(user: RootlessUser, *, home: Path | None = None, env: dict[str, str] | None = None,
                  groups: bool = False) -> AsyncIterator[Any]:
    """`contree-mcp` as the user starts it from an MCP client: stdio, no flags (unless another `home`),
    the user's environment (and with `groups` its supplementary groups)."""
    argv = [user.contree_mcp, *(["--backend", "local", "--home", str(home)] if home else [])]
    params = StdioServerParameters(command="/usr/bin/setpriv", args=user.as_user(argv, groups=groups)[1:],
                                   cwd=str(user.home), env=user.env(**(env or {})))
    with open(user.home / "servers.log", "a") as errlog:  # noqa: ASYNC230 - removed with the user
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as s:
                await s.initialize()
                yield s


async def run(s: Any, command: str, **arguments: Any) -> Any:
    arguments.setdefault("image", "busybox:latest")
    return result(await s.call_tool("run", {"command": command, **arguments}))


def test_engine_check_finds_the_user_ready(rootless_user: RootlessUser) -> None:
    res = rootless_user.cli("engine", "check", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "FAIL" not in res.stdout
    for line in ("ok    user namespaces", f"ok    /etc/subuid: {rootless_user.name}:",
                 "ok    overlay in a user namespace", "ok    pasta", "ok    egress filter"):
        assert line in res.stdout, res.stdout


def test_bootstrapped_layers_keep_container_ids_shifted_on_disk(rootless_user: RootlessUser,
                                                                busybox: str) -> None:
    layers = list((rootless_user.engine_home / "layers").glob("*/bin/busybox"))
    assert layers, "the busybox layer is in the user's own home"
    assert all(p.stat().st_uid == rootless_user.uid for p in layers)  # container 0 is the user


async def test_echo_and_a_snapshot_read_back(rootless_user: RootlessUser, busybox: str) -> None:
    async with session(rootless_user) as s:
        echo = await run(s, "echo hi; id -u")
        assert echo["exit_code"] == 0 and echo["stdout"] == "hi\n0\n"
        made = await run(s, "echo kept > /state.txt && chown 1000:1000 /state.txt", disposable=False)
        image = made["result_image_uuid"]
        assert made["exit_code"] == 0 and image and image != busybox
        read = result(await s.call_tool("read_file", {"image": image, "path": "/state.txt"}))
        assert "kept" in str(read)
        again = await run(s, "cat /state.txt; stat -c %u:%g /state.txt", image=image)
        assert again["stdout"] == "kept\n1000:1000\n"
        listed = result(await s.call_tool("list_files", {"image": image, "path": "/"}))
        assert "state.txt" in str(listed)
    # On disk the layer holds the shifted id: container 1000 is the user's subordinate id start + 999.
    start, _ = rootless_user.subordinate("subuid")
    owners = {p.stat().st_uid for p in (rootless_user.engine_home / "layers").glob("*/state.txt")}
    assert owners == {start + 999}


async def test_host_files_and_etc_shadow_are_invisible(rootless_user: RootlessUser, busybox: str,
                                                       tmp_path: Path) -> None:
    secret = rootless_user.home / "secret-of-the-user.txt"
    secret.write_text("mine")
    os.chown(secret, rootless_user.uid, rootless_user.gid)
    async with session(rootless_user) as s:
        r = await run(s, "cat /etc/shadow; find / -xdev -name 'secret-of-the-user.txt' 2>/dev/null; "
                         "ls /home; echo end")
    assert "root:" not in r["stdout"] and "secret-of-the-user" not in r["stdout"]
    assert "/etc/shadow" in r["stderr"] and r["stdout"].endswith("end\n")
    with open("/etc/shadow") as fh:  # noqa: ASYNC230 - there on the host, never in the sandbox
        assert fh.read().startswith("root:")


@pytest.mark.parametrize("stack", ["slirp4netns", "pasta"])
async def test_host_services_are_unreachable_even_through_the_gateway(rootless_user: RootlessUser,
                                                                      busybox: str, stack: str) -> None:
    """The default stack (slirp4netns) on the user's default home; pasta on a home of its own."""
    home: Path | None = None
    env: dict[str, str] = {}
    if stack == "pasta":
        home = rootless_user.home / "pasta-home"
        env = {"CONTREE_ENGINE_NETWORK": "pasta"}
        rootless_user.cli("images", "bootstrap", "--only", "busybox", "--home", str(home))
    hits: list[str] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(str(writer.get_extra_info("sockname")))
        writer.write(b"hello\n")
        writer.close()

    loopback = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    anywhere = await asyncio.start_server(on_conn, "0.0.0.0", 0)
    outside = RoutedHost("203.0.113")
    target = await asyncio.start_server(on_conn, sock=outside.socket())
    private = RoutedHost("10.213.77")
    private_target = await asyncio.start_server(on_conn, sock=private.socket())
    outside_address = str(target.sockets[0].getsockname())
    try:
        lport = loopback.sockets[0].getsockname()[1]
        aport = anywhere.sockets[0].getsockname()[1]
        probes = {
            "loopback": f"127.0.0.1 {lport}", "gateway": f"10.0.2.2 {lport}",
            "gateway-any": f"10.0.2.2 {aport}",
            "host-address": f"{_host_address()} {aport}",
            "private": f"{private.ip} {private_target.sockets[0].getsockname()[1]}",
            "outside": f"{outside.ip} {target.sockets[0].getsockname()[1]}",
        }
        # `timeout`: Debian 12's pasta may stall a transfer after connecting (docs/rootless.md); the
        # connection itself is what this test is about.
        script = "; ".join(f"echo {name}=$(timeout 5 nc -w 3 {where} </dev/null 2>/dev/null || echo refused)"
                           for name, where in probes.items())
        async with session(rootless_user, home=home, env=env) as s:
            r = await run(s, script, timeout=60)
            if stack == "pasta":
                mode = await run(s, "cat /etc/resolv.conf")
                assert mode["stdout"] == "nameserver 10.0.2.3\n"
    finally:
        for server in (loopback, anywhere, target, private_target):
            server.close()
        outside.close()
        private.close()
    seen = dict(line.split("=", 1) for line in r["stdout"].splitlines())
    assert set(seen) == set(probes), (r["stdout"], r["stderr"])
    for name in ("loopback", "gateway", "gateway-any", "host-address", "private"):
        assert seen[name] == "refused", (name, r["stdout"])
    assert hits == [outside_address], hits  # only the outside host was reached
    if stack == "slirp4netns":
        assert seen["outside"] == "hello"


class RoutedHost(OutsideHost):
    """An outside machine reached through a gateway, as the internet is: a /32 of `prefix` routed by the
    host via the test's own network namespace (the /30 of the link itself is one of the host's own
    networks, which sandboxes never reach)."""

    def __init__(self, prefix: str) -> None:
        super().__init__("198.51.100.0")
        try:
            for _ in range(20):
                address = f"{prefix}.{random.randrange(2, 254)}"
                added = subprocess.run(["ip", "route", "add", f"{address}/32", "via", self.ip],
                                       capture_output=True, check=False)
                if added.returncode == 0:
                    break
            else:
                raise AssertionError(f"no free address in {prefix}.0/24 to route")
            subprocess.run(["ip", "-n", self.name, "addr", "add", f"{address}/32", "dev", "lo"], check=True,
                           capture_output=True)
            self.ip = address
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        subprocess.run(["ip", "route", "del", f"{self.ip}/32"], capture_output=True, check=False)
        super().close()


def _host_address() -> str:
    """An address of this host outside loopback (what a sandbox could try to reach it by)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route's source address
        return str(s.getsockname()[0])


async def test_proc_sys_is_read_only(rootless_user: RootlessUser, busybox: str) -> None:
    async with session(rootless_user) as s:
        r = await run(s, "echo 1 > /proc/sys/kernel/hostname 2>/dev/null && echo WROTE; "
                         "echo 1 > /proc/sys/vm/drop_caches 2>/dev/null && echo WROTE; "
                         "grep ' /proc/sys ' /proc/self/mounts | cut -d' ' -f4")
    assert "WROTE" not in r["stdout"] and r["stdout"].startswith("ro,"), r


async def test_rm_rf_root_leaves_the_image_intact(rootless_user: RootlessUser, busybox: str) -> None:
    async with session(rootless_user) as s:
        wiped = await run(s, "rm -rf / 2>/dev/null; ls /bin/busybox 2>&1; echo done", disposable=False)
        assert wiped["stdout"].endswith("done\n") and "No such file" in wiped["stdout"]
        intact = await run(s, "ls /bin/busybox && echo fine")
        assert intact["stdout"] == "/bin/busybox\nfine\n"
        child = wiped["result_image_uuid"]
        listed = str(result(await s.call_tool("list_files", {"image": child, "path": "/"})))
        for gone in ("'bin'", "'usr'", "'root'"):
            assert gone not in listed, listed  # only the child image lost them (mount points stay)


async def test_a_fork_bomb_is_contained(rootless_user: RootlessUser, busybox: str) -> None:
    async with session(rootless_user) as s:
        bomb = await run(s, "b() { b | b & }; b; sleep 8; echo gone", timeout=8, wait=False)
        await asyncio.sleep(2)
        alive = await run(s, "echo alive")  # the engine and other sandboxes keep working meanwhile
        assert alive["stdout"] == "alive\n"
        waited = result(await s.call_tool("wait_operations", {"operation_ids": [bomb["operation_id"]],
                                                              "timeout": 60}))
        assert "can't fork" in str(waited), waited  # the sandbox's process limit refused forks
        again = await run(s, "echo still fine")
        assert again["stdout"] == "still fine\n"


async def test_two_sessions_share_the_users_engine(rootless_user: RootlessUser, busybox: str) -> None:
    async with session(rootless_user) as a, session(rootless_user) as b:
        made = await run(a, "echo shared > /shared.txt", disposable=False)
        read = await run(b, "cat /shared.txt", image=made["result_image_uuid"])
        assert read["stdout"] == "shared\n"
        status = probe(rootless_user.engine_home)
        assert status is not None and len(status.clients) >= 2
        # The host's pid of the service, which is pid 2 of the engine's own pid namespace.
        with open(f"/proc/{status.pid}/status") as fh:  # noqa: ASYNC230 - procfs
            nspid = next(line for line in fh if line.startswith("NSpid:"))
        assert nspid.split()[1:] == [str(status.pid), "2"], nspid


def test_engine_unshare_removes_what_the_users_own_tools_cannot(rootless_user: RootlessUser) -> None:
    scratch = rootless_user.home / "shifted"
    rootless_user.cli("engine", "unshare", "sh", "-c",
                      f"mkdir {scratch} && touch {scratch}/f && chown 1000:1000 {scratch}/f {scratch}")
    start, _ = rootless_user.subordinate("subuid")
    assert (scratch / "f").stat().st_uid == start + 999  # a container id, not the user, on the host
    plain = rootless_user.run(["rm", "-rf", str(scratch)], check=False)
    assert plain.returncode != 0 and scratch.exists()
    rootless_user.cli("engine", "unshare", "rm", "-rf", str(scratch))
    assert not scratch.exists()


@pytest.mark.slow
async def test_bootstrap_debian_as_the_user(rootless_user: RootlessUser) -> None:
    """mmdebstrap runs inside the engine's namespace, where the user is root (~30-50 s, the Debian mirror)."""
    out = rootless_user.cli("images", "bootstrap", "--only", "debian", timeout=1200).stdout
    assert out.strip().splitlines()[-1].startswith("debian:bookworm\t")
    async with session(rootless_user) as s:
        r = await run(s, "python3 -c 'print(6 * 7)'; stat -c %u:%g /etc/shadow",
                      image="debian:bookworm", timeout=120)
    assert r["stdout"] == "42\n0:42\n", r  # /etc/shadow belongs to group shadow (42) inside
    start, _ = rootless_user.subordinate("subgid")
    shadow = list((rootless_user.engine_home / "layers").glob("*/etc/shadow"))
    assert shadow and {p.stat().st_gid for p in shadow} == {start + 41}  # shifted on disk


async def test_networking_off_gives_only_lo_and_mountinfo_names_no_host_path(rootless_user: RootlessUser,
                                                                             busybox: str) -> None:
    async with session(rootless_user) as s:
        off = await run(s, "ls /sys/class/net; cat /proc/net/dev | tail -n +3 | cut -d: -f1",
                        networking=False)
        mounts = await run(s, "cat /proc/self/mountinfo")
    assert off["stdout"].split() == ["lo", "lo"], off
    assert " / / " in mounts["stdout"] and "/etc/hosts" in mounts["stdout"]
    for host_path in (str(rootless_user.home), rootless_user.name, "/run/contree-engine", "/var/tmp"):
        shown = [line for line in mounts["stdout"].splitlines() if host_path in line]
        assert not shown, f"{host_path} is visible inside the sandbox: {shown}"


async def test_without_subordinate_ids_the_engine_maps_only_the_user_and_says_so() -> None:
    with throwaway_rootless_user(subordinate_ids=False) as user:
        check = user.cli("engine", "check", check=False)
        assert check.returncode == 1 and f"FAIL  /etc/subuid: no range for {user.name}" in check.stdout
        assert "usermod --add-subuids" in check.stdout and f" {user.name}" in check.stdout
        user.cli("images", "bootstrap", "--only", "busybox")
        async with session(user) as s:
            r = await run(s, "id -u; cat /proc/self/uid_map; chown 1000 /tmp 2>&1 || echo refused")
            other = await s.call_tool("run", {"command": "true", "image": "busybox:latest", "uid": 1000})
        assert r["stdout"].split()[:4] == ["0", "0", "0", "1"] and r["stdout"].endswith("refused\n"), (
            r["status"], r["error"], r["stderr"])
        text = other.content[0].text
        assert "maps container ids 0..0 only" in text and "no subordinate ids" in text, text


async def test_a_killed_engine_takes_every_sandbox_and_helper_with_it(rootless_user: RootlessUser,
                                                                      busybox: str) -> None:
    """SIGKILL of the service: its pid namespace ends, so its sandboxes and helpers end with it; the
    next session gets a new engine that recovers the store."""
    async with session(rootless_user) as s:
        detached = await run(s, "sleep 300", wait=False, timeout=600)
        status = probe(rootless_user.engine_home)
        assert status is not None
        for _ in range(100):
            got = result(await s.call_tool("get_operation", {"operation_id": detached["operation_id"]}))
            if got["status"] == "EXECUTING":
                break
            await asyncio.sleep(0.1)
        sandboxed = [pid for pid in _pids() if _cmdline(pid) == "sleep 300" and rootless_user.owns(_uid(pid))]
        assert sandboxed, "the sandbox's sleep runs as the user (container root)"
        with ControlConnection(rootless_user.engine_home, pin=True) as conn:
            signal.pidfd_send_signal(conn.pidfd, signal.SIGKILL)
            assert conn.wait_exit(30)
    for _ in range(100):
        left = [pid for pid in _pids() if rootless_user.owns(_uid(pid)) and "sleep 300" in _cmdline(pid)]
        if not left:
            break
        await asyncio.sleep(0.1)
    assert not left, "a sandbox outlived its engine"
    async with session(rootless_user) as s:
        again = await run(s, "echo back")
        assert again["stdout"] == "back\n"
        old = result(await s.call_tool("get_operation", {"operation_id": detached["operation_id"]}))
        assert old["status"] == "FAILED", old  # interrupted, and said so


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _uid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return int(next(line for line in fh if line.startswith("Uid:")).split()[1])
    except (OSError, StopIteration, ValueError):
        return -1


async def test_whoami_and_the_run_result_claim_only_the_limits_applied(rootless_user: RootlessUser,
                                                                       busybox: str) -> None:
    """No cgroup is delegated here: the per-sandbox process limit is real, memory and CPU limits and the
    engine's total budget are not, so they are absent, never numbers."""
    async with session(rootless_user) as s:
        who = result(await s.call_tool("whoami", {}))
        limits = who["limits"]
        assert limits.get("instance_pids", 0) > 0 and limits.get("instance_max_pids", 0) > 0, limits
        for absent in ("instance_memory_bytes", "instance_millicpus", "engine_pids", "engine_memory_bytes",
                       "engine_millicpus"):
            assert absent not in limits, (absent, limits)
        r = await run(s, "echo x")
        assert r["limits"]["pids"] == limits["instance_pids"], r["limits"]
        assert r["limits"].get("memory_bytes") is None and r["limits"].get("cpus") is None, r["limits"]
        bounded = await run(s, "(while :; do sleep 100 & done) 2>/dev/null & sleep 3; set -- /proc/[0-9]*; "
                               "echo $#", pids=20, timeout=30)
        assert bounded["limits"]["pids"] == 20
        assert 0 < int(bounded["stdout"].strip()) <= 20, bounded


async def test_a_long_lived_sandbox_as_the_user(rootless_user: RootlessUser, busybox: str) -> None:
    """Issue 14 on the rootless engine: exec keeps state, a background server is reached from another
    exec and through expose_port from this host (the forward enters the sandbox's pasta network), stdin,
    signals, a live snapshot (SIGSTOP when no cgroup is delegated) and the stop."""
    import urllib.request

    async with session(rootless_user) as s:
        box = result(await s.call_tool("start_sandbox", {"image": "busybox:latest"}))
        sid = box["sandbox_id"]

        async def ex(command: str, **arguments: Any) -> Any:
            return result(await s.call_tool("exec", {"sandbox_id": sid, "command": command, **arguments}))

        assert (await ex("echo kept > /kept; id -u"))["stdout"] == "0\n"
        assert (await ex("cat /kept"))["stdout"] == "kept\n"
        web = await ex(
            "mkdir -p /www && echo as-user > /www/index.html && exec busybox httpd -f -p 8080 -h /www",
            background=True,
        )
        got = await ex(
            "for i in 1 2 3 4 5 6 7 8 9 10; do wget -qO- http://127.0.0.1:8080/ && exit 0; "
            "sleep 0.3; done; exit 1"
        )
        assert got["stdout"] == "as-user\n"
        port = result(await s.call_tool("expose_port", {"sandbox_id": sid, "port": 8080}))
        try:
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(port["url"], timeout=10).read())
        except Exception:
            print((rootless_user.engine_home / "engine.log").read_text()[-3000:])
            raise
        assert body == b"as-user\n"
        cat = await ex("cat", shell=False, background=True)
        await s.call_tool(
            "write_stdin",
            {"sandbox_id": sid, "process_id": cat["process_id"], "data": "fed\n", "close": True},
        )
        fed = result(
            await s.call_tool("get_process", {"sandbox_id": sid, "process_id": cat["process_id"], "wait": 10})
        )
        assert fed["stdout"] == "fed\n"
        snap = result(await s.call_tool("snapshot_sandbox", {"sandbox_id": sid}))
        assert snap["frozen_with"] in ("SIGSTOP", "cgroup freezer")
        seen = result(await s.call_tool("read_file", {"image": snap["image"], "path": "/www/index.html"}))
        assert seen["content"] == "as-user\n"
        assert (await ex("wget -qO- http://127.0.0.1:8080/"))[
            "stdout"
        ] == "as-user\n"  # thawed, still serving
        stopped = result(
            await s.call_tool("signal_process", {"sandbox_id": sid, "process_id": web["process_id"]})
        )
        assert stopped["status"] == "killed"
        final = result(await s.call_tool("stop_sandbox", {"sandbox_id": sid}))
        assert final["state"] == "stopped"
        after = await s.call_tool("exec", {"sandbox_id": sid, "command": "true"})
        assert after.isError and "has stopped" in after.content[0].text
        with socket.socket() as probe_socket:
            assert probe_socket.connect_ex(("127.0.0.1", port["host_port"])) != 0
