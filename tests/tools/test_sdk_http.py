"""HTTP mode through the SDK's Streamable HTTP client: bearer token, tools, docs at `/`, no browser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

from tests.netutil import free_port
from tests.tools.conftest import http_server
from tests.tools.test_sdk_tools import result

TOKEN = "http-test-token-123"


async def test_http_mode_with_bearer_token(engine_home: Path, workdir: Path) -> None:
    port = free_port()
    async with http_server(engine_home, workdir, port, "--http-token", TOKEN) as base:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"}) as resp:
                assert resp.status == 401
            async with http.get(f"{base}/tools") as resp:
                assert resp.status == 200 and "wait_operations" in await resp.text()
            async with http.get(f"{base}/") as resp:
                assert "Authorization: Bearer $CONTREE_MCP_HTTP_TOKEN" in await resp.text()
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with streamablehttp_client(f"{base}/mcp", headers=headers) as (read, write, _):
            async with ClientSession(read, write) as s:
                session: Any = s
                init = await session.initialize()
                assert init.serverInfo.name == "contree-mcp"
                assert len((await session.list_tools()).tools) == 29
                done = result(
                    await session.call_tool("run", {"command": "echo over-http", "image": "busybox:latest"})
                )
                assert done["stdout"] == "over-http\n" and done["exit_code"] == 0
                page = result(await session.call_tool("registry_token_obtain", {"registry_url": "docker.io"}))
                assert page["message"].startswith(
                    "Open https://app.docker.com/"
                )  # never a browser in HTTP mode
