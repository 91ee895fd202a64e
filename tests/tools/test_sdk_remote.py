"""The Contree-cloud path end to end: SDK client → contree-mcp --backend contree → RemoteBackend → the
REST API (`contree-mcp serve-api`) → the embedded engine. Lineage comes from the server's own records."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pydantic import AnyUrl

from tests.netutil import free_port, server_process
from tests.tools.conftest import mcp_session, server_command
from tests.tools.test_sdk_tools import result

TOKEN = "remote-test-token"


@asynccontextmanager
async def rest_api(home: Path, log: Path) -> AsyncIterator[str]:
    port = free_port()
    argv = [
        *server_command(),
        "serve-api",
        "--listen",
        f"127.0.0.1:{port}",
        "--home",
        str(home),
        "--token",
        TOKEN,
    ]
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with server_process(argv, ready_url=url + "/v1/whoami", log=log, name="serve-api", headers=auth):
        yield url


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
            child = made["result_image_uuid"]
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


async def test_whole_output_pages_through_the_rest_api(
    engine_home: Path, workdir: Path, tmp_path: Path
) -> None:
    """The engine behind its REST API (what a remote engine service is) still serves every byte."""
    async with rest_api(engine_home, tmp_path / "rest.log") as url:
        backend = ["--backend", "contree", "--url", url, "--token", TOKEN, "--auth-type", "jwt"]
        env = {"CONTREE_HOME": str(tmp_path / "contree-home")}
        async with mcp_session(engine_home, workdir, backend_args=backend, env=env) as s:
            session: Any = s
            done = result(
                await session.call_tool(
                    "run",
                    {"command": "seq 1 2000000; echo end >&2", "image": "busybox:latest", "timeout": 120},
                )
            )
            expected = "".join(f"{i}\n" for i in range(1, 2000001)).encode()
            assert done["stdout_bytes"] == len(expected) > 10 * 1024 * 1024  # beyond what the API records
            assert expected.endswith(done["stdout_tail"].encode()) and done["stderr"] == "end\n"
            got = bytearray()
            while True:
                uri = f"{done['stdout_resource']}?offset={len(got)}&limit=1048576"
                item = (await session.read_resource(AnyUrl(uri))).contents[0]
                assert item.meta["source"] == "engine"
                if not item.text:
                    break
                got += item.text.encode()
            assert bytes(got) == expected
