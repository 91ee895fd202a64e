"""Long-lived sandboxes through the official SDK client (mcp 1.30) → the real server → the engine service.

One scenario per test: state persists between execs; a background `busybox httpd` is reached from another
exec and, through expose_port, from this host with an HTTP GET; write_stdin feeds a background `cat`;
signal_process stops the server; snapshot_sandbox gives an image whose files show the live state while the
sandbox keeps running; a second sandbox sees nothing of the first; exec after stop_sandbox is a clear
error and the port is closed; an idle sandbox is reaped after its TTL; nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp.shared.exceptions import McpError
from pydantic import AnyUrl

from contree.engine.local import LocalEngine
from contree.engine.runtime.paths import NETNS_DIR, TAG_DIR, engine_id_for
from contree.service.control import probe
from tests.netutil import free_port
from tests.service_util import stop_service
from tests.tools.conftest import http_server, mcp_session, require_engine_host, seed_busybox
from tests.tools.fakes import call as registry_call
from tests.tools.fakes import make_registry
from tests.tools.test_sdk_tools import read, result

# what the engine has beyond the Contree API: the cloud has none of it
ENGINE_EXTRAS = frozenset(
    (
        "read_output",
        "delete_image",
        "disk_usage",
        "image_lineage",
        "wait_subprocess",
        "start_sandbox",
        "list_sandboxes",
        "get_sandbox",
        "expose_port",
        "close_port",
        "snapshot_sandbox",
        "stop_sandbox",
        "blobs",
        "chunk_store",
    )
)


class CloudLike:
    """A real engine seen the way the Contree cloud looks to the tools: the API only."""

    def __init__(self, engine: LocalEngine) -> None:
        self._engine = engine

    async def whoami(self) -> Any:
        me = await self._engine.whoami()
        me.limits = {k: v for k, v in (me.limits or {}).items() if not k.startswith("sandbox_")}
        return me

    def __getattr__(self, name: str) -> Any:
        if name in ENGINE_EXTRAS:
            raise AttributeError(name)
        return getattr(self._engine, name)


async def reg_call(reg: Any, tool: str, args: dict[str, Any]) -> Any:
    return await registry_call(reg, tool, args)


async def fcall(reg: Any, tool: str, args: dict[str, Any]) -> Any:
    out = await registry_call(reg, tool, args)
    assert not out.get("isError"), out["content"][0]["text"]
    return out["structuredContent"]


async def call(session: Any, tool: str, args: dict[str, Any]) -> Any:
    return result(await session.call_tool(tool, args))


async def error(session: Any, tool: str, args: dict[str, Any]) -> str:
    res = await session.call_tool(tool, args)
    assert res.isError, f"{tool}({args}) should have failed: {res.structuredContent}"
    return str(res.content[0].text)


def http_get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on `port` in this network namespace."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                host, _, hex_port = fields[1].partition(":")
                if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                    found.add(socket.inet_ntoa(bytes.fromhex(host)[::-1]) if len(host) == 8 else f"[{host}]")
    return found


def refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(5)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def sandbox_leftovers(sandbox_id: str) -> list[str]:
    """The mounts and cgroups of one sandbox."""
    with open("/proc/self/mountinfo") as fh:
        left = [line.split()[4] for line in fh if sandbox_id in line]
    return left + [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/contree-engine/*/{sandbox_id}")]


def network_tag(home: Path) -> str:
    """The tag the home's running service names its network namespaces, veths and iptables chains
    with (`network.py`): the tag lock it holds open."""
    status = probe(home)
    assert status is not None, f"no engine service runs on {home}"
    for fd in Path(f"/proc/{status.pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = Path(os.readlink(fd))
            if target.parent == TAG_DIR and target.suffix == ".lock":
                return target.stem
    raise AssertionError(f"the engine service on {home} holds no network tag lock under {TAG_DIR}")


def engine_leftovers(home: Path, tag: str) -> list[str]:
    """Mounts under the home, and the engine's cgroups, runtime state, network namespaces, veths and
    iptables chains (`tag`: its network tag, from `network_tag` while it ran)."""
    left = []
    with open("/proc/self/mountinfo") as fh:
        left += [line.split()[4] for line in fh if str(home) in line.split()[4]]
    engine_id = engine_id_for(home)
    for root in Path("/sys/fs/cgroup").iterdir():
        if (root / "contree-engine" / engine_id).exists():
            left.append(str(root / "contree-engine" / engine_id))
    left += [str(p) for p in Path("/run/contree-engine").glob(f"**/*{engine_id}*")]
    left += [f"netns {p.name}" for p in NETNS_DIR.glob(f"contree-{tag}-*")] if NETNS_DIR.is_dir() else []
    left += [f"veth {n}" for n in os.listdir("/sys/class/net") if n.startswith(f"ct{tag}")]
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    left += [f"iptables chain {c}" for c in sorted(set(rules.split())) if c.startswith(f"CT-{tag}-")]
    return left


async def test_a_sandbox_keeps_state_serves_and_snapshots_while_it_runs(
    engine_home: Path, workdir: Path
) -> None:
    async with mcp_session(engine_home, workdir) as s:
        session: Any = s
        tools = {t.name for t in (await session.list_tools()).tools}
        assert {
            "start_sandbox",
            "exec",
            "write_stdin",
            "signal_process",
            "get_process",
            "expose_port",
            "snapshot_sandbox",
            "stop_sandbox",
            "list_sandboxes",
        } <= tools

        box = await call(
            session,
            "start_sandbox",
            {"image": "busybox:latest", "env": {"GREETING": "hello"}, "cwd": "/work"},
        )
        sid = box["sandbox_id"]
        assert box["state"] == "running" and box["expires_at"] and box["ttl_seconds"] == 1800
        op = await call(session, "get_operation", {"operation_id": sid})
        assert op["kind"] == "instance" and op["status"] == "EXECUTING"
        tag = network_tag(engine_home)
        running = engine_leftovers(engine_home, tag)  # what the check below must find gone
        assert any("cgroup" in p for p in running) and any(str(engine_home) in p for p in running)
        assert any(p.startswith("netns ") for p in running) and any(p.startswith("veth ") for p in running)

        # state persists between execs: files, the environment and the working directory
        wrote = await call(session, "exec", {"sandbox_id": sid, "command": "echo $GREETING > note; pwd"})
        assert wrote["status"] == "exited" and wrote["exit_code"] == 0 and wrote["stdout"] == "/work\n"
        again = await call(session, "exec", {"sandbox_id": sid, "command": "cat /work/note"})
        assert again["stdout"] == "hello\n" and again["process_id"] > wrote["process_id"]
        failed = await call(session, "exec", {"sandbox_id": sid, "command": "echo oops >&2; exit 7"})
        assert failed["exit_code"] == 7 and failed["stderr"] == "oops\n"

        # a background server, reached from another exec and, through expose_port, from this host
        web = await call(
            session,
            "exec",
            {
                "sandbox_id": sid,
                "background": True,
                "command": "mkdir -p /www && echo served-live > /www/index.html && "
                "exec busybox httpd -f -p 8080 -h /www",
            },
        )
        assert web["status"] == "running"
        fetched = await call(
            session,
            "exec",
            {
                "sandbox_id": sid,
                "command": "for i in 1 2 3 4 5 6 7 8 9 10; do wget -qO- http://127.0.0.1:8080/ "
                "&& exit 0; sleep 0.3; done; exit 1",
            },
        )
        assert fetched["exit_code"] == 0 and fetched["stdout"] == "served-live\n"
        port = await call(session, "expose_port", {"sandbox_id": sid, "port": 8080})
        assert port["url"] == f"http://127.0.0.1:{port['host_port']}" and port["host"] == "127.0.0.1"
        status, body = await asyncio.to_thread(http_get, port["url"])
        assert status == 200 and body == b"served-live\n"
        assert listening_addresses(port["host_port"]) == {"127.0.0.1"}  # loopback only, never 0.0.0.0
        listed = await call(session, "list_sandboxes", {})
        mine = next(b for b in listed["sandboxes"] if b["sandbox_id"] == sid)
        assert [p["port"] for p in mine["ports"]] == [8080] and mine["ports"][0]["connections"] >= 1

        # write_stdin feeds a background cat
        cat = await call(
            session, "exec", {"sandbox_id": sid, "command": "cat", "shell": False, "background": True}
        )
        await call(
            session, "write_stdin", {"sandbox_id": sid, "process_id": cat["process_id"], "data": "line one\n"}
        )
        written = await call(
            session,
            "write_stdin",
            {"sandbox_id": sid, "process_id": cat["process_id"], "data": "line two\n", "close": True},
        )
        assert written == {
            "sandbox_id": sid,
            "process_id": cat["process_id"],
            "bytes_written": 9,
            "closed": True,
        }
        fed = await call(
            session, "get_process", {"sandbox_id": sid, "process_id": cat["process_id"], "wait": 10}
        )
        assert fed["status"] == "exited" and fed["stdout"] == "line one\nline two\n"

        # a snapshot while it runs: the live state, and the sandbox goes on
        snap = await call(session, "snapshot_sandbox", {"sandbox_id": sid, "tag": "tests/live/busybox"})
        assert (
            snap["parent"] == box["image"] and not snap["unchanged"] and snap["tag"] == "tests/live/busybox"
        )
        assert snap["pause_ms"] >= 0 and snap["frozen_with"] == "cgroup freezer"
        seen = await call(session, "read_file", {"image": snap["image"], "path": "/work/note"})
        assert seen["content"] == "hello\n"
        page = await call(session, "read_file", {"image": "tests/live/busybox", "path": "/www/index.html"})
        assert page["content"] == "served-live\n"
        lineage = json.loads((await read(session, f"contree://image/{snap['image']}/lineage"))[0].text)
        assert lineage["parent"] == box["image"]
        assert lineage["entries"][snap["image"]]["command"].startswith("sandbox: echo $GREETING > note; pwd")
        after = await call(
            session, "exec", {"sandbox_id": sid, "command": "echo after > /work/later; cat note"}
        )
        assert after["stdout"] == "hello\n"
        missing = await error(session, "read_file", {"image": snap["image"], "path": "/work/later"})
        assert "later" in missing

        # signal_process stops the server
        stopped = await call(session, "signal_process", {"sandbox_id": sid, "process_id": web["process_id"]})
        assert stopped["status"] == "killed" and stopped["signal"] == 15
        gone = await call(
            session, "exec", {"sandbox_id": sid, "command": "wget -qO- -T 2 http://127.0.0.1:8080/"}
        )
        assert gone["exit_code"] != 0

        # a second sandbox sees nothing of the first: neither its files nor its processes
        sleeper = await call(
            session, "exec", {"sandbox_id": sid, "command": "exec sleep 4321", "background": True}
        )
        seen_here = await call(session, "exec", {"sandbox_id": sid, "command": "ps -o args"})
        assert "sleep 4321" in seen_here["stdout"]  # what the second one must not see
        other = await call(session, "start_sandbox", {"image": "busybox:latest", "networking": False})
        oid = other["sandbox_id"]
        look = await call(
            session, "exec", {"sandbox_id": oid, "command": "ls /work/note /www 2>&1; ps -o args"}
        )
        assert look["stdout"].count("No such file") == 2, look["stdout"]
        assert "sleep 4321" not in look["stdout"] and "ps -o args" in look["stdout"]
        await call(session, "signal_process", {"sandbox_id": sid, "process_id": sleeper["process_id"]})

        # output of a long process: head, tail, the whole stream as a resource
        long = await call(
            session, "exec", {"sandbox_id": oid, "command": "seq 1 20000", "truncate_output_at": 100}
        )
        assert long["stdout_truncated"] and long["stdout_bytes"] == len(
            "".join(f"{i}\n" for i in range(1, 20001))
        )
        assert long["stdout_tail"].endswith("19999\n20000\n")
        whole = await read(session, long["stdout_resource"] + "?offset=0&limit=6")
        assert whole[0].text == "1\n2\n3\n"

        # stop: exec afterwards is a clear error, the port is closed
        final = await call(session, "stop_sandbox", {"sandbox_id": sid})
        assert (
            final["state"] == "stopped"
            and final["stop_reason"] == "stopped"
            and final["result_image"] is None
        )
        text = await error(session, "exec", {"sandbox_id": sid, "command": "true"})
        assert f"sandbox {sid} has stopped" in text and "start_sandbox" in text
        assert refused(port["host_port"])
        old = await call(session, "get_process", {"sandbox_id": sid, "process_id": again["process_id"]})
        assert old["stdout"] == "hello\n"  # output outlives the sandbox

        committed = await call(session, "exec", {"sandbox_id": oid, "command": "echo kept > /kept"})
        assert committed["exit_code"] == 0
        kept = await call(session, "stop_sandbox", {"sandbox_id": oid, "commit": True})
        assert kept["result_image"] and kept["stop_reason"] == "stopped"
        check = await call(session, "run", {"command": "cat /kept", "image": kept["result_image"]})
        assert check["stdout"] == "kept\n"
        assert (await call(session, "list_sandboxes", {}))["sandboxes"] == []
    assert stop_service(engine_home)
    assert engine_leftovers(engine_home, tag) == []


async def test_an_idle_sandbox_is_stopped_after_its_ttl(engine_home: Path, workdir: Path) -> None:
    async with mcp_session(engine_home, workdir) as s:
        session: Any = s
        idle = await call(session, "start_sandbox", {"image": "busybox:latest", "ttl_seconds": 2})
        busy = await call(session, "start_sandbox", {"image": "busybox:latest", "ttl_seconds": 2})
        tag = network_tag(engine_home)
        assert any(p.startswith("netns ") for p in engine_leftovers(engine_home, tag))
        # a foreground exec longer than the TTL keeps its sandbox: never reaped while it works
        slow = await call(
            session, "exec", {"sandbox_id": busy["sandbox_id"], "command": "sleep 4; echo done"}
        )
        assert slow["stdout"] == "done\n"
        listed = [b["sandbox_id"] for b in (await call(session, "list_sandboxes", {}))["sandboxes"]]
        assert idle["sandbox_id"] not in listed and busy["sandbox_id"] in listed
        text = await error(session, "exec", {"sandbox_id": idle["sandbox_id"], "command": "true"})
        assert "idle" in text and "ttl_seconds=2" in text
        info = await call(session, "get_operation", {"operation_id": idle["sandbox_id"]})
        assert info["status"] == "SUCCESS"
        await asyncio.sleep(3)
        assert (await call(session, "list_sandboxes", {}))["sandboxes"] == []
        # reaped means released, with the engine still running: the sandbox's mounts and cgroups
        assert await asyncio.to_thread(sandbox_leftovers, idle["sandbox_id"]) == []
    assert stop_service(engine_home)
    assert engine_leftovers(engine_home, tag) == []


async def test_exec_streams_progress_and_a_sandbox_is_an_operation(engine_home: Path, workdir: Path) -> None:
    """Progress notifications carry an exec's output while it runs; list_operations lists the sandbox and
    cancel_operation stops it."""
    async with mcp_session(engine_home, workdir) as s:
        session: Any = s
        box = await call(session, "start_sandbox", {"image": "busybox:latest", "networking": False})
        sid = box["sandbox_id"]
        messages: list[tuple[float, str]] = []
        loop = asyncio.get_running_loop()

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            messages.append((loop.time(), message or ""))

        res = await session.call_tool(
            "exec",
            {"sandbox_id": sid, "command": "for i in 1 2 3; do echo line-$i; sleep 0.4; done"},
            progress_callback=on_progress,
        )
        done = loop.time()
        assert result(res)["stdout"] == "line-1\nline-2\nline-3\n"
        early = [at for at, text in messages if "line-1" in text and "line-3" not in text]
        assert early and done - early[0] >= 0.5, f"no output while it ran: {messages}"

        listed = await call(session, "list_operations", {"status": "executing", "type": "instance"})
        assert sid in [o["uuid"] for o in listed["operations"]]
        assert (await call(session, "cancel_operation", {"operation_id": sid}))["cancelled"] is True
        for _ in range(100):
            if (await call(session, "list_sandboxes", {}))["sandboxes"] == []:
                break
            await asyncio.sleep(0.1)
        assert (await call(session, "list_sandboxes", {}))["sandboxes"] == []
        text = await error(session, "exec", {"sandbox_id": sid, "command": "true"})
        assert "cancel" in text, text
    assert stop_service(engine_home)


async def test_exec_errors_are_clear(engine_home: Path, workdir: Path) -> None:
    async with mcp_session(engine_home, workdir) as s:
        session: Any = s
        box = await call(session, "start_sandbox", {"image": "busybox:latest", "networking": False})
        sid = box["sandbox_id"]
        missing = await call(session, "exec", {"sandbox_id": sid, "command": "/no/such/tool", "shell": False})
        assert missing["exit_code"] == 127 and "not found" in missing["stderr"]
        slow = await call(session, "exec", {"sandbox_id": sid, "command": "sleep 30", "timeout": 1})
        assert slow["status"] == "timed_out" and slow["timed_out"]
        assert "not found" in await error(
            session, "exec", {"sandbox_id": "00000000-0000-4000-8000-000000000000", "command": "true"}
        )
        assert "invalid sandbox_id" in await error(session, "exec", {"sandbox_id": "nope", "command": "true"})
        assert "unknown signal" in await error(
            session, "signal_process", {"sandbox_id": sid, "process_id": 2, "signal": "BOGUS"}
        )
        assert "ttl_seconds must be at most" in await error(
            session, "start_sandbox", {"image": "busybox:latest", "ttl_seconds": 10**6}
        )
        await call(session, "stop_sandbox", {"sandbox_id": sid})
        assert "has already stopped" in await error(session, "stop_sandbox", {"sandbox_id": sid})
    assert stop_service(engine_home)


async def test_one_principal_cannot_reach_anothers_sandbox(
    engine_home: Path, workdir: Path, tmp_path: Path
) -> None:
    """--http-tokens-file: another principal's sandbox reads as not found for exec, stdin, signals,
    processes, ports, snapshots, stop, the process output resources, and is not listed."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    tokens = tmp_path / "tokens"
    tokens.write_text("alice tok-alice-0123456789\nmallory tok-mallory-0123456789\n")
    os.chmod(tokens, 0o600)

    @contextlib.asynccontextmanager
    async def as_(base: str, token: str) -> AsyncIterator[Any]:
        headers = {"Authorization": f"Bearer {token}"}
        async with streamablehttp_client(f"{base}/mcp", headers=headers) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session

    port = free_port()
    async with http_server(engine_home, workdir, port, "--http-tokens-file", str(tokens)) as base:
        async with as_(base, "tok-alice-0123456789") as alice, as_(base, "tok-mallory-0123456789") as mallory:
            box = await call(alice, "start_sandbox", {"image": "busybox:latest", "networking": False})
            sid = box["sandbox_id"]
            proc = await call(alice, "exec", {"sandbox_id": sid, "command": "cat", "background": True})
            spid = proc["process_id"]
            for tool, args in [
                ("exec", {"sandbox_id": sid, "command": "echo pwned > /pwned"}),
                ("write_stdin", {"sandbox_id": sid, "process_id": spid, "data": "x", "close": True}),
                ("signal_process", {"sandbox_id": sid, "process_id": spid, "signal": "KILL"}),
                ("get_process", {"sandbox_id": sid, "process_id": spid}),
                ("expose_port", {"sandbox_id": sid, "port": 80}),
                ("snapshot_sandbox", {"sandbox_id": sid}),
                ("stop_sandbox", {"sandbox_id": sid}),
            ]:
                text = await error(mallory, tool, args)
                assert f"sandbox {sid}: not found" in text, (tool, text)
            assert (await call(mallory, "list_sandboxes", {}))["sandboxes"] == []
            with pytest.raises(McpError, match="not found"):
                await mallory.read_resource(AnyUrl(f"contree://sandboxes/{sid}/processes/{spid}/stdout"))
            # nothing of it happened: alice's sandbox and process are as she left them
            still = await call(alice, "get_process", {"sandbox_id": sid, "process_id": spid})
            assert still["status"] == "running"
            look = await call(alice, "exec", {"sandbox_id": sid, "command": "ls /pwned 2>&1; true"})
            assert "No such file" in look["stdout"]
            assert [b["sandbox_id"] for b in (await call(alice, "list_sandboxes", {}))["sandboxes"]] == [sid]
            await call(alice, "stop_sandbox", {"sandbox_id": sid})


async def test_cloud_sandboxes_use_the_subprocess_api_and_name_what_is_missing(tmp_path: Path) -> None:
    """A backend without the engine's sandbox extension (the Contree cloud, here a real engine behind a
    whoami without the sandbox limits): sandboxes are instances waiting on their stdin, processes go
    through the subprocess API, and ports and live snapshots are errors naming the missing capability."""
    require_engine_host()
    seed_busybox(tmp_path / "home")
    async with LocalEngine(tmp_path / "home") as engine:
        reg, state = make_registry(CloudLike(engine), tmp_path, kind="contree")
        try:
            box = await fcall(reg, "start_sandbox", {"image": "busybox:latest", "networking": False})
            sid = box["sandbox_id"]
            op = await engine.get_operation(sid)
            assert op.status == "EXECUTING" and "contree-mcp sandbox" in (op.metadata or {})["command"]
            first = await fcall(reg, "exec", {"sandbox_id": sid, "command": "echo kept > /kept"})
            assert first["exit_code"] == 0
            again = await fcall(reg, "exec", {"sandbox_id": sid, "command": "cat /kept"})
            assert again["stdout"] == "kept\n"
            slow = await fcall(reg, "exec", {"sandbox_id": sid, "command": "sleep 30", "timeout": 1})
            assert slow["status"] == "timed_out"
            cat = await fcall(reg, "exec", {"sandbox_id": sid, "command": "cat", "background": True})
            await fcall(
                reg,
                "write_stdin",
                {"sandbox_id": sid, "process_id": cat["process_id"], "data": "via the API\n", "close": True},
            )
            fed = await fcall(
                reg, "get_process", {"sandbox_id": sid, "process_id": cat["process_id"], "wait": 10}
            )
            assert fed["stdout"] == "via the API\n" and fed["status"] == "exited"
            for tool, capability in (
                ("expose_port", "port forwarding"),
                ("snapshot_sandbox", "live snapshots"),
            ):
                args: dict[str, Any] = {"sandbox_id": sid, **({"port": 80} if tool == "expose_port" else {})}
                out = await reg_call(reg, tool, args)
                assert out.get("isError") and capability in out["content"][0]["text"]
                assert "Contree cloud" in out["content"][0]["text"]
            listed = await fcall(reg, "list_sandboxes", {})
            assert [b["sandbox_id"] for b in listed["sandboxes"]] == [sid]
            kept = await fcall(reg, "stop_sandbox", {"sandbox_id": sid, "commit": True})
            assert kept["state"] == "stopped" and kept["result_image"]
            out = await reg_call(reg, "exec", {"sandbox_id": sid, "command": "true"})
            assert out.get("isError") and "has stopped" in out["content"][0]["text"]
            gone = await fcall(reg, "start_sandbox", {"image": "busybox:latest", "networking": False})
            await fcall(reg, "stop_sandbox", {"sandbox_id": gone["sandbox_id"]})
            cancelled = await engine.get_operation(gone["sandbox_id"])
            assert cancelled.status == "CANCELLED"
        finally:
            await engine.drain()
            await state.close()  # closes the engine too
