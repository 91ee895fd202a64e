"""The official Python SDK client (mcp==1.30.0) against the conformance registry over stdio."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mcp import ClientSession, StdioServerParameters, types
from mcp.client.stdio import stdio_client
from pydantic import AnyUrl

from tests.protocol import sdk_checks

pytestmark = pytest.mark.external
ROOT = Path(__file__).resolve().parents[2]


class Client:
    def __init__(self, session: ClientSession, errlog: Path, callbacks: sdk_checks.SdkCallbacks) -> None:
        self.session = session
        self.errlog = errlog
        self.callbacks = callbacks


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
    callbacks = sdk_checks.SdkCallbacks()
    with errlog.open("w") as err:
        async with (
            stdio_client(params, errlog=err) as (read, write),
            ClientSession(read, write, **callbacks.session_kwargs()) as session,
        ):
            init = await session.initialize()
            assert init.protocolVersion == "2025-11-25"
            assert init.serverInfo.version == "0.6.0"
            yield Client(session, errlog, callbacks)


async def test_ping(tmp_path: Path) -> None:
    async with connect(tmp_path) as client:
        assert isinstance(await client.session.send_ping(), types.EmptyResult)


async def test_list_tools_across_pages(tmp_path: Path) -> None:
    async with connect(tmp_path) as client:
        await sdk_checks.check_tools_paginate(
            client.session,
            {"test_simple_text", "test_tool_with_progress", "json_schema_2020_12_tool", "sleepy"},
        )


async def test_call_tools_with_every_content_type(tmp_path: Path) -> None:
    async with connect(tmp_path) as client:
        await sdk_checks.check_every_content_type(client.session)


async def test_structured_content_validated_by_the_sdk(tmp_path: Path) -> None:
    async with connect(tmp_path) as client:
        # `noisy` declares an outputSchema; the SDK validates structuredContent against it.
        result = await client.session.call_tool("noisy", {})
        assert result.structuredContent == {"result": "quiet"}


async def test_progress_callback_sees_increasing_progress(tmp_path: Path) -> None:
    async with connect(tmp_path) as client:
        await sdk_checks.check_progress_increases(client.session)


async def test_logging_notifications_after_set_level(tmp_path: Path) -> None:
    async with connect(tmp_path) as client:
        await sdk_checks.check_logging_after_set_level(client.session, client.callbacks, polls=50)


async def test_sampling_round_trip(tmp_path: Path) -> None:
    async with connect(tmp_path) as client:
        await sdk_checks.check_sampling_round_trip(client.session)


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
        await sdk_checks.check_prompt_arguments_and_completion(client.session)
        image = await client.session.get_prompt("test_prompt_with_image")
        assert isinstance(image.messages[0].content, types.ImageContent)


async def test_cancel_stops_the_handler(tmp_path: Path) -> None:
    async with connect(tmp_path) as client:
        session = client.session
        request_id = session._request_id  # the SDK numbers requests sequentially
        call = asyncio.create_task(session.call_tool("sleepy", {}))
        await asyncio.sleep(0.2)
        await sdk_checks.send_cancelled(session, request_id)
        for _ in range(100):
            if "sleepy cancelled" in client.errlog.read_text():
                break
            await asyncio.sleep(0.02)
        assert "sleepy cancelled" in client.errlog.read_text()
        assert not call.done()  # no response was sent for the cancelled request
        call.cancel()
        assert isinstance(await session.send_ping(), types.EmptyResult)
