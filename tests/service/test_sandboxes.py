"""Long-lived sandboxes through the engine service's REST API (`/v1/sandboxes`, what every MCP server
uses): the service outlives its clients while a sandbox runs, and the extension's errors keep their
statuses through RemoteBackend. A server without the extension answers 404 naming the capability."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from contree import api
from contree.client import RemoteBackend
from contree.errors import BadRequest, Conflict, NotFound
from contree.rest import build_app
from contree.sandbox_api import SandboxRequest, StopSandboxRequest, process_exited
from contree.service.control import ControlConnection
from tests.fake_backend import FakeBackend
from tests.service.conftest import engine_cli, service_client


async def test_the_service_stays_up_while_a_sandbox_runs_and_not_after(engine_home: Path) -> None:
    started = engine_cli("serve", "--home", str(engine_home), "--detach", "--idle-exit", "1s")
    assert started.returncode == 0, started.stderr
    with ControlConnection(engine_home, pin=True) as service:
        async with service_client(engine_home, "sandbox-test") as client:
            image = await client.resolve_tag("busybox:latest")
            info = await client.start_sandbox(SandboxRequest(image=image, networking=False, ttl_seconds=3))
            assert info.state == "running" and (await client.get_sandbox(info.uuid)).uuid == info.uuid
            spid = await client.create_subprocess(
                info.uuid, api.ExecSpec(command="sleep 1; echo waited", shell=True)
            )
            done = await client.wait_subprocess(info.uuid, spid, 30)  # one long poll, not a busy loop
            assert process_exited(done) and done.stdout and done.stdout.value == "waited\n"
        # no client any more: the sandbox keeps the service up until its idle TTL ends it
        await asyncio.sleep(1.5)
        status = service.refresh()
        assert status.clients == [] and status.idle_for is None, status
        assert await asyncio.to_thread(service.wait_exit, 30)
    async with service_client(engine_home) as client:
        ended = await client.get_sandbox(info.uuid)
        assert (ended.state, ended.stop_reason) == ("stopped", "idle")


async def test_the_extensions_errors_keep_their_statuses(engine_home: Path) -> None:
    async with service_client(engine_home) as client:
        image = await client.resolve_tag("busybox:latest")
        with pytest.raises(BadRequest, match="ttl_seconds must be at most"):
            await client.start_sandbox(SandboxRequest(image=image, ttl_seconds=10**9))
        with pytest.raises(NotFound):
            await client.start_sandbox(SandboxRequest(image="00000000-0000-4000-8000-000000000000"))
        with pytest.raises(NotFound):
            await client.get_sandbox("00000000-0000-4000-8000-000000000000")
        info = await client.start_sandbox(SandboxRequest(image=image, networking=False))
        forward = await client.expose_port(info.uuid, 8080)
        assert forward.host == "127.0.0.1"
        listed = await client.list_sandboxes()
        assert [s.uuid for s in listed] == [info.uuid] and listed[0].ports[0].port == 8080
        await client.close_port(info.uuid, 8080)
        snap = await client.snapshot_sandbox(info.uuid)
        assert snap.unchanged and snap.image.uuid == image
        ended = await client.stop_sandbox(info.uuid, StopSandboxRequest(commit=True))
        assert ended.state == "stopped" and ended.result_image == image  # unchanged: the image it came from
        with pytest.raises(Conflict, match="has already stopped"):
            await client.stop_sandbox(info.uuid, StopSandboxRequest())
        with pytest.raises(Conflict, match=f"sandbox {info.uuid} has stopped"):
            await client.create_subprocess(info.uuid, api.ExecSpec(command="true"))
        with pytest.raises(Conflict):
            await client.snapshot_sandbox(info.uuid)


async def test_a_server_without_the_extension_says_so() -> None:
    server = TestServer(build_app(FakeBackend(), keepalive=0.2), host="127.0.0.1")
    await server.start_server()
    client = RemoteBackend(str(server.make_url("")).rstrip("/"), token=None, timeout=10, backoff=0.01)
    try:
        with pytest.raises(NotFound, match="no long-lived sandboxes"):
            await client.list_sandboxes()
        with pytest.raises(NotFound, match="no long-lived sandboxes"):
            await client.start_sandbox(SandboxRequest(image="00000000-0000-4000-8000-000000000000"))
    finally:
        await client.close()
        await server.close()
