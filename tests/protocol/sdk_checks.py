"""Checks shared by the tests that drive the official Python SDK client (mcp==1.30.0) against the
conformance registry, whichever transport carries it (stdio, Streamable HTTP, legacy SSE)."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from datetime import timedelta
from typing import Any

from mcp import ClientSession, types
from mcp.shared.context import RequestContext as ClientRequestContext


class SdkCallbacks:
    """Client-side handlers: log notifications are collected, sampling answers the prompt upper-cased."""

    def __init__(self) -> None:
        self.logs: list[types.LoggingMessageNotificationParams] = []

    async def on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append(params)

    async def on_sampling(
        self, ctx: ClientRequestContext[ClientSession, Any], params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        text = params.messages[0].content
        assert isinstance(text, types.TextContent)
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text=text.text.upper()), model="echo"
        )

    def session_kwargs(self) -> dict[str, Any]:
        return {
            "logging_callback": self.on_log,
            "sampling_callback": self.on_sampling,
            "read_timeout_seconds": timedelta(seconds=20),
        }


async def check_tools_paginate(session: ClientSession, expected: Collection[str]) -> None:
    names: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await session.list_tools(cursor=cursor)
        pages += 1
        names += [t.name for t in page.tools]
        assert all(t.inputSchema.get("type") == "object" for t in page.tools)
        cursor = page.nextCursor
        if cursor is None:
            break
    assert pages > 1 and len(names) == len(set(names))
    assert set(expected) <= set(names)


async def check_every_content_type(session: ClientSession) -> None:
    text = await session.call_tool("test_simple_text", {})
    assert text.content == [
        types.TextContent(type="text", text="This is a simple text response for testing.")
    ]
    image = await session.call_tool("test_image_content", {})
    assert isinstance(image.content[0], types.ImageContent) and image.content[0].mimeType == "image/png"
    audio = await session.call_tool("test_audio_content", {})
    assert isinstance(audio.content[0], types.AudioContent)
    embedded = await session.call_tool("test_embedded_resource", {})
    assert isinstance(embedded.content[0], types.EmbeddedResource)
    error = await session.call_tool("test_error_handling", {})
    assert error.isError is True


async def check_progress_increases(session: ClientSession) -> None:
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    result = await session.call_tool("test_tool_with_progress", {}, progress_callback=on_progress)
    assert result.isError is not True
    assert seen == [0, 50, 100]


async def check_logging_after_set_level(session: ClientSession, callbacks: SdkCallbacks, polls: int) -> None:
    await session.set_logging_level("info")
    await session.call_tool("test_tool_with_logging", {})
    for _ in range(polls):
        if len(callbacks.logs) >= 3:
            break
        await asyncio.sleep(0.02)
    assert [entry.data for entry in callbacks.logs] == [
        "Tool execution started",
        "Tool processing data",
        "Tool execution completed",
    ]


async def check_sampling_round_trip(session: ClientSession) -> None:
    result = await session.call_tool("test_sampling", {"prompt": "hello"})
    assert result.content == [types.TextContent(type="text", text="LLM response: HELLO")]


async def check_prompt_arguments_and_completion(session: ClientSession) -> None:
    got = await session.get_prompt("test_prompt_with_arguments", {"arg1": "a", "arg2": "b"})
    assert got.messages[0].content == types.TextContent(
        type="text", text="Prompt with arguments: arg1='a', arg2='b'"
    )
    completion = await session.complete(
        types.PromptReference(type="ref/prompt", name="test_prompt_with_arguments"),
        {"name": "arg1", "value": "par"},
    )
    assert completion.completion.values == ["paris", "park", "party"]


async def send_cancelled(session: ClientSession, request_id: int) -> None:
    await session.send_notification(
        types.ClientNotification(
            types.CancelledNotification(
                params=types.CancelledNotificationParams(requestId=request_id, reason="test")
            )
        )
    )
