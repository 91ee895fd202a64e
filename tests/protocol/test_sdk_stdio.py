"""The official Python SDK client (mcp==1.30.0) against the conformance registry over stdio."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession, StdioServerParameters, types
from mcp.client.stdio import stdio_client
from mcp.shared.context import RequestContext as ClientRequestContext
from pydantic import AnyUrl

pytestmark = pytest.mark.external
ROOT = Path(__file__).resolve().parents[2]


class Client:
    def __init__(self, session: ClientSession, errlog: Path) -> None:
        self.session = session
        self.errlog = errlog
        self.logs: list[types.LoggingMessageNotificationParams] = []


@contextlib.asynccontextmanager
async def connect(tmp_path: Path) -> AsyncIterator[Client]:
    """A context manager, not a fixture: anyio cancel scopes must open and close in one task."""
    errlog = tmp_path / "server.stderr"
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "tests.protocol.stdio_app", "3"],
        env={"PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
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

    with errlog.open("w") as err:
        async with (
            stdio_client(params, errlog=err) as (read, write),
            ClientSession(
                read,
                write,
                logging_callback=on_log,
                sampling_callback=on_sampling,
                read_timeout_seconds=timedelta(seconds=20),
            ) as session,
        ):
            init = await session.initialize()
            assert init.protocolVersion == "2025-11-25"
            assert init.serverInfo.version == "0.6.0"
            c = Client(session, errlog)
            c.logs = logs
            yield c


async def test_ping(tmp_path: Path) -> None:
    async with connect(tmp_path) as client:
        assert isinstance(await client.session.send_ping(), types.EmptyResult)


async def test_list_tools_across_pages(tmp_path: Path) -> None:
    async with connect(tmp_path) as client:
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
        assert {"test_simple_text", "test_tool_with_progress", "json_schema_2020_12_tool", "sleepy"} <= set(
            names
        )


async def test_call_tools_with_every_content_type(tmp_path: Path) -> None:
    async with connect(tmp_path) as client:
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


async def test_structured_content_validated_by_the_sdk(tmp_path: Path) -> None:
    async with connect(tmp_path) as client:
        # `noisy` declares an outputSchema; the SDK validates structuredContent against it.
        result = await client.session.call_tool("noisy", {})
        assert result.structuredContent == {"result": "quiet"}


async def test_progress_callback_sees_increasing_progress(tmp_path: Path) -> None:
    async with connect(tmp_path) as client:
        seen: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append(progress)

        result = await client.session.call_tool("test_tool_with_progress", {}, progress_callback=on_progress)
        assert result.isError is not True
        assert seen == [0, 50, 100]


async def test_logging_notifications_after_set_level(tmp_path: Path) -> None:
    async with connect(tmp_path) as client:
        await client.session.set_logging_level("info")
        await client.session.call_tool("test_tool_with_logging", {})
        for _ in range(50):
            if len(client.logs) >= 3:
                break
            await asyncio.sleep(0.02)
        assert [entry.data for entry in client.logs] == [
            "Tool execution started",
            "Tool processing data",
            "Tool execution completed",
        ]


async def test_sampling_round_trip(tmp_path: Path) -> None:
    async with connect(tmp_path) as client:
        result = await client.session.call_tool("test_sampling", {"prompt": "hello"})
        assert result.content == [types.TextContent(type="text", text="LLM response: HELLO")]


async def test_resources_read_and_templates(tmp_path: Path) -> None:
    async with connect(tmp_path) as client:
        listed = await client.session.list_resources()
        assert {str(r.uri) for r in listed.resources} >= {"test://static-text", "test://static-binary"}
        text = await client.session.read_resource(AnyUrl("test://static-text"))
        assert isinstance(text.contents[0], types.TextResourceContents)
        blob = await client.session.read_resource(AnyUrl("test://static-binary"))
        assert isinstance(blob.contents[0], types.BlobResourceContents)
        templates = await client.session.list_resource_templates()
        assert templates.resourceTemplates[0].uriTemplate == "test://template/{id}/data"
        data = await client.session.read_resource(AnyUrl("test://template/7/data"))
        assert '"id":"7"' in data.contents[0].text  # type: ignore[union-attr]
        await client.session.subscribe_resource(AnyUrl("test://watched-resource"))
        await client.session.unsubscribe_resource(AnyUrl("test://watched-resource"))


async def test_errors_surface_as_mcp_errors(tmp_path: Path) -> None:
    async with connect(tmp_path) as client:
        from mcp.shared.exceptions import McpError

        with pytest.raises(McpError) as missing:
            await client.session.read_resource(AnyUrl("test://missing"))
        assert missing.value.error.code == -32002
        with pytest.raises(McpError) as unknown_tool:
            await client.session.call_tool("no_such_tool", {})
        assert unknown_tool.value.error.code == -32602
        with pytest.raises(McpError) as unknown_prompt:
            await client.session.get_prompt("no_such_prompt")
        assert unknown_prompt.value.error.code == -32602


async def test_prompts_and_completion(tmp_path: Path) -> None:
    async with connect(tmp_path) as client:
        prompts = await client.session.list_prompts()
        assert all(p.description for p in prompts.prompts)
        got = await client.session.get_prompt("test_prompt_with_arguments", {"arg1": "a", "arg2": "b"})
        assert got.messages[0].content == types.TextContent(
            type="text", text="Prompt with arguments: arg1='a', arg2='b'"
        )
        image = await client.session.get_prompt("test_prompt_with_image")
        assert isinstance(image.messages[0].content, types.ImageContent)
        completion = await client.session.complete(
            types.PromptReference(type="ref/prompt", name="test_prompt_with_arguments"),
            {"name": "arg1", "value": "par"},
        )
        assert completion.completion.values == ["paris", "park", "party"]


async def test_cancel_stops_the_handler(tmp_path: Path) -> None:
    async with connect(tmp_path) as client:
        session = client.session
        request_id = session._request_id  # the SDK numbers requests sequentially
        call = asyncio.create_task(session.call_tool("sleepy", {}))
        await asyncio.sleep(0.2)
        await session.send_notification(
            types.ClientNotification(
                types.CancelledNotification(
                    params=types.CancelledNotificationParams(requestId=request_id, reason="test")
                )
            )
        )
        for _ in range(100):
            if "sleepy cancelled" in client.errlog.read_text():
                break
            await asyncio.sleep(0.02)
        assert "sleepy cancelled" in client.errlog.read_text()
        assert not call.done()  # no response was sent for the cancelled request
        call.cancel()
        assert isinstance(await session.send_ping(), types.EmptyResult)
