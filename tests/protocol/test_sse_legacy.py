"""Legacy HTTP+SSE (GET /sse, POST /messages) with a raw aiohttp client: one rule per test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from protocol.http_guard import HttpSettings
from tests.protocol.httpkit import Event, Probe, events, init_body, rpc, serve

JSON = {"Content-Type": "application/json"}


async def open_sse(
    client: TestClient[Any, Any], headers: dict[str, str] | None = None
) -> tuple[ClientResponse, AsyncIterator[Event], str]:
    resp = await client.get("/sse", headers={"Accept": "text/event-stream", **(headers or {})})
    assert resp.status == 200, await resp.text()
    reader = events(resp, limit=10)
    first = await anext(reader)
    assert first.event == "endpoint"
    return resp, reader, first.data


async def next_message(reader: AsyncIterator[Event]) -> Any:
    async for event in reader:
        if event.event == "message":
            return event.json()
    raise AssertionError("the stream ended")


async def test_first_event_is_endpoint_with_a_relative_url() -> None:
    async with serve() as (client, server):
        resp, _reader, endpoint = await open_sse(client)
        assert endpoint.startswith("/messages?session_id=")
        session_id = endpoint.split("=", 1)[1]
        assert server.get_session(session_id) is not None
        resp.close()


async def test_post_is_202_and_the_answer_travels_on_the_stream() -> None:
    async with serve() as (client, _):
        resp, reader, endpoint = await open_sse(client)
        post = await client.post(endpoint, data=init_body("2024-11-05"), headers=JSON)
        assert post.status == 202
        answer = await next_message(reader)
        assert answer["id"] == 0 and answer["result"]["protocolVersion"] == "2024-11-05"
        post = await client.post(
            endpoint, data=rpc(1, "tools/call", {"name": "test_simple_text"}), headers=JSON
        )
        assert post.status == 202
        assert (await next_message(reader))["result"]["content"][0]["type"] == "text"
        resp.close()


async def test_notifications_and_progress_travel_on_the_stream() -> None:
    async with serve() as (client, _):
        resp, reader, endpoint = await open_sse(client)
        await client.post(endpoint, data=init_body(), headers=JSON)
        await next_message(reader)
        params = {"name": "test_tool_with_progress", "_meta": {"progressToken": 1}}
        await client.post(endpoint, data=rpc(2, "tools/call", params), headers=JSON)
        got = [await next_message(reader) for _ in range(4)]
        assert [m.get("method") for m in got[:3]] == ["notifications/progress"] * 3
        assert got[3]["id"] == 2
        resp.close()


async def test_missing_session_id_is_400() -> None:
    async with serve() as (client, _):
        assert (await client.post("/messages", data=rpc(1, "ping"), headers=JSON)).status == 400


async def test_unknown_session_id_is_404() -> None:
    async with serve() as (client, _):
        resp = await client.post("/messages?session_id=nope", data=rpc(1, "ping"), headers=JSON)
        assert resp.status == 404


async def test_malformed_json_is_400_with_parse_error() -> None:
    async with serve() as (client, _):
        resp, _reader, endpoint = await open_sse(client)
        post = await client.post(endpoint, data=b"{oops", headers=JSON)
        assert post.status == 400
        assert (await post.json())["error"]["code"] == -32700
        resp.close()


async def test_bad_origin_is_403() -> None:
    async with serve() as (client, _):
        resp = await client.get("/sse", headers={"Origin": "http://evil.example.com"})
        assert resp.status == 403


async def test_bad_host_is_403() -> None:
    async with serve() as (client, _):
        resp = await client.get("/sse", headers={"Host": "evil.example.com"})
        assert resp.status == 403


async def test_bearer_token_is_required_on_both_routes() -> None:
    async with serve(HttpSettings(auth_token="tok")) as (client, _):
        assert (await client.get("/sse")).status == 401
        resp, _reader, endpoint = await open_sse(client, {"Authorization": "Bearer tok"})
        assert (await client.post(endpoint, data=rpc(1, "ping"), headers=JSON)).status == 401
        resp.close()


async def test_closing_the_stream_ends_the_session_and_its_work() -> None:
    probe = Probe()
    async with serve(probe=probe) as (client, server):
        resp, reader, endpoint = await open_sse(client)
        await client.post(endpoint, data=init_body(), headers=JSON)
        await next_message(reader)
        call = rpc(2, "tools/call", {"name": "slow", "arguments": {"seconds": 30}})
        assert (await client.post(endpoint, data=call, headers=JSON)).status == 202
        await asyncio.wait_for(probe.started.wait(), 5)
        resp.close()
        for _ in range(100):
            if probe.cancelled and not server.sessions:
                break
            await asyncio.sleep(0.02)
        assert probe.cancelled and not server.sessions
        assert (await client.post(endpoint, data=rpc(3, "ping"), headers=JSON)).status == 404
