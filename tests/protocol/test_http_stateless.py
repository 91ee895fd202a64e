"""Streamable HTTP in 2026-07-28: one POST per request, statuses for envelope errors, no sessions, a
disconnect cancels the request, listen streams, tasks that outlive their POST."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from protocol.http_guard import HttpSettings
from tests.protocol.httpkit import POST_HEADERS, Probe, all_events, initialize, messages, rpc, serve

V = "2026-07-28"
TASKS = {"extensions": {"io.modelcontextprotocol/tasks": {}}}


def meta(caps: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "io.modelcontextprotocol/protocolVersion": V,
        "io.modelcontextprotocol/clientCapabilities": caps or {},
        **extra,
    }


def call(
    rid: int, method: str, params: dict[str, Any] | None = None, **m: Any
) -> tuple[bytes, dict[str, str]]:
    """A stateless request and the headers that mirror it."""
    params = {**(params or {}), "_meta": meta(**m)}
    headers = {**POST_HEADERS, "MCP-Protocol-Version": V, "Mcp-Method": method}
    name = params.get("uri") if method == "resources/read" else params.get("name", params.get("taskId"))
    if isinstance(name, str):
        headers["Mcp-Name"] = name
    return rpc(rid, method, params), headers


async def test_a_stateless_request_needs_no_session_and_mints_none() -> None:
    async with serve() as (client, server):
        body, headers = call(1, "tools/list")
        resp = await client.post("/mcp", data=body, headers=headers)
        assert resp.status == 200 and "Mcp-Session-Id" not in resp.headers
        assert (await resp.json())["result"]["resultType"] == "complete"
        assert server.sessions == {}  # the per-request session is gone with the POST


async def test_envelope_errors_are_400_and_unknown_methods_404() -> None:
    async with serve() as (client, _):
        body, headers = call(1, "ping")
        resp = await client.post("/mcp", data=body, headers=headers)
        assert resp.status == 404 and (await resp.json())["error"]["code"] == -32601
        body, headers = call(2, "tools/list")
        resp = await client.post("/mcp", data=body, headers={**headers, "Mcp-Method": "prompts/list"})
        assert resp.status == 400 and (await resp.json())["error"]["code"] == -32020
        resp = await client.post("/mcp", data=rpc(3, "tools/list", {}), headers=headers)
        assert resp.status == 400 and (await resp.json())["error"]["code"] == -32602
        body, headers = call(4, "tools/call", {"name": "test_missing_capability"})
        resp = await client.post("/mcp", data=body, headers=headers)
        assert resp.status == 400 and (await resp.json())["error"]["code"] == -32021


async def test_get_and_delete_are_405_and_a_session_id_is_ignored() -> None:
    async with serve() as (client, _):
        legacy = await initialize(client)
        modern = {"MCP-Protocol-Version": V, "Accept": "text/event-stream"}
        assert (await client.get("/mcp", headers=modern)).status == 405
        assert (
            await client.delete("/mcp", headers={**modern, **legacy, "MCP-Protocol-Version": V})
        ).status == 405
        body, headers = call(1, "tools/list")
        resp = await client.post("/mcp", data=body, headers={**headers, "Mcp-Session-Id": "no-such-session"})
        assert resp.status == 200 and "Mcp-Session-Id" not in resp.headers


async def test_progress_streams_over_sse_before_the_result() -> None:
    async with serve(HttpSettings(sse_after=5)) as (client, _):
        body, headers = call(1, "tools/call", {"name": "test_tool_with_progress"}, progressToken="t")
        resp = await client.post("/mcp", data=body, headers=headers)
        assert resp.content_type == "text/event-stream"
        got = messages(await all_events(resp))
        assert [m["params"]["progress"] for m in got[:-1]] == [0, 50, 100]
        assert got[-1]["result"]["resultType"] == "complete"


async def test_closing_the_stream_cancels_the_request() -> None:
    probe = Probe()
    async with serve(HttpSettings(sse_after=0.05), probe) as (client, _):
        body, headers = call(1, "tools/call", {"name": "slow", "arguments": {"seconds": 30}})
        resp = await client.post("/mcp", data=body, headers=headers)
        await asyncio.wait_for(probe.started.wait(), 5)
        resp.close()  # the client goes away
        for _ in range(200):
            if probe.cancelled:
                break
            await asyncio.sleep(0.01)
        assert probe.cancelled and not probe.finished.is_set()


async def test_the_handshake_era_keeps_its_work_when_the_client_goes() -> None:
    probe = Probe()
    async with serve(HttpSettings(sse_after=0.05), probe) as (client, _):
        session = await initialize(client)
        resp = await client.post(
            "/mcp",
            data=rpc(1, "tools/call", {"name": "slow", "arguments": {"seconds": 0.3}}),
            headers={**POST_HEADERS, **session},
        )
        await asyncio.wait_for(probe.started.wait(), 5)
        resp.close()
        await asyncio.wait_for(probe.finished.wait(), 5)
        assert not probe.cancelled


async def test_listen_stream_acknowledges_then_delivers_list_changes() -> None:
    async with serve() as (client, server):
        body, headers = call(9, "subscriptions/listen", {"notifications": {"toolsListChanged": True}})
        resp = await client.post("/mcp", data=body, headers=headers)
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        line = b""
        while b"acknowledged" not in line:
            line = await asyncio.wait_for(resp.content.readline(), 5)
        server.registry.list_changed("tools")
        while b"list_changed" not in line:
            line = await asyncio.wait_for(resp.content.readline(), 5)
        note = msgspec.json.decode(line.split(b"data: ", 1)[1])
        assert note["method"] == "notifications/tools/list_changed"
        assert note["params"]["_meta"] == {"io.modelcontextprotocol/subscriptionId": 9}
        resp.close()


async def test_a_task_outlives_its_post_and_is_polled() -> None:
    async with serve() as (client, _):
        body, headers = call(
            1, "tools/call", {"name": "slow_compute", "arguments": {"seconds": 0.3}}, caps=TASKS
        )
        created = msgspec.json.decode(await (await client.post("/mcp", data=body, headers=headers)).read())
        if "result" not in created:  # an SSE answer: the last event is the response
            raise AssertionError(created)
        task = created["result"]
        assert task["resultType"] == "task" and task["status"] == "working"
        for _ in range(100):
            body, headers = call(2, "tasks/get", {"taskId": task["taskId"]}, caps=TASKS)
            got = (await (await client.post("/mcp", data=body, headers=headers)).json())["result"]
            if got["status"] == "completed":
                break
            await asyncio.sleep(0.05)
        assert got["result"]["content"][0]["text"] == "computed job in 0.3 s"
