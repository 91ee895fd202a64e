"""contree-mcp itself (embedded engine, busybox bootstrapped) driven by clients we did not write, over stdio
and Streamable HTTP: mcp 2.3 in auto mode (settles on 2026-07-28), pinned to 2026-07-28 and in legacy
mode, the TypeScript SDK, the Inspector CLI; plus the Tasks extension on `run` (mcp 1.30 drives the real
server in tests/tools). A real command runs in each era and its live output arrives as progress.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.protocol.httpkit import REPO, http_server, inspector, validators
from tests.protocol.test_external_clients import run_ts_sdk
from tests.service_util import stop_service
from tests.tools.conftest import require_engine_host, seed_busybox, server_command

pytestmark = [pytest.mark.external, pytest.mark.slow]

V = "2026-07-28"
RUN = {"command": "for i in 1 2 3; do echo line-$i; sleep 0.4; done", "image": "busybox:latest"}


@pytest.fixture
def real_server(tmp_path: Path) -> Iterator[list[str]]:
    """The argv of contree-mcp on an engine home of its own; the engine service the servers start in it
    is stopped afterwards."""
    require_engine_host()
    root = tmp_path
    seed_busybox(root / "engine")
    (root / "work").mkdir()
    try:
        yield [
            *server_command(),
            "--backend",
            "local",
            "--home",
            str(root / "engine"),
            "--allowed-root",
            str(root / "work"),
        ]
    finally:
        stop_service(root / "engine")


@pytest.fixture
def real_http(real_server: list[str]) -> Iterator[str]:
    with http_server(real_server) as url:
        yield url


def _py2(*args: str) -> str:
    python = validators() / "py2" / "bin" / "python"
    proc = subprocess.run(
        [str(python), str(REPO / "tests" / "protocol" / "py2_check.py"), "--profile", "real", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0 and "0 failed" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    return proc.stdout


def test_mcp2_auto_mode_over_stdio_runs_a_command_in_the_stateless_era(real_server: list[str]) -> None:
    out = _py2("--run", "stdio", "--", *real_server)
    assert "PASS negotiated 2026-07-28" in out and "PASS progress with live output" in out


def test_mcp2_auto_mode_over_http_runs_a_command_in_the_stateless_era(real_http: str) -> None:
    out = _py2("--run", "http", real_http)
    assert "PASS negotiated 2026-07-28" in out and "PASS progress with live output" in out


def test_mcp2_pinned_to_2026_07_28_over_stdio(real_server: list[str]) -> None:
    _py2("--mode", V, "stdio", "--", *real_server)


def test_mcp2_pinned_to_2026_07_28_over_http(real_http: str) -> None:
    _py2("--mode", V, "http", real_http)


def test_mcp2_legacy_mode_runs_a_command_in_the_handshake_era(real_http: str) -> None:
    out = _py2("--mode", "legacy", "--expect", "2025-11-25", "--run", "http", real_http)
    assert "PASS progress with live output" in out


TS_REAL = {
    "CALL": json.dumps({"name": "run", "arguments": RUN, "progress": True}),
    "PROMPT": json.dumps({"name": "run-shell", "arguments": {"command": "ls"}}),
    "READ": "contree://guide/state",
}


def test_ts_sdk_over_stdio(real_server: list[str]) -> None:
    run_ts_sdk(["stdio", "--", *real_server], **TS_REAL)


def test_ts_sdk_over_streamable_http(real_http: str) -> None:
    run_ts_sdk(["http", real_http], **TS_REAL)


def _inspect(target: list[str]) -> None:
    tools = inspector(target, "--method", "tools/list")
    assert len(tools["tools"]) == 29 and tools["tools"][0]["name"] == "list_images"
    guide = inspector(
        target, "--method", "tools/call", "--tool-name", "get_guide", "--tool-arg", "section=state"
    )
    assert not guide.get("isError") and "immutable" in guide["content"][0]["text"].lower()
    read = inspector(target, "--method", "resources/read", "--uri", "contree://guide/workflow")
    assert read["contents"][0]["mimeType"] == "text/markdown"
    prompt = inspector(
        target, "--method", "prompts/get", "--prompt-name", "run-shell", "--prompt-args", "command=ls"
    )
    assert prompt["messages"]


def test_inspector_over_stdio(real_server: list[str]) -> None:
    _inspect(real_server)


def test_inspector_over_streamable_http(real_http: str) -> None:
    _inspect([real_http])


# ---------------------------------------------------------------- the Tasks extension on `run`


async def _post(http: aiohttp.ClientSession, url: str, rid: int, method: str, params: dict[str, Any]) -> Any:
    caps = {"extensions": {"io.modelcontextprotocol/tasks": {}}}
    meta = {"io.modelcontextprotocol/protocolVersion": V, "io.modelcontextprotocol/clientCapabilities": caps}
    headers = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": V,
        "Mcp-Method": method,
    }
    name = params.get("name", params.get("taskId"))
    if name is not None:
        headers["Mcp-Name"] = name
    body = {"jsonrpc": "2.0", "id": rid, "method": method, "params": {**params, "_meta": meta}}
    async with http.post(url, json=body, headers=headers) as resp:
        text = await resp.text()
    if resp.content_type == "text/event-stream":  # the last data line is the response
        text = [line for line in text.splitlines() if line.startswith("data: {")][-1][6:]
    return json.loads(text)


def test_a_long_run_becomes_a_task_and_wait_false_stays_an_operation(real_http: str) -> None:
    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            long_run = {"command": "echo started; sleep 2; echo finished", "image": "busybox:latest"}
            created = await _post(http, real_http, 1, "tools/call", {"name": "run", "arguments": long_run})
            task = created["result"]
            assert task["resultType"] == "task" and task["status"] == "working", created
            seen: list[str] = []
            for i in range(200):
                got = (await _post(http, real_http, 2 + i, "tasks/get", {"taskId": task["taskId"]}))["result"]
                seen.append(got.get("statusMessage") or "")
                if got["status"] == "completed":
                    break
                await asyncio.sleep(0.1)
            result = got["result"]["structuredContent"]["result"]
            assert result["exit_code"] == 0 and "finished" in result["stdout"]
            assert any("started" in m for m in seen), seen  # live output while it ran
            detached = await _post(
                http, real_http, 500, "tools/call", {"name": "run", "arguments": {**long_run, "wait": False}}
            )
            assert detached["result"]["resultType"] == "complete"
            assert "operation_id" in detached["result"]["structuredContent"]["result"]

    asyncio.run(scenario())


def test_the_real_server_lists_the_tasks_extension(real_http: str) -> None:
    async def scenario() -> Any:
        async with aiohttp.ClientSession() as http:
            return await _post(http, real_http, 1, "server/discover", {})

    discovered = asyncio.run(scenario())["result"]
    assert "io.modelcontextprotocol/tasks" in discovered["capabilities"]["extensions"]
    assert discovered["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "contree-mcp"
