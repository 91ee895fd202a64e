"""The official Python SDK client (mcp==1.30.0) over Streamable HTTP and legacy SSE (conformance registry)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from mcp import ClientSession, types
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamablehttp_client
from mcp.shared.context import RequestContext as ClientRequestContext
from mcp.shared.exceptions import McpError
from pydantic import AnyUrl

from protocol.http import HttpSettings, build_app
from protocol.server import Server
from tests.protocol.httpkit import Probe, make_registry

pytestmark = pytest.mark.external
TRANSPORTS = ["streamable", "sse"]


class Client:
    def __init__(self, session: ClientSession, server: Server, probe: Probe) -> None:
        self.session = session
        self.server = server
        self.probe = probe
        self.logs: list[types.LoggingMessageNotificationParams] = []


@contextlib.asynccontextmanager
async def connect(transport: str, settings: HttpSettings | None = None) -> AsyncIterator[Client]:
    """A context manager, not a fixture: anyio cancel scopes must open and close in one task."""
    probe = Probe()
    server = Server(make_registry(probe), page_size=4)
    app = build_app(server, settings or HttpSettings())
    logs: list[types.LoggingMessageNotificationParams] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(params)

    async def on_sampling(
        ctx: ClientRequestContext[ClientSession, Any], params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        text = params.messages[0].content
        assert isinstance(text, types.TextContent)
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text=text.text.upper()), model="echo"
        )

    async with TestServer(app, host="127.0.0.1") as http:
        if transport == "streamable":
            opened: Any = streamablehttp_client(str(http.make_url("/mcp")))
        else:
            opened = sse_client(str(http.make_url("/sse")))
        async with opened as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(
                read,
                write,
                logging_callback=on_log,
                sampling_callback=on_sampling,  # type: ignore[arg-type]
                read_timeout_seconds=timedelta(seconds=20),
            ) as session:
                init = await session.initialize()
                assert init.protocolVersion == "2025-11-25"
                assert init.serverInfo.name == "contree-mcp-conformance"
                client = Client(session, server, probe)
                client.logs = logs
                yield client
    await server.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_ping(transport: str) -> None:
    async with connect(transport) as client:
        assert isinstance(await client.session.send_ping(), types.EmptyResult)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_list_tools_across_pages(transport: str) -> None:
    async with connect(transport) as client:
        names: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            page = await client.session.list_tools(cursor=cursor)
            pages += 1
            names += [t.name for t in page.tools]
            assert all(t.inputSchema.get("type") == "object" for t in page.tools)
            cursor = page.nextCursor
            if cursor is None:
                break
        assert pages > 1 and len(names) == len(set(names))
        assert {"test_simple_text", "test_tool_with_progress", "slow"} <= set(names)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_call_tools_with_every_content_type(transport: str) -> None:
    async with connect(transport) as client:
        text = await client.session.call_tool("test_simple_text", {})
        assert text.content == [
            types.TextContent(type="text", text="This is a simple text response for testing.")
        ]
        image = await client.session.call_tool("test_image_content", {})
        assert isinstance(image.content[0], types.ImageContent) and image.content[0].mimeType == "image/png"
        audio = await client.session.call_tool("test_audio_content", {})
        assert isinstance(audio.content[0], types.AudioContent)
        embedded = await client.session.call_tool("test_embedded_resource", {})
        assert isinstance(embedded.content[0], types.EmbeddedResource)
        error = await client.session.call_tool("test_error_handling", {})
        assert error.isError is True


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_progress_callback_sees_increasing_progress(transport: str) -> None:
    async with connect(transport) as client:
        seen: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append(progress)

        result = await client.session.call_tool("test_tool_with_progress", {}, progress_callback=on_progress)
        assert result.isError is not True
        assert seen == [0, 50, 100]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_logging_notifications_after_set_level(transport: str) -> None:
    async with connect(transport) as client:
        await client.session.set_logging_level("info")
        await client.session.call_tool("test_tool_with_logging", {})
        for _ in range(100):
            if len(client.logs) >= 3:
                break
            await asyncio.sleep(0.02)
        assert [entry.data for entry in client.logs] == [
            "Tool execution started",
            "Tool processing data",
            "Tool execution completed",
        ]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_sampling_round_trip(transport: str) -> None:
    async with connect(transport) as client:
        result = await client.session.call_tool("test_sampling", {"prompt": "hello"})
        assert result.content == [types.TextContent(type="text", text="LLM response: HELLO")]


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
        got = await client.session.get_prompt("test_prompt_with_arguments", {"arg1": "a", "arg2": "b"})
        assert got.messages[0].content == types.TextContent(
            type="text", text="Prompt with arguments: arg1='a', arg2='b'"
        )
        completion = await client.session.complete(
            types.PromptReference(type="ref/prompt", name="test_prompt_with_arguments"),
            {"name": "arg1", "value": "par"},
        )
        assert completion.completion.values == ["paris", "park", "party"]
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
        await session.send_notification(
            types.ClientNotification(
                types.CancelledNotification(
                    params=types.CancelledNotificationParams(requestId=request_id, reason="test")
                )
            )
        )
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
