"""JSON-RPC 2.0 framing and error rules (MCP-PROTOCOL.md §2), one rule per test."""

from __future__ import annotations

import asyncio

import pytest

from protocol.events import expects_reply, runs_handlers
from protocol.registry import Registry, RequestContext
from protocol.types import Reply
from tests.protocol.conftest import Harness, error_code, gated_tool


async def test_non_json_is_parse_error_with_null_id(harness: Harness) -> None:
    [reply] = await harness.send(b'{"jsonrpc": "2.0", "id": 1, "method": "ping"')
    assert reply == {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}}


async def test_invalid_utf8_is_parse_error(harness: Harness) -> None:
    [reply] = await harness.send(b'{"jsonrpc":"2.0","id":1,"method":"p\xffing"}')
    assert error_code(reply) == -32700


@pytest.mark.parametrize(
    "message",
    [
        {"jsonrpc": "1.0", "id": 1, "method": "ping"},
        {"id": 1, "method": "ping"},
        {"jsonrpc": 2.0, "id": 1, "method": "ping"},
    ],
    ids=["jsonrpc-1.0", "jsonrpc-missing", "jsonrpc-number"],
)
async def test_wrong_jsonrpc_version_is_invalid_request_echoing_id(harness: Harness, message: object) -> None:
    [reply] = await harness.send(message)
    assert error_code(reply) == -32600
    assert reply["id"] == 1


@pytest.mark.parametrize(
    "bad_id", [None, True, 1.5, {"a": 1}, [1]], ids=["null", "bool", "float", "object", "array"]
)
async def test_request_id_must_be_string_or_integer(harness: Harness, bad_id: object) -> None:
    [reply] = await harness.send({"jsonrpc": "2.0", "id": bad_id, "method": "ping"})
    assert error_code(reply) == -32600
    assert reply["id"] is None


async def test_missing_method_is_invalid_request(harness: Harness) -> None:
    [reply] = await harness.send({"jsonrpc": "2.0", "id": 7})
    assert error_code(reply) == -32600
    assert reply["id"] == 7


async def test_non_string_method_is_invalid_request(harness: Harness) -> None:
    [reply] = await harness.send({"jsonrpc": "2.0", "id": 7, "method": 12})
    assert error_code(reply) == -32600


@pytest.mark.parametrize("params", [[1, 2], "x", 3, None], ids=["array", "string", "number", "null"])
async def test_non_object_params_is_invalid_request(harness: Harness, params: object) -> None:
    [reply] = await harness.send({"jsonrpc": "2.0", "id": 3, "method": "ping", "params": params})
    assert error_code(reply) == -32600
    assert reply["id"] == 3


@pytest.mark.parametrize("value", ["x", 1, None, True], ids=["string", "number", "null", "bool"])
async def test_non_object_frame_is_invalid_request(harness: Harness, value: object) -> None:
    [reply] = await harness.send(value)
    assert error_code(reply) == -32600
    assert reply["id"] is None


async def test_string_and_integer_ids_are_echoed_exactly(ready: Harness) -> None:
    assert (await ready.request("ping", id="abc"))["id"] == "abc"
    assert (await ready.request("ping", id=2**53 + 1))["id"] == 2**53 + 1
    assert (await ready.request("ping", id=-4))["id"] == -4


async def test_unknown_method_is_method_not_found(ready: Harness) -> None:
    assert error_code(await ready.request("tools/frobnicate")) == -32601


async def test_unknown_method_before_initialize_is_method_not_found(harness: Harness) -> None:
    # mcp 2.x probes server/discover first and waits 10 s unless answered.
    assert error_code(await harness.request("server/discover", {})) == -32601


async def test_ping_before_initialize_is_answered(harness: Harness) -> None:
    assert (await harness.request("ping"))["result"] == {}


async def test_known_request_before_initialize_is_invalid_request(harness: Harness) -> None:
    assert error_code(await harness.request("tools/list")) == -32600


async def test_notification_is_never_answered(ready: Harness) -> None:
    assert await ready.send({"jsonrpc": "2.0", "method": "notifications/whatever"}) == []


async def test_invalid_notification_is_not_answered(ready: Harness) -> None:
    assert await ready.send({"jsonrpc": "2.0", "method": "notifications/x", "params": [1]}) == []


async def test_client_response_to_unknown_id_is_ignored(ready: Harness) -> None:
    assert await ready.send({"jsonrpc": "2.0", "id": 99, "result": {}}) == []


async def test_invalid_params_is_32602(ready: Harness) -> None:
    assert error_code(await ready.request("tools/call", {"name": 5})) == -32602


async def test_internal_error_hides_traceback() -> None:
    registry = Registry("t", "1")

    @registry.resource("x://boom", name="boom")
    async def boom(ctx: RequestContext) -> str:
        raise RuntimeError("secret detail in /etc/passwd")

    h = Harness(registry)
    await h.initialize()
    reply = await h.request("resources/read", {"uri": "x://boom"})
    assert reply["error"] == {"code": -32603, "message": "Internal error"}


async def test_duplicate_in_flight_id_is_invalid_request() -> None:
    h, release = await gated_tool("wait")
    first = asyncio.create_task(h.request("tools/call", {"name": "wait"}, id=5))
    await asyncio.sleep(0.01)
    second = await h.request("tools/call", {"name": "wait"}, id=5)
    assert error_code(second) == -32600
    release.set()
    assert (await first)["result"]["structuredContent"] == {"result": 1}


async def test_id_can_be_reused_after_completion(ready: Harness) -> None:
    await ready.request("tools/call", {"name": "test_simple_text"}, id=1)
    assert "result" in await ready.request("tools/call", {"name": "test_simple_text"}, id=1)


# ---------------------------------------------------------------- batches


def _ping(i: int) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": i, "method": "ping"}


@pytest.mark.parametrize("version", ["2024-11-05", "2025-03-26"])
async def test_batch_answered_element_by_element_in_old_revisions(version: str) -> None:
    h = Harness()
    await h.initialize(version)
    [reply] = await h.send([_ping(1), {"jsonrpc": "2.0", "method": "notifications/x"}, _ping(2)])
    assert sorted(r["id"] for r in reply) == [1, 2]
    assert all(r["result"] == {} for r in reply)


@pytest.mark.parametrize("version", ["2025-06-18", "2025-11-25"])
async def test_batch_rejected_with_one_error_in_new_revisions(version: str) -> None:
    h = Harness()
    await h.initialize(version)
    [reply] = await h.send([_ping(1), _ping(2)])
    assert error_code(reply) == -32600
    assert reply["id"] is None


async def test_empty_batch_is_one_invalid_request(harness: Harness) -> None:
    [reply] = await harness.send([])
    assert error_code(reply) == -32600
    assert reply["id"] is None


async def test_initialize_inside_a_batch_is_rejected(harness: Harness) -> None:
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-03-26",
            "capabilities": {},
            "clientInfo": {"name": "c", "version": "1"},
        },
    }
    [reply] = await harness.send([init])
    assert error_code(reply) == -32600
    assert harness.session.protocol_version is None


async def test_batch_of_only_notifications_gets_no_answer() -> None:
    h = Harness()
    await h.initialize("2025-03-26")
    events = h.session.receive(
        b'[{"jsonrpc":"2.0","method":"notifications/a"},{"jsonrpc":"2.0","method":"n/b"}]'
    )
    assert not expects_reply(events)
    assert await h.send([{"jsonrpc": "2.0", "method": "notifications/a"}]) == []


async def test_batch_invalid_elements_get_their_own_errors() -> None:
    h = Harness()
    await h.initialize("2025-03-26")
    [reply] = await h.send([_ping(1), 5, {"jsonrpc": "2.0", "id": 2, "method": "nope"}])
    codes = {r["id"]: r.get("error", {}).get("code") for r in reply}
    assert codes == {1: None, None: -32600, 2: -32601}


async def test_event_flags_for_transports(harness: Harness) -> None:
    init = harness.session.receive(
        b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25"}}'
    )
    assert expects_reply(init) and not runs_handlers(init)
    note = harness.session.receive(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
    assert not expects_reply(note)
    bad = harness.session.receive(b"nope")
    assert expects_reply(bad) and [type(e) for e in bad] == [Reply] and bad[0].status == 400  # type: ignore[union-attr]
    call = harness.session.receive(
        b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"test_simple_text"}}'
    )
    assert runs_handlers(call)


# ---------------------------------------------------------------- server → client requests


async def test_client_response_is_routed_to_the_waiting_handler() -> None:
    h = Harness()
    await h.initialize(capabilities={"sampling": {}})
    call = asyncio.create_task(
        h.request("tools/call", {"name": "test_sampling", "arguments": {"prompt": "hi"}})
    )
    for _ in range(100):
        await asyncio.sleep(0.005)
        outgoing = [m for m in map(_decode, h.sent) if m.get("method") == "sampling/createMessage"]
        if outgoing:
            break
    [req] = outgoing
    assert req["params"]["messages"][0]["content"]["text"] == "hi"
    answer = {"role": "assistant", "content": {"type": "text", "text": "pong"}, "model": "m"}
    assert await h.send({"jsonrpc": "2.0", "id": req["id"], "result": answer}) == []
    result = (await call)["result"]
    assert result["content"] == [{"type": "text", "text": "LLM response: pong"}]


async def test_client_request_without_capability_is_a_tool_error(ready: Harness) -> None:
    result = await ready.result("tools/call", {"name": "test_sampling", "arguments": {"prompt": "x"}})
    assert result["isError"] is True
    assert "sampling" in result["content"][0]["text"]


def _decode(data: bytes) -> dict[str, object]:
    import msgspec

    return msgspec.json.decode(data)  # type: ignore[no-any-return]


async def test_in_flight_calls_are_bounded() -> None:
    h, release = await gated_tool("wait")
    h.session.core.max_inflight = 2
    calls = [asyncio.create_task(h.request("tools/call", {"name": "wait"}, id=i)) for i in (1, 2)]
    await asyncio.sleep(0.01)
    assert error_code(await h.request("tools/call", {"name": "wait"}, id=3)) == -32000
    assert (await h.request("ping", id=4))["result"] == {}
    release.set()
    assert all("result" in r for r in await asyncio.gather(*calls))
