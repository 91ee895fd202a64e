"""The conformance fixture registry matches the suite's table (MCP-PROTOCOL.md §10.2)."""

from __future__ import annotations

import asyncio
import base64
import struct
import zlib
from typing import Any

from protocol.testing.conformance import JSON_SCHEMA_2020_12, PNG, WAV, build_registry
from protocol.types import Outgoing
from tests.protocol.conftest import Harness

TOOLS = {
    "test_simple_text",
    "test_image_content",
    "test_audio_content",
    "test_embedded_resource",
    "test_multiple_content_types",
    "test_tool_with_logging",
    "test_tool_with_progress",
    "test_error_handling",
    "test_reconnection",
    "test_sampling",
    "test_elicitation",
    "test_elicitation_sep1034_defaults",
    "test_elicitation_sep1330_enums",
    "json_schema_2020_12_tool",
}


def test_fixture_names() -> None:
    r = build_registry()
    # What the handshake era sees; the 2026-07-28 fixtures are registered `since` that revision.
    assert {n for n, t in r.tools.items() if t.since is None} == TOOLS
    assert set(r.resources) == {"test://static-text", "test://static-binary", "test://watched-resource"}
    assert set(r.templates) == {"test://template/{id}/data"}
    assert {n for n, p in r.prompts.items() if p.since is None} == {
        "test_simple_prompt",
        "test_prompt_with_arguments",
        "test_prompt_with_embedded_resource",
        "test_prompt_with_image",
    }
    stateless = {n for n, t in r.tools.items() if t.since == "2026-07-28"}
    assert {
        "test_missing_capability",
        "test_input_required_result_elicitation",
        "greet",
        "slow_compute",
    } <= stateless
    assert {n for n, t in r.tools.items() if t.tasks == "required"} == {"failing_job", "test_tool_with_task"}


def test_everything_has_a_description() -> None:
    r = build_registry()
    items: list[Any] = [*r.tools.values(), *r.resources.values(), *r.templates.values(), *r.prompts.values()]
    assert all(item.description for item in items)


def test_png_is_a_valid_image() -> None:
    assert PNG.startswith(b"\x89PNG\r\n\x1a\n")
    length, kind = struct.unpack(">I4s", PNG[8:16])
    assert kind == b"IHDR" and struct.unpack(">II", PNG[16:24]) == (1, 1)
    assert zlib.crc32(PNG[12 : 16 + length]) == struct.unpack(">I", PNG[16 + length : 20 + length])[0]


def test_wav_is_riff_wave() -> None:
    assert WAV[:4] == b"RIFF" and WAV[8:12] == b"WAVE" and struct.unpack("<I", WAV[4:8])[0] == len(WAV) - 8


async def test_json_schema_2020_12_tool_schema_is_returned_unchanged(ready: Harness) -> None:
    tools = {t["name"]: t for t in (await ready.result("tools/list"))["tools"]}
    assert tools["json_schema_2020_12_tool"]["inputSchema"] == JSON_SCHEMA_2020_12


async def test_audio_tool_returns_wav(ready: Harness) -> None:
    [block] = (await ready.result("tools/call", {"name": "test_audio_content"}))["content"]
    assert block["mimeType"] == "audio/wav" and base64.b64decode(block["data"]) == WAV


async def _elicit(tool: str, answer: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    h = Harness()
    await h.initialize(capabilities={"elicitation": {}})
    call = asyncio.create_task(h.request("tools/call", {"name": tool, "arguments": {"message": "m"}}))
    for _ in range(200):
        await asyncio.sleep(0.005)
        asks = [m for m in map(_decode, h.sent) if m.get("method") == "elicitation/create"]
        if asks:
            break
    [ask] = asks
    await h.send({"jsonrpc": "2.0", "id": ask["id"], "result": answer})
    return ask["params"], (await call)["result"]


async def test_elicitation_sends_the_schema_and_reports_the_answer() -> None:
    params, result = await _elicit(
        "test_elicitation", {"action": "accept", "content": {"username": "u", "email": "e"}}
    )
    assert params["message"] == "m" and params["requestedSchema"]["required"] == ["username", "email"]
    assert (
        result["content"][0]["text"] == 'User response: action=accept, content={"username":"u","email":"e"}'
    )


async def test_sep1034_defaults() -> None:
    params, result = await _elicit("test_elicitation_sep1034_defaults", {"action": "decline"})
    props = params["requestedSchema"]["properties"]
    assert {k: v["default"] for k, v in props.items()} == {
        "name": "John Doe",
        "age": 30,
        "score": 95.5,
        "status": "active",
        "verified": True,
    }
    assert result["content"][0]["text"].startswith("Elicitation completed: action=decline")


async def test_sep1330_enum_shapes() -> None:
    params, _ = await _elicit("test_elicitation_sep1330_enums", {"action": "cancel"})
    props = params["requestedSchema"]["properties"]
    assert "enum" in props["untitledSingle"] and "oneOf" in props["titledSingle"]
    assert len(props["legacyEnum"]["enumNames"]) == len(props["legacyEnum"]["enum"])
    assert "enum" in props["untitledMulti"]["items"] and "anyOf" in props["titledMulti"]["items"]


async def test_reconnection_tool_asks_the_transport_to_close_its_stream(ready: Harness) -> None:
    closed: list[int] = []

    class StreamSink:
        async def __call__(self, message: Outgoing) -> None:
            ready.sent.append(message.data)

        async def close_stream(self, retry_ms: int) -> None:
            closed.append(retry_ms)

    await ready.session.handle(
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"test_reconnection"}}', StreamSink()
    )
    assert closed == [100]
    assert b"Reconnection test completed" in ready.sent[-1]


def _decode(data: bytes) -> dict[str, Any]:
    import msgspec

    return msgspec.json.decode(data)  # type: ignore[no-any-return]
