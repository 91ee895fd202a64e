"""Hypothesis fuzz of the framer and the session: arbitrary bytes and JSON never crash or hang, and
every malformed input gets the right error code (MCP-PROTOCOL.md §2)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.protocol.conftest import Harness

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MISSING = object()
CHEAP_METHODS = [
    "ping",
    "tools/list",
    "resources/list",
    "prompts/list",
    "resources/templates/list",
    "resources/read",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "resources/subscribe",
    "server/discover",
    "initialize",
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ids = st.one_of(
    st.just(MISSING),
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=6),
    st.floats(allow_nan=False),
    st.just({"a": 1}),
)
messages = st.fixed_dictionaries(
    {
        "jsonrpc": st.sampled_from(["2.0", "2.0", "2.0", "1.0", 2, MISSING]),
        "id": ids,
        "method": st.one_of(
            st.sampled_from(CHEAP_METHODS), st.text(max_size=10), st.integers(), st.just(MISSING)
        ),
        "params": st.one_of(
            st.just(MISSING), st.none(), json_values, st.dictionaries(st.text(max_size=6), json_values)
        ),
        "result": st.one_of(st.just(MISSING), json_values),
    }
).map(lambda d: {k: v for k, v in d.items() if v is not MISSING})


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))  # a hang fails the example


async def _exchange(data: bytes, *, initialized: bool) -> list[Any]:
    h = Harness(page_size=2)
    if initialized:
        await h.initialize()
    out = await h.send(data)
    await h.session.close()
    return out


def _assert_well_formed(reply: Any) -> None:
    assert reply["jsonrpc"] == "2.0"
    assert ("result" in reply) != ("error" in reply)
    if "error" in reply:
        assert isinstance(reply["error"]["code"], int) and isinstance(reply["error"]["message"], str)
        assert "Traceback" not in reply["error"]["message"]


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes(data: bytes) -> None:
    out = run(_exchange(data, initialized=True))
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError:
        assert out == [{"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}}]
        return
    for reply in out:
        _assert_well_formed(reply)
    if not isinstance(value, dict | list):
        assert [r["error"]["code"] for r in out] == [-32600]


@FUZZ
@given(st.text(max_size=100))
def test_arbitrary_text_lines(text: str) -> None:
    for reply in run(_exchange(text.encode(), initialized=False)):
        _assert_well_formed(reply)


@FUZZ
@given(json_values)
def test_arbitrary_json_values(value: Any) -> None:
    out = run(_exchange(msgspec.json.encode(value), initialized=True))
    if isinstance(value, list):
        # 2025-11-25 forbids batches: one -32600 for any array.
        assert out == [
            {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": out[0]["error"]["message"]}}
        ]
        return
    for reply in out:
        _assert_well_formed(reply)
    if not isinstance(value, dict):
        assert [r["error"]["code"] for r in out] == [-32600]


def _expected(message: dict[str, Any]) -> tuple[str, Any]:
    """The oracle: ("none", _) no answer; ("error", code); ("answer", id) a result or a params-level error."""
    rid = message.get("id", MISSING)
    valid_id = type(rid) in (int, str)
    if message.get("jsonrpc") != "2.0":
        return "error", -32600
    if "method" in message:
        if type(message["method"]) is not str:
            return "error", -32600
        if "params" in message and type(message["params"]) is not dict:
            return ("error", -32600) if rid is not MISSING else ("none", None)
        if rid is MISSING:
            return "none", None
        if not valid_id:
            return "error", -32600
        if message["method"] not in CHEAP_METHODS or message["method"] == "server/discover":
            return "error", -32601
        return "answer", rid
    if rid is not MISSING and "result" in message:
        return "none", None
    return "error", -32600


@FUZZ
@given(messages)
def test_structured_messages_get_the_right_code(message: dict[str, Any]) -> None:
    out = run(_exchange(msgspec.json.encode(message), initialized=True))
    kind, detail = _expected(message)
    if kind == "none":
        assert out == []
        return
    [reply] = out
    _assert_well_formed(reply)
    if kind == "error":
        assert reply["error"]["code"] == detail
        rid = message.get("id")
        assert reply["id"] == (rid if type(rid) in (int, str) else None)
    else:
        assert reply["id"] == detail
        if "error" in reply:
            assert reply["error"]["code"] in (-32600, -32602, -32002)


@FUZZ
@given(st.lists(messages, min_size=1, max_size=5))
def test_batches_in_2025_03_26_answer_each_request(batch: list[dict[str, Any]]) -> None:
    async def go() -> list[Any]:
        h = Harness(page_size=2)
        await h.initialize("2025-03-26")
        out = await h.send(msgspec.json.encode(batch))
        await h.session.close()
        return out

    out = run(go())
    if any(m.get("method") == "initialize" and _expected(m)[0] == "answer" for m in batch):
        assert [r["error"]["code"] for r in out] == [-32600]
        return
    expected = [_expected(m) for m in batch]
    answers = sum(1 for kind, _ in expected if kind != "none")
    if answers == 0:
        assert out == []
        return
    [replies] = out
    assert isinstance(replies, list) and len(replies) == answers
    for reply in replies:
        _assert_well_formed(reply)


@FUZZ
@given(
    st.lists(st.one_of(messages, json_values.map(msgspec.json.encode), st.binary(max_size=40)), max_size=8)
)
def test_message_sequences_on_one_session(frames: list[Any]) -> None:
    """Any sequence from a fresh (uninitialized) session: each frame answered well-formed, never a crash."""

    async def go() -> None:
        h = Harness(page_size=2)
        for frame in frames:
            data = frame if isinstance(frame, bytes) else msgspec.json.encode(frame)
            for reply in await h.send(data):
                for item in reply if isinstance(reply, list) else [reply]:
                    if "method" not in item:
                        _assert_well_formed(item)
        await h.session.close()

    run(go())
