"""The official Python SDK client (mcp==1.30.0) over Streamable HTTP and legacy SSE (conformance registry)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from mcp import ClientSession, types
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamablehttp_client
from mcp.shared.exceptions import McpError
from pydantic import AnyUrl

from protocol.http_app import build_app
from protocol.http_guard import HttpSettings
from protocol.server import Server
from tests.protocol import sdk_checks
from tests.protocol.httpkit import Probe, make_registry

pytestmark = pytest.mark.external
TRANSPORTS = ["streamable", "sse"]


class Client:
    def __init__(
        self, session: ClientSession, server: Server, probe: Probe, callbacks: sdk_checks.SdkCallbacks
    ) -> None:
        self.session = session
        self.server = server
        self.probe = probe
        self.callbacks = callbacks


@contextlib.asynccontextmanager
async def connect(transport: str, settings: HttpSettings | None = None) -> AsyncIterator[Client]:
    """A context manager, not a fixture: anyio cancel scopes must open and close in one task."""
    probe = Probe()
    server = Server(make_registry(probe), page_size=4)
    app = build_app(server, settings or HttpSettings())
    callbacks = sdk_checks.SdkCallbacks()
    async with TestServer(app, host="127.0.0.1") as http:
        if transport == "streamable":
            opened: Any = streamablehttp_client(str(http.make_url("/mcp")))
        else:
            opened = sse_client(str(http.make_url("/sse")))
        async with opened as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write, **callbacks.session_kwargs()) as session:
                init = await session.initialize()
                assert init.protocolVersion == "2025-11-25"
                assert init.serverInfo.name == "contree-mcp-conformance"
                yield Client(session, server, probe, callbacks)
    await server.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_ping(transport: str) -> None:
    async with connect(transport) as client:
        assert isinstance(await client.session.send_ping(), types.EmptyResult)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_list_tools_across_pages(transport: str) -> None:
    async with connect(transport) as client:
        await sdk_checks.check_tools_paginate(
            client.session, {"test_simple_text", "test_tool_with_progress", "slow"}
        )


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_call_tools_with_every_content_type(transport: str) -> None:
    async with connect(transport) as client:
        await sdk_checks.check_every_content_type(client.session)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_progress_callback_sees_increasing_progress(transport: str) -> None:
    async with connect(transport) as client:
        await sdk_checks.check_progress_increases(client.session)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_logging_notifications_after_set_level(transport: str) -> None:
    async with connect(transport) as client:
        await sdk_checks.check_logging_after_set_level(client.session, client.callbacks, polls=100)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_sampling_round_trip(transport: str) -> None:
    async with connect(transport) as client:
        await sdk_checks.check_sampling_round_trip(client.session)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_resources_read_templates_and_subscribe(transport: str) -> None:
    async with connect(transport) as client:
        listed = await client.session.list_resources()
        assert {str(r.uri) for r in listed.resources} >= {"test://static-text", "test://static-binary"}
        text = await client.session.read_resource(AnyUrl("test://static-text"))
        assert text.contents[0] == types.TextResourceContents(
            uri=AnyUrl("test://static-text"),
            mimeType="text/plain",
            text="This is the content of the static text resource.",
        )
        blob = await client.session.read_resource(AnyUrl("test://static-binary"))
        assert isinstance(blob.contents[0], types.BlobResourceContents)
        data = await client.session.read_resource(AnyUrl("test://template/7/data"))
        assert '"id":"7"' in data.contents[0].text  # type: ignore[union-attr]
        await client.session.subscribe_resource(AnyUrl("test://watched-resource"))
        with pytest.raises(McpError) as missing:
            await client.session.read_resource(AnyUrl("test://missing"))
        assert missing.value.error.code == -32002


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_resource_updates_reach_the_client_outside_any_call(transport: str) -> None:
    async with connect(transport) as client:
        updates: list[str] = []
        handler = client.session._received_notification

        async def on_notification(notification: types.ServerNotification) -> None:
            if isinstance(notification.root, types.ResourceUpdatedNotification):
                updates.append(str(notification.root.params.uri))
            await handler(notification)

        client.session._received_notification = on_notification  # type: ignore[method-assign]
        await client.session.subscribe_resource(AnyUrl("test://watched-resource"))
        for _ in range(100):  # the SDK opens its GET stream in the background
            await client.server.resource_updated("test://watched-resource")
            await asyncio.sleep(0.03)
            if updates:
                break
        assert updates and updates[0] == "test://watched-resource"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_prompts_and_completion(transport: str) -> None:
    async with connect(transport) as client:
        await sdk_checks.check_prompt_arguments_and_completion(client.session)
        with pytest.raises(McpError) as unknown:
            await client.session.get_prompt("no_such_prompt")
        assert unknown.value.error.code == -32602


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_cancel_stops_the_handler_and_no_response_follows(transport: str) -> None:
    async with connect(transport, HttpSettings(sse_after=0.05)) as client:
        session = client.session
        request_id = session._request_id  # the SDK numbers requests sequentially
        call = asyncio.create_task(session.call_tool("slow", {"seconds": 30}))
        await asyncio.wait_for(client.probe.started.wait(), 5)
        await sdk_checks.send_cancelled(session, request_id)
        for _ in range(100):
            if client.probe.cancelled:
                break
            await asyncio.sleep(0.02)
        assert client.probe.cancelled
        await asyncio.sleep(0.1)
        assert not call.done()  # no response was sent for the cancelled request
        call.cancel()
        assert isinstance(await session.send_ping(), types.EmptyResult)


async def test_streamable_client_resumes_after_server_side_close() -> None:
    async with connect("streamable") as client:
        result = await client.session.call_tool("test_reconnection", {})
        assert result.content[0].text == "Reconnection test completed"  # type: ignore[union-attr]


async def test_bearer_token_over_both_transports() -> None:
    probe = Probe()
    server = Server(make_registry(probe))
    app = build_app(server, HttpSettings(auth_token="tok"))
    auth = {"Authorization": "Bearer tok"}
    async with TestServer(app, host="127.0.0.1") as http:
        async with (
            streamablehttp_client(str(http.make_url("/mcp")), headers=auth) as (read, write, _),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            assert isinstance(await session.send_ping(), types.EmptyResult)
        async with (
            sse_client(str(http.make_url("/sse")), headers=auth) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            assert isinstance(await session.send_ping(), types.EmptyResult)
    await server.close()
