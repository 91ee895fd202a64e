"""The engine service's life: `engine serve | status | stop`, one service per home, stale sockets, idle
exit, stopping with and without running work, SIGKILL and replacement, version skew, start-up errors."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import secrets
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from contree.errors import Unavailable
from contree.service.control import SERVICE_API, ControlConnection, probe
from contree.service.starter import EngineStartError
from tests.service.conftest import (
    engine_cli,
    mounts_under,
    processes_with,
    service_client,
    spawn,
    wait_for,
    wait_status,
)
from tests.tools.conftest import server_command
from tools.version import __version__


def test_serve_status_and_stop(engine_home: Path) -> None:
    started = engine_cli("serve", "--home", str(engine_home), "--detach")
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == f"ready {engine_home / 'engine.sock'}"
    sock = engine_home / "engine.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600

    shown = engine_cli("status", "--home", str(engine_home))
    assert shown.returncode == 0, shown.stderr
    assert "state:      ready" in shown.stdout and f"socket:     {sock}" in shown.stdout
    status = json.loads(engine_cli("status", "--home", str(engine_home), "--json").stdout)
    assert status["running"] is True and status["version"] == __version__ and status["api"] == SERVICE_API
    assert status["clients"] == [] and status["running_operations"] == 0

    second = engine_cli("serve", "--home", str(engine_home), "--detach")
    assert second.returncode == 3 and second.stdout.startswith("busy ")  # the lock decides

    with ControlConnection(engine_home, pin=True) as service:
        stopped = engine_cli("stop", "--home", str(engine_home))
        assert stopped.returncode == 0 and "stopped the engine service" in stopped.stdout
        assert service.wait_exit(0)  # stop returns only once the process has exited
    assert not sock.exists() and mounts_under(engine_home) == []
    gone = engine_cli("status", "--home", str(engine_home))
    assert gone.returncode == 3 and "no engine service is running" in gone.stdout
    assert engine_cli("stop", "--home", str(engine_home)).returncode == 0  # nothing to stop is fine


def dead_socket(home: Path) -> None:
    """Bound, never listening, closed: the socket file a killed service leaves."""
    home.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(home / "engine.sock"))
    dead.close()


async def test_stale_socket_of_a_dead_service_is_replaced(fresh_home: Path) -> None:
    dead_socket(fresh_home)
    assert probe(fresh_home) is None
    async with service_client(fresh_home) as client:
        assert client.status is not None and client.status.state == "ready"
        assert (await client.whoami()).token_uuid


async def test_idle_exit_waits_for_clients_and_running_work(engine_home: Path) -> None:
    started = engine_cli("serve", "--home", str(engine_home), "--detach", "--idle-exit", "1s")
    assert started.returncode == 0, started.stderr
    with ControlConnection(engine_home, pin=True) as service:
        async with service_client(engine_home, "idle-test") as client:
            await asyncio.wait_for(client.attached.wait(), 10)
            await asyncio.sleep(2.0)
            status = service.refresh()
            assert [c.name for c in status.clients] == ["idle-test"] and status.idle_for is None
            op = await spawn(client, "sleep 2.5")
            await wait_status(client, op, {"EXECUTING"})
        # no client any more, but the run keeps it alive
        await asyncio.sleep(1.5)
        status = service.refresh()
        assert status.clients == [] and status.running_operations == 1, status
        assert await asyncio.to_thread(service.wait_exit, 30)
    async with service_client(engine_home) as client:  # auto-started again: the run finished
        assert (await client.get_operation(op)).status == "SUCCESS"


async def test_stop_drains_running_work_and_refuses_new_work(engine_home: Path) -> None:
    async with service_client(engine_home) as client:
        op = await spawn(client, "sleep 1.5; echo drained")
        await wait_status(client, op, {"EXECUTING"})
        with ControlConnection(engine_home, pin=True) as service:
            stopping = asyncio.create_task(asyncio.to_thread(engine_cli, "stop", "--home", str(engine_home)))
            await asyncio.sleep(0.5)
            assert service.refresh().state == "stopping"
            with pytest.raises(Unavailable, match="is stopping"):
                await spawn(client, "echo too late")
            result = await stopping
            assert result.returncode == 0 and "waiting for 1 operations" in result.stdout, result
            assert service.wait_exit(0)
        # the next request starts a new service; the drained run completed
        done = await client.get_operation(op)
        assert done.status == "SUCCESS", done


async def test_stop_now_cancels_running_work(engine_home: Path) -> None:
    async with service_client(engine_home) as client:
        op = await spawn(client, "sleep 60")
        await wait_status(client, op, {"EXECUTING"})
        began = time.monotonic()
        result = await asyncio.to_thread(engine_cli, "stop", "--now", "--home", str(engine_home))
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - began < 30
        assert probe(engine_home) is None and mounts_under(engine_home) == []
        assert (await client.get_operation(op)).status == "CANCELLED"  # a new service reads the record


async def test_a_killed_service_is_replaced_and_its_work_reported_failed(engine_home: Path) -> None:
    marker = f"{secrets.randbelow(900) + 100}.{secrets.randbelow(10**6)}"
    async with service_client(engine_home) as client:
        op = await spawn(client, f"sleep {marker}")
        await wait_status(client, op, {"EXECUTING"})
        await wait_for(lambda: processes_with(f"sleep {marker}"))
        with ControlConnection(engine_home, pin=True) as service:
            signal.pidfd_send_signal(service.pidfd, signal.SIGKILL)
            assert service.wait_exit(10)
        # the next request finds the socket dead, starts a successor and is sent again
        failed = await client.get_operation(op)
        assert failed.status == "FAILED" and "engine restarted" in (failed.error or ""), failed
        assert client.status is not None and client.status.state == "ready"
        assert processes_with(f"sleep {marker}") == []
        assert mounts_under(engine_home) == []
        assert (await client.get_operation(await spawn(client, "true"))).uuid


async def test_an_older_idle_service_makes_way(engine_home: Path) -> None:
    old = engine_cli("serve", "--home", str(engine_home), "--detach", "--report-version", "0.0.1")
    assert old.returncode == 0, old.stderr
    with ControlConnection(engine_home, pin=True) as previous:
        async with service_client(engine_home) as client:
            assert client.status is not None and client.status.version == __version__
            assert previous.wait_exit(0)


async def test_an_older_busy_service_is_used_until_its_work_ends(engine_home: Path) -> None:
    old = engine_cli("serve", "--home", str(engine_home), "--detach", "--report-version", "0.0.1")
    assert old.returncode == 0, old.stderr
    with ControlConnection(engine_home, pin=True) as previous:
        async with service_client(engine_home, version="0.0.1") as old_client:
            op = await spawn(old_client, "sleep 7")
            await wait_status(old_client, op, {"EXECUTING"})
            async with service_client(engine_home) as client:
                # still busy after the skew wait: attached to the old one, which now retires
                assert client.status is not None and client.status.version == "0.0.1"
                assert previous.refresh().state == "retiring"
                assert await asyncio.to_thread(previous.wait_exit, 30)
                assert (await client.get_operation(op)).status == "SUCCESS"
                assert client.status.version == __version__  # the request brought ours up


async def test_a_newer_service_is_used_when_compatible_else_the_client_says_what_to_do(
    engine_home: Path,
) -> None:
    newer = engine_cli("serve", "--home", str(engine_home), "--detach", "--report-version", "99.0.0")
    assert newer.returncode == 0, newer.stderr
    async with service_client(engine_home) as client:
        assert client.status is not None and client.status.version == "99.0.0"
    assert engine_cli("stop", "--home", str(engine_home)).returncode == 0
    newer = engine_cli(
        "serve", "--home", str(engine_home), "--detach", "--report-version", "99.0.0", "--report-api", "99"
    )
    assert newer.returncode == 0, newer.stderr
    with pytest.raises(EngineStartError, match=r"restart this session with contree-mcp 99\.0\.0"):
        async with service_client(engine_home):
            pass


def hold_engine_lock(home: Path) -> int:
    """What an in-process engine (an older contree-mcp, a test's LocalEngine) holds."""
    home.mkdir(mode=0o700)
    fd = os.open(home / "engine.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


async def test_a_lock_held_by_an_engine_that_serves_no_socket_is_reported(
    fresh_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from contree.service import starter

    monkeypatch.setattr(starter, "NON_SERVICE_HOLDER_WAIT", 2.0)  # 20 s covers a service closing its engine
    fd = hold_engine_lock(fresh_home)
    try:
        with pytest.raises(EngineStartError) as caught:
            async with service_client(fresh_home):
                pass
    finally:
        os.close(fd)
    message = str(caught.value)
    assert message.startswith(f"the engine at {fresh_home} could not start: another process holds")
    assert message.endswith("stop it or use another --home") and "\n" not in message
    assert not (fresh_home / "engine.log").exists()  # the busy home was never written to


async def test_a_home_that_cannot_be_created_is_one_clear_line(tmp_path: Path) -> None:
    home = tmp_path / "file" / "home"
    await asyncio.to_thread((tmp_path / "file").write_text, "not a directory")
    with pytest.raises(EngineStartError) as caught:
        async with service_client(home):
            pass
    message = str(caught.value)  # the home cannot be made: nothing was started, so no log to point to
    assert message.startswith(f"the engine at {home} could not start: ") and "\n" not in message
    assert str(tmp_path / "file") in message.split(" could not start: ", 1)[1] and "log:" not in message


async def test_a_failed_start_leaves_no_fresh_home_behind(tmp_path: Path) -> None:
    from contree.engine.local import LocalEngine
    from contree.service.server import EngineService

    class BrokenEngine(LocalEngine):
        async def _open(self) -> None:
            await super()._open()  # the store, blobs and operation log exist by now
            raise RuntimeError("no usable OCI runtime (simulated)")

    home = tmp_path / "new-home"
    reports: list[tuple[str, str]] = []
    service = EngineService(
        home, engine=BrokenEngine(home), created_home=True, handle_signals=False, idle_exit=None
    )
    code = await service.serve(lambda kind, message: reports.append((kind, message)))
    assert code == 1 and reports == [("error", "no usable OCI runtime (simulated)")]
    assert not home.exists()


async def test_serve_api_and_mcp_sessions_share_one_engine(engine_home: Path, workdir: Path) -> None:
    """A TCP API client and a local MCP session see the same images through one engine service."""
    import aiohttp

    from tests.netutil import free_port, server_process
    from tests.tools.conftest import mcp_session
    from tests.tools.test_sdk_tools import result

    port = free_port()
    argv = [*server_command(), "serve-api", "--listen", f"127.0.0.1:{port}", "--home", str(engine_home),
            "--token", "shared-token"]
    url = f"http://127.0.0.1:{port}/v1"
    log = workdir.parent / "api.log"
    auth = {"Authorization": "Bearer shared-token"}
    async with server_process(argv, ready_url=url + "/whoami", log=log, name="serve-api", headers=auth):
        async with mcp_session(engine_home, workdir) as s:
            session: Any = s
            run = {"command": "echo via-mcp > /f", "image": "busybox:latest", "disposable": False}
            made = result(await session.call_tool("run", run))
            status = probe(engine_home)
            assert status is not None
            assert sorted(c.name for c in status.clients) == ["contree-mcp stdio", "serve-api"]
            async with aiohttp.ClientSession(headers=auth) as http:
                params = {"path": "/f"}
                image = made["result_image_uuid"]
                async with http.get(f"{url}/inspect/{image}/download", params=params) as r:
                    assert r.status == 200 and await r.read() == b"via-mcp\n"


def test_http_mode_reports_an_engine_that_cannot_start_in_one_line(tmp_path: Path) -> None:
    import subprocess

    from tests.netutil import free_port

    (tmp_path / "file").write_text("not a directory")
    home = tmp_path / "file" / "home"
    argv = [*server_command(), "--mode", "http", "--http-port", str(free_port()), "--home", str(home)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.startswith(f"[ERROR] the engine at {home} could not start: ")
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


async def test_a_client_arriving_while_the_service_shuts_down_gets_its_successor(engine_home: Path) -> None:
    async with service_client(engine_home) as client:
        op = await spawn(client, "sleep 60")
        await wait_status(client, op, {"EXECUTING"})
        with ControlConnection(engine_home, pin=True) as old:
            old.stop("now")  # cancels the run; the engine closes while the next client arrives
            async with service_client(engine_home, "late") as late:
                assert old.wait_exit(0)
                assert late.status is not None and late.status.pid != old.status.pid
                assert (await late.get_operation(op)).status == "CANCELLED"


async def test_a_home_too_long_for_a_socket_path_still_gets_its_service(tmp_path: Path) -> None:
    from tests.service_util import stop_service

    home = tmp_path / ("long-" * 12) / ("path-" * 8) / "home"  # well past sockaddr_un's 108 bytes
    assert len(str(home / "engine.sock")) > 108
    try:
        async with service_client(home) as client:
            assert (await client.whoami()).token_uuid
            status = engine_cli("status", "--home", str(home))
            assert status.returncode == 0 and "state:      ready" in status.stdout
    finally:
        stop_service(home)
    assert probe(home) is None
