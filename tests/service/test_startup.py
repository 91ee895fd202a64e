"""What a stdio server does before it answers `initialize` on a home whose service runs: no aiohttp
(its import alone was half the start-up), and nothing a later request then lacks."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import msgspec

from contree import api
from contree.backend import ImageQuery
from tests.service.conftest import service_client
from tests.service_util import TEST_IDLE_EXIT

ROOT = Path(__file__).resolve().parents[2]
INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}
# `contree-mcp` whose imports of aiohttp and yarl wait until the file named first exists
GATED = """
import os, runpy, sys, time
gate = sys.argv[1]
class Gate:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("aiohttp", "yarl"):
            while not os.path.exists(gate):
                time.sleep(0.01)
        return None
sys.meta_path.insert(0, Gate())
sys.argv = ["contree-mcp", *sys.argv[2:]]
runpy.run_module("tools", run_name="__main__", alter_sys=True)
"""


class Stdio:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def ask(self, rid: int, *messages: dict[str, Any], wait: float = 60) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"".join(msgspec.json.encode(m) + b"\n" for m in messages))
        await self.proc.stdin.drain()
        async with asyncio.timeout(wait):
            while True:
                line = await self.proc.stdout.readline()
                assert line, "the server closed stdout"
                reply = msgspec.json.decode(line)
                if reply.get("id") == rid:
                    return reply

    async def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        async with asyncio.timeout(30):
            await self.proc.wait()


async def start(argv: list[str], cwd: Path) -> Stdio:
    env = {**os.environ, "CONTREE_ENGINE_IDLE_EXIT": TEST_IDLE_EXIT}
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, limit=16 << 20,
    )
    return Stdio(proc)


async def test_initialize_is_answered_before_aiohttp_is_loaded(engine_home: Path, workdir: Path) -> None:
    flags = ["--backend", "local", "--home", str(engine_home), "--allowed-root", str(workdir)]
    first = await start([sys.executable, "-m", "tools", *flags], workdir)  # starts the service
    assert "result" in await first.ask(0, INIT)
    await first.close()

    gate = workdir / "gate"
    server = await start([sys.executable, "-c", GATED, str(gate), *flags], workdir)
    try:
        answer = await server.ask(0, INIT, wait=30)  # a server that needed aiohttp first would hang here
        assert "busybox:latest" in answer["result"]["instructions"]  # the images table is there
        gate.touch()
        listed = await server.ask(1, {"jsonrpc": "2.0", "method": "notifications/initialized"},
                                  {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert "run" in {tool["name"] for tool in listed["result"]["tools"]}
        arguments = {"command": "echo hi", "image": "busybox:latest", "networking": False}
        ran = await server.ask(2, {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                   "params": {"name": "run", "arguments": arguments}})
        structured = ran["result"]["structuredContent"]
        assert structured.get("result", structured)["stdout"] == "hi\n", ran
    finally:
        gate.touch()
        await server.close()


async def test_images_are_listed_through_the_control_client_until_aiohttp_is_needed(
    engine_home: Path,
) -> None:
    query = ImageQuery(tagged=True, limit=20)
    async with service_client(engine_home) as client:
        early = await client.list_images(query)
        assert client._session is None  # answered without the HTTP client
        await client.whoami()
        assert await client.list_images(query) == early and [i.tag for i in early] == ["busybox:latest"]
        assert all(isinstance(i, api.Image) for i in early)


async def test_a_client_closed_as_soon_as_it_attached_closes_at_once(engine_home: Path) -> None:
    # a server whose client leaves right after `initialize` closes while its lease is still connecting
    for _ in range(10):
        async with asyncio.timeout(10):
            async with service_client(engine_home):
                pass
