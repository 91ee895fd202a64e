"""MCP lifecycle and utilities (MCP-PROTOCOL.md §3, §5): negotiation, gating, cancel, progress, logging."""

from __future__ import annotations

import asyncio
import importlib.metadata
from typing import Any

import msgspec
import pytest

from protocol.content import AudioContent, TextContent
from protocol.messages import Icon
from protocol.registry import Registry, RequestContext, ToolAnnotations, ToolResult
from protocol.types import Outgoing
from tests.protocol.conftest import Harness, error_code, gated_tool, sleeping_tool

VERSIONS = ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"]


class Out(msgspec.Struct):
    value: int


def _gated_registry() -> Registry:
    r = Registry("gated", "9.9.9", title="Gated", description="desc", instructions="use it")

    @r.tool(
        "full",
        title="Full tool",
        description="has everything",
        annotations=ToolAnnotations(read_only=True, open_world=False),
        icons=[Icon("https://example.invalid/i.png")],
        execution={"taskSupport": "forbidden"},
    )
    async def full(ctx: RequestContext) -> Out:
        return Out(3)

    @r.tool("audio", description="returns audio")
    async def audio(ctx: RequestContext) -> ToolResult:
        return ToolResult(content=[AudioContent("AAAA", "audio/wav")])

    return r


@pytest.mark.parametrize("version", VERSIONS)
async def test_supported_version_is_echoed(version: str) -> None:
    assert (await Harness().initialize(version))["protocolVersion"] == version


@pytest.mark.parametrize("requested", ["2099-01-01", "1.0", "2026-07-28"])
async def test_unknown_version_gets_the_latest(requested: str) -> None:
    assert (await Harness().initialize(requested))["protocolVersion"] == "2025-11-25"


async def test_initialize_requires_a_version_string(harness: Harness) -> None:
    assert error_code(await harness.request("initialize", {"capabilities": {}})) == -32602


async def test_second_initialize_is_rejected(ready: Harness) -> None:
    again = await ready.request("initialize", {"protocolVersion": "2025-11-25", "capabilities": {}})
    assert error_code(again) == -32600


async def test_capabilities_declared(harness: Harness) -> None:
    result = await harness.initialize()
    assert result["capabilities"] == {
        "tools": {"listChanged": False},
        "resources": {"subscribe": True, "listChanged": False},
        "prompts": {"listChanged": False},
        "logging": {},
        "completions": {},
    }


async def test_completions_capability_absent_in_2024_11_05() -> None:
    assert "completions" not in (await Harness().initialize("2024-11-05"))["capabilities"]


async def test_server_info_reports_the_package_version(harness: Harness) -> None:
    info = (await harness.initialize())["serverInfo"]
    assert info["version"] == importlib.metadata.version("contree-mcp") == "0.6.0"
    assert info["name"] == "contree-mcp-conformance"


async def test_server_info_fields_gated_and_instructions_sent() -> None:
    new = await Harness(_gated_registry()).initialize("2025-11-25")
    assert new["serverInfo"] == {"name": "gated", "version": "9.9.9", "title": "Gated", "description": "desc"}
    assert new["instructions"] == "use it"
    old = await Harness(_gated_registry()).initialize("2025-03-26")
    assert old["serverInfo"] == {"name": "gated", "version": "9.9.9"}


async def _tool(version: str) -> dict[str, Any]:
    h = Harness(_gated_registry())
    await h.initialize(version)
    tools = (await h.result("tools/list"))["tools"]
    return next(t for t in tools if t["name"] == "full")  # type: ignore[no-any-return]


async def test_tool_shape_2024_11_05_has_no_newer_fields() -> None:
    assert set(await _tool("2024-11-05")) == {"name", "description", "inputSchema"}


async def test_tool_shape_2025_03_26_adds_annotations_with_title() -> None:
    tool = await _tool("2025-03-26")
    assert set(tool) == {"name", "description", "inputSchema", "annotations"}
    assert tool["annotations"] == {"title": "Full tool", "readOnlyHint": True, "openWorldHint": False}


async def test_tool_shape_2025_06_18_adds_title_and_output_schema() -> None:
    tool = await _tool("2025-06-18")
    assert set(tool) == {"name", "title", "description", "inputSchema", "outputSchema", "annotations"}


async def test_tool_shape_2025_11_25_adds_icons_and_execution() -> None:
    tool = await _tool("2025-11-25")
    assert tool["icons"] == [{"src": "https://example.invalid/i.png"}]
    assert tool["execution"] == {"taskSupport": "forbidden"}


async def test_tool_without_parameters_has_object_input_schema() -> None:
    tool = await _tool("2025-11-25")
    assert tool["inputSchema"] == {"type": "object", "additionalProperties": False}


async def test_structured_content_only_from_2025_06_18() -> None:
    for version, expected in (("2025-03-26", False), ("2025-06-18", True)):
        h = Harness(_gated_registry())
        await h.initialize(version)
        result = await h.result("tools/call", {"name": "full"})
        assert ("structuredContent" in result) is expected
        assert msgspec.json.decode(result["content"][0]["text"]) == {"value": 3}


async def test_audio_content_replaced_by_text_in_2024_11_05() -> None:
    h = Harness(_gated_registry())
    await h.initialize("2024-11-05")
    [block] = (await h.result("tools/call", {"name": "audio"}))["content"]
    assert block["type"] == "text"


async def test_ping_answers_empty_object(ready: Harness) -> None:
    assert await ready.result("ping") == {}


# ---------------------------------------------------------------- cancellation


async def test_cancelled_request_gets_no_response_and_its_handler_stops() -> None:
    h, started, stopped = await sleeping_tool()
    call = asyncio.create_task(
        h.send({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "slow"}})
    )
    await started.wait()
    cancel = {
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": 9, "reason": "x"},
    }
    assert await h.send(cancel) == []
    assert await asyncio.wait_for(call, 2) == []
    assert stopped.is_set()
    assert 9 not in h.session.core.inflight


async def test_cancel_of_unknown_request_is_ignored(ready: Harness) -> None:
    assert (
        await ready.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 4}})
        == []
    )


async def test_slow_call_does_not_block_ping() -> None:
    h, gate = await gated_tool("slow")
    call = asyncio.create_task(h.request("tools/call", {"name": "slow"}))
    assert await asyncio.wait_for(h.result("ping"), 1) == {}
    gate.set()
    assert (await call)["result"]["structuredContent"] == {"result": 1}


async def test_close_cancels_in_flight_handlers() -> None:
    h, _, stopped = await sleeping_tool()
    call = asyncio.create_task(
        h.send({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "slow"}})
    )
    await asyncio.sleep(0.01)
    await h.session.close()
    assert stopped.is_set() and h.session.closed
    assert await asyncio.wait_for(call, 1) == []  # the transport's dispatch returns quietly


# ---------------------------------------------------------------- progress


def _progress_registry(steps: list[float]) -> Registry:
    r = Registry("t", "1")

    @r.tool("steps", description="reports progress")
    async def run(ctx: RequestContext) -> str:
        for step in steps:
            await ctx.progress(step, 10, f"at {step}")
        return "done"

    @r.tool("late", description="reports progress after finishing")
    async def late(ctx: RequestContext) -> str:
        asyncio.get_running_loop().call_later(0.01, lambda: asyncio.ensure_future(ctx.progress(99)))
        return "done"

    return r


async def _call_with_token(h: Harness, name: str, token: object = "tok") -> list[Any]:
    params = {"name": name, "_meta": {"progressToken": token}}
    return await h.send({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params})


async def test_progress_notifications_precede_the_response_and_increase() -> None:
    h = Harness(_progress_registry([1, 2, 2, 1.5, 3]))
    await h.initialize()
    out = await _call_with_token(h, "steps", 42)
    progress = [m["params"] for m in out if m.get("method") == "notifications/progress"]
    assert [p["progress"] for p in progress] == [1, 2, 3]
    assert all(p["progressToken"] == 42 and p["total"] == 10 for p in progress)
    assert "result" in out[-1]


async def test_no_progress_without_token() -> None:
    h = Harness(_progress_registry([1, 2]))
    await h.initialize()
    out = await h.send({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "steps"}})
    assert [m for m in out if "method" in m] == []


async def test_no_progress_after_the_response() -> None:
    h = Harness(_progress_registry([]))
    await h.initialize()
    out = await _call_with_token(h, "late")
    await asyncio.sleep(0.05)
    assert len(out) == 1 and [b for b in h.sent if b"notifications/progress" in b] == []


async def test_progress_message_dropped_before_2025_03_26() -> None:
    h = Harness(_progress_registry([1]))
    await h.initialize("2024-11-05")
    [note, _] = await _call_with_token(h, "steps")
    assert "message" not in note["params"]


# ---------------------------------------------------------------- logging


async def test_logging_is_quiet_until_a_level_is_set(ready: Harness) -> None:
    out = await ready.send(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "test_tool_with_logging"}}
    )
    assert [m for m in out if m.get("method") == "notifications/message"] == []


async def test_set_level_enables_log_notifications(ready: Harness) -> None:
    assert await ready.result("logging/setLevel", {"level": "info"}) == {}
    out = await ready.send(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "test_tool_with_logging"}}
    )
    logs = [m["params"] for m in out if m.get("method") == "notifications/message"]
    assert [entry["data"] for entry in logs] == [
        "Tool execution started",
        "Tool processing data",
        "Tool execution completed",
    ]
    assert all(entry["level"] == "info" for entry in logs)


async def test_level_filters_lower_levels(ready: Harness) -> None:
    await ready.result("logging/setLevel", {"level": "warning"})
    out = await ready.send(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "test_tool_with_logging"}}
    )
    assert [m for m in out if m.get("method") == "notifications/message"] == []


@pytest.mark.parametrize("level", ["verbose", "INFO", 3, None])
async def test_bad_log_level_is_invalid_params(ready: Harness, level: object) -> None:
    assert error_code(await ready.request("logging/setLevel", {"level": level})) == -32602


async def test_session_log_outside_a_call_goes_to_the_default_sink(ready: Harness) -> None:
    got: list[bytes] = []

    async def default(message: Outgoing) -> None:
        got.append(message.data)

    await ready.session.log("error", "before any sink")  # level unset: dropped
    await ready.result("logging/setLevel", {"level": "debug"})
    await ready.session.log("error", "buffered")
    ready.session.set_default_sink(default)
    await asyncio.sleep(0.01)
    await ready.session.log("info", {"k": 1}, logger="x")
    assert [msgspec.json.decode(g)["params"]["data"] for g in got] == ["buffered", {"k": 1}]


# ---------------------------------------------------------------- completion


async def test_completion_for_a_prompt_argument(ready: Harness) -> None:
    params = {
        "ref": {"type": "ref/prompt", "name": "test_prompt_with_arguments"},
        "argument": {"name": "arg1", "value": "par"},
    }
    completion = (await ready.result("completion/complete", params))["completion"]
    assert completion == {"values": ["paris", "park", "party"], "total": 3, "hasMore": False}


async def test_completion_for_a_resource_template(ready: Harness) -> None:
    params = {
        "ref": {"type": "ref/resource", "uri": "test://template/{id}/data"},
        "argument": {"name": "id", "value": "12"},
    }
    assert (await ready.result("completion/complete", params))["completion"]["values"] == ["12", "123"]


async def test_completion_unknown_argument_is_empty(ready: Harness) -> None:
    params = {
        "ref": {"type": "ref/prompt", "name": "test_simple_prompt"},
        "argument": {"name": "x", "value": ""},
    }
    assert (await ready.result("completion/complete", params))["completion"]["values"] == []


@pytest.mark.parametrize(
    "params",
    [
        {"ref": {"type": "ref/prompt", "name": "nope"}, "argument": {"name": "a", "value": ""}},
        {"ref": {"type": "ref/other", "name": "x"}, "argument": {"name": "a", "value": ""}},
        {"ref": {"type": "ref/prompt", "name": "test_simple_prompt"}},
    ],
    ids=["unknown-prompt", "unknown-type", "no-argument"],
)
async def test_bad_completion_request_is_invalid_params(ready: Harness, params: dict[str, Any]) -> None:
    assert error_code(await ready.request("completion/complete", params)) == -32602


# ---------------------------------------------------------------- pagination


async def _walk(h: Harness, method: str, key: str) -> tuple[list[str], int]:
    names: list[str] = []
    cursor = None
    pages = 0
    while True:
        result = await h.result(method, {"cursor": cursor} if cursor else {})
        pages += 1
        names += [item.get("name") or item.get("uriTemplate") for item in result[key]]
        cursor = result.get("nextCursor")
        if cursor is None:
            return names, pages


@pytest.mark.parametrize(
    "method,key,kind",
    [
        ("tools/list", "tools", "tools"),
        ("resources/list", "resources", "resources"),
        ("prompts/list", "prompts", "prompts"),
    ],
)
async def test_pagination_walks_every_item_once(method: str, key: str, kind: str) -> None:
    h = Harness(page_size=2)
    await h.initialize()
    names, pages = await _walk(h, method, key)
    expected = [d.name for d in getattr(h.server.registry, kind).values() if d.since is None]
    assert names == expected and len(set(names)) == len(names)
    assert pages == (len(expected) + 1) // 2


async def test_templates_list(ready: Harness) -> None:
    result = await ready.result("resources/templates/list")
    assert result["resourceTemplates"][0]["uriTemplate"] == "test://template/{id}/data"


@pytest.mark.parametrize(
    "cursor", ["garbage", "", 5, "dG9vbHN8OTl8MA"], ids=["garbage", "empty", "number", "forged"]
)
async def test_bad_cursor_is_invalid_params(cursor: object) -> None:
    h = Harness(page_size=2)
    await h.initialize()
    assert error_code(await h.request("tools/list", {"cursor": cursor})) == -32602


async def test_cursor_of_another_list_is_rejected() -> None:
    h = Harness(page_size=2)
    await h.initialize()
    cursor = (await h.result("tools/list"))["nextCursor"]
    assert error_code(await h.request("prompts/list", {"cursor": cursor})) == -32602


async def test_cursor_goes_stale_when_the_list_changes() -> None:
    h = Harness(page_size=2)
    await h.initialize()
    cursor = (await h.result("tools/list"))["nextCursor"]

    @h.server.registry.tool("added_later", description="new")
    async def added(ctx: RequestContext) -> str:
        return "x"

    assert error_code(await h.request("tools/list", {"cursor": cursor})) == -32602
    names, _ = await _walk(h, "tools/list", "tools")
    assert "added_later" in names


# ---------------------------------------------------------------- resources and prompts


async def test_read_text_resource(ready: Harness) -> None:
    [content] = (await ready.result("resources/read", {"uri": "test://static-text"}))["contents"]
    assert content == {
        "uri": "test://static-text",
        "mimeType": "text/plain",
        "text": "This is the content of the static text resource.",
    }


async def test_read_binary_resource_is_base64_blob(ready: Harness) -> None:
    import base64

    [content] = (await ready.result("resources/read", {"uri": "test://static-binary"}))["contents"]
    assert base64.b64decode(content["blob"]).startswith(b"\x89PNG")


async def test_missing_resource_is_32002(ready: Harness) -> None:
    assert error_code(await ready.request("resources/read", {"uri": "test://nope"})) == -32002


async def test_subscribe_and_updates_reach_the_default_sink(ready: Harness) -> None:
    got: list[bytes] = []

    async def default(message: Outgoing) -> None:
        got.append(message.data)

    ready.session.set_default_sink(default)
    assert await ready.result("resources/subscribe", {"uri": "test://watched-resource"}) == {}
    await ready.server.resource_updated("test://watched-resource")
    assert await ready.result("resources/unsubscribe", {"uri": "test://watched-resource"}) == {}
    await ready.server.resource_updated("test://watched-resource")
    assert [msgspec.json.decode(g) for g in got] == [
        {
            "jsonrpc": "2.0",
            "method": "notifications/resources/updated",
            "params": {"uri": "test://watched-resource"},
        }
    ]


async def test_subscribe_unknown_resource_is_32002(ready: Harness) -> None:
    assert error_code(await ready.request("resources/subscribe", {"uri": "test://missing"})) == -32002


async def test_prompt_with_arguments(ready: Harness) -> None:
    result = await ready.result(
        "prompts/get", {"name": "test_prompt_with_arguments", "arguments": {"arg1": "a", "arg2": "b"}}
    )
    assert result["messages"] == [
        {"role": "user", "content": {"type": "text", "text": "Prompt with arguments: arg1='a', arg2='b'"}}
    ]


@pytest.mark.parametrize(
    "params",
    [
        {"name": "nope"},
        {"name": "test_prompt_with_arguments", "arguments": {"arg1": "a"}},
        {"name": "test_prompt_with_arguments", "arguments": {"arg1": "a", "arg2": 3}},
    ],
    ids=["unknown", "missing-argument", "non-string-argument"],
)
async def test_bad_prompt_request_is_invalid_params(ready: Harness, params: dict[str, Any]) -> None:
    assert error_code(await ready.request("prompts/get", params)) == -32602


# ---------------------------------------------------------------- tools/call errors


async def test_unknown_tool_is_invalid_params(ready: Harness) -> None:
    assert error_code(await ready.request("tools/call", {"name": "no_such_tool"})) == -32602


async def test_argument_validation_failure_is_an_error_result(ready: Harness) -> None:
    result = await ready.result("tools/call", {"name": "test_sampling", "arguments": {"prompt": 5}})
    assert result["isError"] is True
    assert result["content"][0]["text"].startswith("Error executing tool test_sampling: ")


async def test_tool_result_content_blocks(ready: Harness) -> None:
    result = await ready.result("tools/call", {"name": "test_multiple_content_types"})
    assert [b["type"] for b in result["content"]] == ["text", "image", "resource"]
    assert result["content"][2]["resource"]["uri"] == "test://mixed-content-resource"


async def test_tool_error_flag(ready: Harness) -> None:
    result = await ready.result("tools/call", {"name": "test_error_handling"})
    assert result["isError"] is True and result["content"][0]["type"] == "text"


async def test_text_content_helper_is_plain() -> None:
    assert msgspec.json.encode(TextContent("x")) == b'{"type":"text","text":"x"}'


def test_session_ids_are_long_random_visible_ascii() -> None:
    server = Harness().server
    ids = {server.create_session(transport="t").session_id for _ in range(200)}
    assert len(ids) == 200
    for sid in ids:
        assert len(sid) * 6 >= 128 and all(0x21 <= ord(c) <= 0x7E for c in sid)
        assert server.get_session(sid) is not None


async def test_unsubscribe_is_lenient(ready: Harness) -> None:
    assert await ready.result("resources/unsubscribe", {"uri": "test://never-subscribed"}) == {}


async def test_subscriptions_are_bounded(ready: Harness) -> None:
    from protocol import session as session_module

    ready.session.core.subscriptions.update(f"x://{i}" for i in range(session_module.MAX_SUBSCRIPTIONS))
    assert (
        error_code(await ready.request("resources/subscribe", {"uri": "test://watched-resource"})) == -32602
    )


async def _announcing_session(announce: bool) -> tuple[Harness, list[Any]]:
    registry = Registry("t", "1", announce_list_changes=announce)
    h = Harness(registry)
    got: list[Any] = []

    async def default(message: Outgoing) -> None:
        got.append(msgspec.json.decode(message.data))

    h.session.set_default_sink(default)
    caps = (await h.initialize())["capabilities"]
    assert caps["tools"]["listChanged"] is announce and caps["prompts"]["listChanged"] is announce

    @registry.tool("late", description="registered while serving")
    async def late(ctx: RequestContext) -> str:
        return "x"

    registry.list_changed("resources")
    await asyncio.sleep(0.01)
    return h, got


async def test_list_changed_is_announced_when_declared() -> None:
    _, got = await _announcing_session(True)
    assert [m["method"] for m in got] == [
        "notifications/tools/list_changed",
        "notifications/resources/list_changed",
    ]


async def test_list_changed_is_silent_when_not_declared() -> None:
    _, got = await _announcing_session(False)
    assert got == []
