"""Long-lived sandboxes in the embedded engine: contree-init, the idle lease, port forwards, live
snapshots, the sandbox queue (the MCP surface is tested in tests/tools/test_sdk_sandboxes.py)."""

from __future__ import annotations

import array
import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from contree import api
from contree.engine.keepalive import IdleLease
from contree.engine.local import EngineLimits, LocalEngine
from contree.engine.runtime import sandbox_init
from contree.errors import BadRequest, Conflict, NotFound, RateLimited
from contree.sandbox_api import SandboxRequest, StopSandboxRequest
from tests.contract.conftest import seed_busybox


@pytest.fixture
async def engine(mount_guard: Path, busybox_rootfs: Path) -> AsyncIterator[LocalEngine]:
    eng = LocalEngine(
        mount_guard / "home",
        limits=EngineLimits(instance_max_concurrency=1, sandbox_max_count=3, sandbox_max_ttl=3600),
    )
    await eng.start()
    try:
        seed_busybox(eng, busybox_rootfs)
        yield eng
    finally:
        await eng.close()


async def start(engine: LocalEngine, **fields: object) -> str:
    fields.setdefault("networking", False)
    info = await engine.start_sandbox(SandboxRequest(image="tag:busybox:latest", **fields))  # type: ignore[arg-type]
    assert info.state == "running"
    return info.uuid


async def ex(engine: LocalEngine, sid: str, command: str, **fields: object) -> api.InstanceResult:
    fields.setdefault("timeout", 30)
    spid = await engine.create_subprocess(sid, api.ExecSpec(command=command, shell=True, **fields))  # type: ignore[arg-type]
    return await engine.wait_subprocess(sid, spid, 30)


def out(result: api.InstanceResult) -> str:
    assert result.stdout is not None
    return api.decode_stream(result.stdout).decode()


# ---------------------------------------------------------------------- contree-init


async def test_processes_get_the_identity_directory_and_environment_asked(engine: LocalEngine) -> None:
    sid = await start(engine, env={"FROM_SANDBOX": "s", "BOTH": "sandbox"}, cwd="/srv")
    res = await ex(
        engine,
        sid,
        'id -u; id -g; pwd; echo "$FROM_SANDBOX $BOTH $OWN"',
        uid=1000,
        gid=1001,
        env={"BOTH": "exec", "OWN": "o"},
        cwd="/tmp",
    )
    assert out(res) == "1000\n1001\n/tmp\ns exec o\n" and res.state and res.state.exit_code == 0
    default = await ex(engine, sid, "pwd; id -u")
    assert out(default) == "/srv\n0\n"
    plain = await engine.create_subprocess(sid, api.ExecSpec(command="/bin/echo", args=["a b", "c"]))
    assert out(await engine.wait_subprocess(sid, plain, 10)) == "a b c\n"


async def test_exits_by_code_and_by_signal_carry_rusage(engine: LocalEngine) -> None:
    sid = await start(engine)
    busy = await ex(engine, sid, "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exit 3")
    assert busy.state and busy.state.exit_code == 3 and busy.resources
    assert busy.resources.user_cpu_time + busy.resources.system_cpu_time > 0 and busy.resources.max_rss > 0
    killed = await ex(engine, sid, "kill -KILL $$")
    assert killed.state and killed.state.signal == 9 and killed.state.exit_code == -1


async def test_a_signal_reaches_what_the_process_started(engine: LocalEngine) -> None:
    sid = await start(engine)
    spid = await engine.create_subprocess(
        sid, api.ExecSpec(command="sleep 100 & sleep 100 & wait", shell=True)
    )
    await asyncio.sleep(0.3)
    assert out(await ex(engine, sid, "ps -o comm | grep -c '^sleep'")) == "2\n"
    await engine.kill_subprocess(sid, spid, "TERM")
    done = await engine.wait_subprocess(sid, spid, 10)
    assert done.state and done.state.signal == 15
    assert out(await ex(engine, sid, "ps -o comm | grep -c '^sleep' || true")) == "0\n"


async def test_orphans_are_reaped(engine: LocalEngine) -> None:
    sid = await start(engine)
    await ex(engine, sid, "(sleep 0.2 &) ; (sleep 0.2 &) ; true")
    await asyncio.sleep(0.6)
    states = out(await ex(engine, sid, "ps -o stat,comm"))
    assert "Z" not in "".join(line.split()[0] for line in states.splitlines()[1:]), states


async def test_pid_1_is_out_of_reach_from_inside(engine: LocalEngine) -> None:
    sid = await start(engine)
    res = await ex(
        engine,
        sid,
        "kill -KILL 1; kill -TERM 1; kill -INT 1; ls /proc/1/fd 2>&1; "
        "cat /proc/1/environ 2>&1; for f in /proc/self/fd/*; do readlink $f; done",
    )
    text = out(res)
    assert "Permission denied" in text and "socket:" not in text  # no process inherits the control socket
    await asyncio.sleep(0.2)
    assert out(await ex(engine, sid, "echo alive")) == "alive\n"
    assert (await engine.get_sandbox(sid)).state == "running"


async def test_many_short_processes_all_report_their_exit(engine: LocalEngine) -> None:
    sid = await start(engine)
    spids = [await engine.create_subprocess(sid, api.ExecSpec(command="true")) for _ in range(40)]
    results = await asyncio.gather(*(engine.wait_subprocess(sid, s, 10) for s in spids))
    assert [r.state.exit_code for r in results if r.state] == [0] * 40


async def test_a_command_that_cannot_start_reads_like_a_shells_127(engine: LocalEngine) -> None:
    sid = await start(engine)
    spid = await engine.create_subprocess(sid, api.ExecSpec(command="/nope"))
    res = await engine.get_subprocess(sid, spid)
    assert (
        res.state
        and res.state.exit_code == 127
        and "'/nope' not found" in api.decode_stream(res.stderr).decode()
    )  # type: ignore[arg-type]
    cwd = await engine.create_subprocess(sid, api.ExecSpec(command="true", cwd="/no/such/dir"))
    res = await engine.get_subprocess(sid, cwd)
    assert (
        res.state
        and res.state.exit_code == 127
        and "working directory" in api.decode_stream(res.stderr).decode()
    )  # type: ignore[arg-type]


async def test_a_foreground_process_is_killed_at_its_timeout(engine: LocalEngine) -> None:
    sid = await start(engine)
    res = await ex(engine, sid, "sleep 30", timeout=1)
    assert res.state and res.state.timed_out and res.state.signal == 9


# ---------------------------------------------------------------------- the control channel


async def test_the_engine_ignores_malformed_and_unexpected_messages_from_the_init() -> None:
    """Everything the init sends is untrusted once user code runs: junk, stray descriptors and unknown
    ids are dropped (descriptors closed), and the channel still works."""
    channel = sandbox_init.InitChannel()
    peer = socket.socket(fileno=os.dup(channel.child_fd()))
    channel.child_spawned()
    try:
        base = len(os.listdir("/proc/self/fd"))
        stray = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", stray))]
        peer.sendmsg([struct.pack("=IIIi", sandbox_init.T_HELLO, 0, sandbox_init.PROTOCOL_VERSION, 1)])
        await channel.hello(5)
        peer.sendmsg([b"\x01"], rights)  # too short
        peer.sendmsg([struct.pack("=IIi", sandbox_init.T_STARTED, 77, 5)], rights)  # unknown id
        peer.sendmsg([struct.pack("=IIiI9q", sandbox_init.T_EXITED, 78, 0, 0, *[0] * 9)], rights)
        peer.sendmsg([struct.pack("=II", 999, 1) + b"x" * 100])  # unknown type
        for fd in stray:
            os.close(fd)
        await asyncio.sleep(0.1)
        assert not channel.closed
        assert len(os.listdir("/proc/self/fd")) <= base  # every descriptor it was sent is closed

        async def fake_init() -> None:
            data, _, _, _ = await asyncio.to_thread(peer.recvmsg, 64, socket.CMSG_SPACE(64))
            kind, ident = struct.unpack_from("=II", data)
            assert kind == sandbox_init.T_SPAWN
            peer.sendmsg([struct.pack("=IIiI", sandbox_init.T_FAILED, ident, 2, 8)])

        task = asyncio.create_task(fake_init())
        with pytest.raises(sandbox_init.FailedToStart, match="'x' not found"):
            await channel.spawn(["x"], [], "/", 0, 0, stdin=False)
        await task
    finally:
        channel.close()
        peer.close()


def test_the_init_builds_from_source(tmp_path: Path) -> None:
    built = sandbox_init.build(tmp_path / "bin" / "contree-init")
    assert built.stat().st_mode & 0o111 and built.read_bytes()[:4] == b"\x7fELF"
    assert list((tmp_path / "bin").iterdir()) == [built]  # nothing half-written beside it


# ---------------------------------------------------------------------- the idle lease


def test_the_idle_lease_counts_from_the_last_activity_and_never_while_busy() -> None:
    now = [100.0]
    lease = IdleLease(10, clock=lambda: now[0])
    now[0] = 109.0
    assert not lease.expired() and lease.remaining() == 1.0
    lease.touch()
    now[0] = 118.0
    assert not lease.expired()
    token = lease.begin(deadline=200.0)
    now[0] = 150.0
    assert not lease.expired() and lease.busy and lease.idle_for() == 0.0
    assert lease.expires_at() == 210.0  # the latest the foreground process may end, plus the TTL
    lease.end(token)
    now[0] = 159.0
    assert not lease.expired()
    now[0] = 160.0
    assert lease.expired()


# ---------------------------------------------------------------------- ports


async def test_a_forward_reaches_a_loopback_only_server_and_counts_as_activity(engine: LocalEngine) -> None:
    sid = await start(engine)  # no networking: only lo, and the forward still reaches it
    await engine.create_subprocess(
        sid,
        api.ExecSpec(
            command="mkdir -p /www && echo fwd > /www/i && exec busybox httpd -f -p 127.0.0.1:8080 -h /www",
            shell=True,
        ),
    )
    await asyncio.sleep(0.3)
    run = engine.sandboxes.runs[sid]
    before = run.lease.last_active
    forward = await engine.expose_port(sid, 8080)
    assert forward.host == "127.0.0.1" and forward.url == f"http://127.0.0.1:{forward.host_port}"
    reader, writer = await asyncio.open_connection("127.0.0.1", forward.host_port)
    writer.write(b"GET /i HTTP/1.0\r\n\r\n")
    reply = await reader.read()
    writer.close()
    assert reply.startswith(b"HTTP/1.") and reply.endswith(b"fwd\n")
    assert run.lease.last_active > before
    info = (await engine.get_sandbox(sid)).ports[0]
    assert info.connections == 1 and info.bytes_in > 0 and info.bytes_out == len(reply)
    assert (await engine.expose_port(sid, 8080)).host_port == forward.host_port  # idempotent
    # nothing listens on 9090: the client's connection is closed, the forward stays
    refused = await engine.expose_port(sid, 9090)
    reader, writer = await asyncio.open_connection("127.0.0.1", refused.host_port)
    assert await reader.read() == b""
    writer.close()
    await engine.close_port(sid, 9090)
    with pytest.raises(NotFound):
        await engine.close_port(sid, 9090)
    await engine.stop_sandbox(sid, StopSandboxRequest())
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", forward.host_port)


async def test_a_forward_is_refused_beyond_the_limit_and_outside_the_port_range(engine: LocalEngine) -> None:
    sid = await start(engine)
    with pytest.raises(BadRequest):
        await engine.expose_port(sid, 0)
    for port in range(1, 17):
        await engine.expose_port(sid, port)
    with pytest.raises(RateLimited, match="at most 16 ports"):
        await engine.expose_port(sid, 17)


# ---------------------------------------------------------------------- snapshots


async def test_a_snapshot_holds_container_ids_and_leaves_the_sandbox_as_it_was(engine: LocalEngine) -> None:
    sid = await start(engine)
    await ex(engine, sid, "mkdir /d && echo one > /d/f && chown 1000:1001 /d/f && echo gone > /old")
    await ex(engine, sid, "rm /old /etc/hostname 2>/dev/null; true")
    counter = await engine.create_subprocess(
        sid,
        api.ExecSpec(
            command="i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.01; done", shell=True
        ),
    )
    snap = await engine.snapshot_sandbox(sid)
    assert not snap.unchanged and snap.frozen_with == "cgroup freezer" and snap.pause_ms < snap.total_ms
    listing = await engine.list_directory(snap.image.uuid, "/d")
    entry = next(f for f in listing.files if f.path.endswith("f"))
    assert (entry.uid, entry.gid) == (1000, 1001)  # container ids, never the engine's host range
    with pytest.raises(NotFound):
        await engine.check_file(snap.image.uuid, "/old")  # the whiteout is in the image
    assert (await engine.get_image(snap.image.uuid)).uuid == snap.image.uuid
    lineage = await engine.image_lineage(snap.image.uuid)
    assert lineage.parent is not None and lineage.parent.uuid == snap.parent
    # still running, thawed, its files untouched (the live layer keeps the sandbox's own ids)
    first = out(await ex(engine, sid, "cat /tmp/count"))
    await asyncio.sleep(0.3)
    assert int(out(await ex(engine, sid, "cat /tmp/count"))) > int(first)
    assert (
        out(await ex(engine, sid, "stat -c '%u:%g' /d/f; echo two >> /d/f; cat /d/f"))
        == "1000:1001\none\ntwo\n"
    )
    freezer = (
        Path("/sys/fs/cgroup/freezer") / engine.runtime.cgroups.parent.lstrip("/") / sid / "freezer.state"
    )
    assert freezer.read_text().strip() == "THAWED"
    await engine.kill_subprocess(sid, counter, "KILL")
    second = await engine.snapshot_sandbox(sid)
    assert second.image.uuid != snap.image.uuid and second.parent == snap.parent  # siblings
    assert (await engine.get_sandbox(sid)).snapshots == [snap.image.uuid, second.image.uuid]


async def test_a_snapshot_of_an_untouched_sandbox_is_its_image(engine: LocalEngine) -> None:
    sid = await start(engine)
    snap = await engine.snapshot_sandbox(sid)
    assert snap.unchanged and snap.image.uuid == snap.parent


# ---------------------------------------------------------------------- lifecycle and limits


async def test_sandboxes_take_no_run_slots_and_are_bounded_on_their_own(engine: LocalEngine) -> None:
    first, second, third = [await start(engine) for _ in range(3)]  # instance_max_concurrency=1
    spawned = await engine.spawn(
        api.InstanceSpawnRequest(command="echo run", image="tag:busybox:latest", shell=True, timeout=30)
    )
    async for event in engine.events(spawned.uuid, follow=True):
        if event.type == "completion":
            break
    assert (await engine.get_operation(spawned.uuid)).status == "SUCCESS"
    with pytest.raises(RateLimited, match="sandbox_max_count"):
        await start(engine)
    with pytest.raises(BadRequest, match="sandbox_max_ttl_seconds"):
        await engine.start_sandbox(SandboxRequest(image="tag:busybox:latest", ttl_seconds=7200))
    assert {s.uuid for s in await engine.list_sandboxes()} == {first, second, third}
    assert engine.sandboxes.blocker() == "3 sandboxes running"
    me = await engine.whoami()
    assert me.limits["sandbox_max_count"] == 3 and me.limits["sandbox_max_ttl_seconds"] == 3600


async def test_cancel_kills_and_killing_pid_1_ends_a_sandbox(engine: LocalEngine) -> None:
    cancelled = await start(engine)
    await engine.cancel_operation(cancelled)
    await engine.sandboxes.runs[cancelled].ended.wait() if cancelled in engine.sandboxes.runs else None
    info = await engine.get_sandbox(cancelled)
    assert (info.state, info.status, info.stop_reason) == ("stopped", "CANCELLED", "cancelled")
    killed = await start(engine)
    run = engine.sandboxes.runs[killed]
    await engine.kill_subprocess(killed, 1, "KILL")
    await run.ended.wait()
    assert (await engine.get_sandbox(killed)).stop_reason == "exited"
    with pytest.raises(Conflict, match="has stopped"):
        await engine.create_subprocess(killed, api.ExecSpec(command="true"))
    with pytest.raises(NotFound, match="not a sandbox"):
        spawned = await engine.spawn(api.InstanceSpawnRequest(command="true", image="tag:busybox:latest"))
        await engine.get_sandbox(spawned.uuid)


async def test_an_idle_sandbox_is_stopped_and_the_busy_one_is_not(engine: LocalEngine) -> None:
    idle = await start(engine, ttl_seconds=1)
    busy = await start(engine, ttl_seconds=1)
    res = await ex(engine, busy, "sleep 2.5; echo done", timeout=10)
    assert out(res) == "done\n"
    info = await engine.get_sandbox(idle)
    assert (info.state, info.stop_reason, info.status) == ("stopped", "idle", "SUCCESS")
    assert (await engine.get_sandbox(busy)).state == "running"
