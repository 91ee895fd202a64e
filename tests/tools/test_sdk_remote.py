"""The Contree-cloud path end to end: SDK client → contree-mcp --backend contree → RemoteBackend → the
REST API (`contree-mcp serve-api`) → the embedded engine. Lineage comes from the server's own records."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import AnyUrl

from tests.tools.conftest import mcp_session, server_command
from tests.tools.test_sdk_tools import result

TOKEN = "remote-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def rest_api(home: Path, log: Path) -> AsyncIterator[str]:
    port = free_port()
    command, *args = server_command()
    with open(log, "ab") as out:  # noqa: ASYNC230
        proc = await asyncio.create_subprocess_exec(
            command,
            *args,
            "serve-api",
            "--listen",
            f"127.0.0.1:{port}",
            "--home",
            str(home),
            "--token",
            TOKEN,
            stdout=out,
            stderr=out,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            for _ in range(300):
                if proc.returncode is not None:
                    pytest.fail(f"serve-api exited with {proc.returncode}; see {log}")
                try:
                    async with http.get(url + "/v1/whoami") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                pytest.fail("serve-api did not come up")
        yield url
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def test_tools_over_the_contree_rest_api(engine_home: Path, workdir: Path, tmp_path: Path) -> None:
    (workdir / "src").mkdir()
    (workdir / "src" / "hello.sh").write_text("echo synced\n")
    async with rest_api(engine_home, tmp_path / "rest.log") as url:
        backend = ["--backend", "contree", "--url", url, "--token", TOKEN, "--auth-type", "jwt"]
        env = {"CONTREE_HOME": str(tmp_path / "contree-home")}
        async with mcp_session(engine_home, workdir, backend_args=backend, env=env) as s:
            session: Any = s
            tools = (await session.list_tools()).tools
            run_tool = next(t for t in tools if t.name == "run")
            assert run_tool.description.split("\n", 1)[0].endswith("Spawns microVM.")
            images = result(await session.call_tool("list_images", {"tag_prefix": "busybox"}))["images"]
            base = images[0]["uuid"]
            state_id = result(
                await session.call_tool("rsync", {"source": str(workdir / "src"), "destination": "/src"})
            )
            made = result(
                await session.call_tool(
                    "run",
                    {
                        "command": "sh /src/hello.sh; echo made > /made.txt",
                        "image": "busybox:latest",
                        "disposable": False,
                        "directory_state_id": state_id,
                    },
                )
            )
            assert made["stdout"] == "synced\n" and made["filesystem_changed"] is True
            child = made["result_image"]
            text = result(await session.call_tool("read_file", {"image": child, "path": "/made.txt"}))
            assert text["content"] == "made\n"
            lineage = json.loads(
                (await session.read_resource(AnyUrl(f"contree://image/{child}/lineage"))).contents[0].text
            )
            assert lineage["parent"] == base and lineage["is_known"] is True
            ops = [
                result(
                    await session.call_tool("run", {"command": f"echo {i}", "image": child, "wait": False})
                )["operation_id"]
                for i in range(2)
            ]
            waited = result(await session.call_tool("wait_operations", {"operation_ids": ops, "timeout": 60}))
            assert sorted(waited["completed"]) == sorted(ops)
            assert [waited["results"][op]["stdout"] for op in ops] == ["0\n", "1\n"]
            me = result(await session.call_tool("whoami", {}))
            assert me["backend"] == "contree"
    assert (tmp_path / "contree-home" / "mcp" / "lineage.db").exists()
