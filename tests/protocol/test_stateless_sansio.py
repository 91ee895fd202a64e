"""The 2026-07-28 rules of the core, driven with bytes and plain calls: no event loop, no transport."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from protocol import headers as h
from protocol import mrtr
from protocol.errors import HeaderMismatch, InputRequired, InvalidParams, ResourceNotFound
from protocol.events import Batch, Cancel, Dispatch, Event, Listen, Provide, StopTask
from protocol.headers import HttpHeaders
from protocol.messages import CallToolResult
from protocol.registry import ReadOutcome
from protocol.session import Core, Session
from protocol.stateless import CacheHint
from protocol.tasks import TaskError, TaskStore
from protocol.testing.conformance import build_registry
from protocol.types import Notify, Reply

V = "2026-07-28"
TASKS = {"extensions": {"io.modelcontextprotocol/tasks": {}}}


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _session(*, http: bool = False, principal: str | None = None, clock: Clock | None = None) -> Session:
    core = Core(build_registry("9.9.9"), secret=b"s" * 32, clock=clock or Clock())
    return Session(core, http=http, principal=principal)


def _meta(caps: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "io.modelcontextprotocol/protocolVersion": V,
        "io.modelcontextprotocol/clientCapabilities": caps or {},
        **extra,
    }


def _req(rid: Any, method: str, params: dict[str, Any] | None = None, meta: Any = "default") -> bytes:
    params = dict(params or {})
    if meta == "default":
        params["_meta"] = _meta()
    elif meta is not None:
        params["_meta"] = meta
    return msgspec.json.encode({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})


def _one(events: list[Event]) -> Event:
    assert len(events) == 1, events
    return events[0]


def _reply(events: list[Event]) -> tuple[dict[str, Any], int]:
    event = _one(events)
    assert isinstance(event, Reply), event
    return msgspec.json.decode(event.data), event.status


def _headers(method: str, name: str | None = None, version: str | None = V, **params: str) -> HttpHeaders:
    return HttpHeaders(version, method, name, {k.lower(): v for k, v in params.items()})


# ---------------------------------------------------------------- the envelope


def test_discover_lists_both_eras_and_caches_publicly() -> None:
    body, status = _reply(_session().receive(_req(1, "server/discover")))
    result = body["result"]
    assert status == 200 and result["resultType"] == "complete"
    assert result["supportedVersions"][0] == V and "2025-11-25" in result["supportedVersions"]
    assert result["cacheScope"] == "public" and result["ttlMs"] > 0
    assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["version"] == "9.9.9"
    assert "io.modelcontextprotocol/tasks" in result["capabilities"]["extensions"]


def test_a_request_without_the_modern_meta_is_a_handshake_request() -> None:
    session = _session()
    body, _ = _reply(session.receive(_req(1, "server/discover", meta=None)))
    assert body["error"]["code"] == -32601  # what a handshake-era server says: mcp 2.x then initializes
    body, _ = _reply(session.receive(_req(2, "tools/list", meta=None)))
    assert body["error"]["code"] == -32600  # not initialized


@pytest.mark.parametrize(
    "meta",
    [
        {"io.modelcontextprotocol/clientCapabilities": {}},
        {"io.modelcontextprotocol/protocolVersion": V},
        {"io.modelcontextprotocol/protocolVersion": 7, "io.modelcontextprotocol/clientCapabilities": {}},
        {"io.modelcontextprotocol/protocolVersion": V, "io.modelcontextprotocol/clientCapabilities": []},
    ],
)
def test_missing_or_malformed_meta_fields_are_invalid_params_and_400(meta: dict[str, Any]) -> None:
    body, status = _reply(_session().receive(_req(5, "tools/list", meta=meta)))
    assert body["error"]["code"] == -32602 and body["id"] == 5 and status == 400


def test_client_info_is_optional() -> None:
    body, status = _reply(_session().receive(_req(1, "tools/list")))
    assert status == 200 and body["result"]["resultType"] == "complete"


def test_an_unsupported_version_names_what_is_supported() -> None:
    meta = _meta()
    meta["io.modelcontextprotocol/protocolVersion"] = "v999"
    body, status = _reply(_session().receive(_req(3, "tools/list", meta=meta)))
    assert status == 400 and body["error"]["code"] == -32022
    assert body["error"]["data"]["requested"] == "v999" and V in body["error"]["data"]["supported"]


@pytest.mark.parametrize(
    "method", ["initialize", "ping", "logging/setLevel", "resources/subscribe", "nope/x"]
)
def test_removed_and_unknown_methods_are_404_method_not_found(method: str) -> None:
    body, status = _reply(_session().receive(_req(9, method, {"uri": "x"})))
    assert body["error"]["code"] == -32601 and status == 404


def test_a_bad_log_level_is_invalid_params() -> None:
    meta = _meta(**{"io.modelcontextprotocol/logLevel": "loud"})
    body, _ = _reply(_session().receive(_req(1, "tools/list", meta=meta)))
    assert body["error"]["code"] == -32602


# ---------------------------------------------------------------- HTTP headers (SEP-2243)


def test_header_checks_in_order() -> None:
    def code(headers: HttpHeaders, meta: Any = "default") -> int:
        body, status = _reply(_session(http=True).receive(_req(1, "tools/list", meta=meta), headers))
        assert status == 400
        return int(body["error"]["code"])

    assert code(_headers("tools/list", version=None)) == -32020  # header missing
    assert code(_headers("tools/list"), meta={"x": 1}) == -32602  # then the meta
    assert code(_headers("tools/list", version="2025-11-26")) == -32020  # header ≠ meta
    assert code(_headers("prompts/list")) == -32020  # Mcp-Method ≠ method
    assert code(HttpHeaders(V, None, None)) == -32020  # Mcp-Method missing
    assert code(_headers("TOOLS/LIST")) == -32020  # values are case-sensitive


def test_mcp_name_must_mirror_the_name_after_trimming_and_base64() -> None:
    call = _req(1, "tools/call", {"name": "test_simple_text", "arguments": {}})

    def result(name: str | None) -> tuple[dict[str, Any], int]:
        events = _session(http=True).receive(call, _headers("tools/call", name))
        if isinstance(events[0], Dispatch):
            return {}, 200
        return _reply(events)

    assert result("  test_simple_text\t")[1] == 200
    assert result("=?base64?dGVzdF9zaW1wbGVfdGV4dA==?=")[1] == 200
    assert result("other")[0]["error"]["code"] == -32020
    assert result(None)[0]["error"]["code"] == -32020
    assert result("=?base64?not base64!?=")[0]["error"]["code"] == -32020


def test_mirrored_arguments_need_their_header() -> None:
    def status(arguments: dict[str, Any], **params: str) -> int:
        call = _req(1, "tools/call", {"name": "test_header_param", "arguments": arguments})
        events = _session(http=True).receive(call, _headers("tools/call", "test_header_param", **params))
        return 200 if isinstance(events[0], Dispatch) else _reply(events)[1]

    assert status({"region": "eu"}, Region="eu") == 200
    assert status({"region": "Hello"}, region="=?base64?SGVsbG8=?=") == 200  # names are case-insensitive
    assert status({"region": "SGVsbG8="}, Region="SGVsbG8=") == 200  # no sentinel: literal
    assert status({"region": "eu"}) == 400  # value in the body, header missing
    assert status({"region": "eu"}, Region="us") == 400
    assert status({"region": "Hello"}, Region="=?base64?SGVsbG8?=") == 400  # bad padding
    assert status({}, Region="eu") == 400  # header without a value


def test_mirrored_params_are_validated_at_registration() -> None:
    ok = {"type": "object", "properties": {"a": {"type": "integer", "x-mcp-header": "A"}}}
    assert [p.path for p in h.mirrored_params(ok)] == [("a",)]
    bad_type = {"type": "object", "properties": {"a": {"type": "number", "x-mcp-header": "A"}}}
    in_items = {
        "type": "object",
        "properties": {"a": {"type": "array", "items": {"type": "string", "x-mcp-header": "A"}}},
    }
    twice = {"type": "object", "properties": {"a": {"type": "string", "x-mcp-header": "A"},
                                              "b": {"type": "string", "x-mcp-header": "a"}}}  # fmt: skip
    not_token = {"type": "object", "properties": {"a": {"type": "string", "x-mcp-header": "A B"}}}
    for schema in (bad_type, in_items, twice, not_token):
        with pytest.raises(ValueError):
            h.mirrored_params(schema)


def test_integer_and_boolean_headers_compare_as_values() -> None:
    params = (h.HeaderParam("N", ("n",), "integer"), h.HeaderParam("B", ("b",), "boolean"))
    h.check_params(HttpHeaders(V, "m", None, {"n": "42.0", "b": "true"}), params, {"n": 42, "b": True})
    with pytest.raises(HeaderMismatch):
        h.check_params(HttpHeaders(V, "m", None, {"n": "43", "b": "true"}), params, {"n": 42, "b": True})
    with pytest.raises(HeaderMismatch):
        h.check_params(HttpHeaders(V, "m", None, {"n": "42", "b": "True"}), params, {"n": 42, "b": True})


# ---------------------------------------------------------------- results


def test_listings_carry_resultType_and_caching_hints_and_hide_no_handshake_era_entry() -> None:
    session = _session()
    body, _ = _reply(session.receive(_req(1, "tools/list")))
    result = body["result"]
    assert (result["resultType"], result["cacheScope"], result["ttlMs"]) == ("complete", "public", 300_000)
    names = {t["name"] for t in result["tools"]}
    assert {"test_simple_text", "greet", "test_input_required_result_elicitation"} <= names
    assert all("execution" not in t for t in result["tools"])  # 2025-11-25's experimental tasks only


def test_a_read_carries_the_resources_caching_hint() -> None:
    session = _session()
    dispatch = _one(session.receive(_req(2, "resources/read", {"uri": "test://static-text"})))
    assert isinstance(dispatch, Dispatch)
    outcome = ReadOutcome([], CacheHint(86_400_000, "private"))
    body, _ = _reply(session.finish(dispatch.call, result=outcome))
    assert (body["result"]["ttlMs"], body["result"]["cacheScope"]) == (86_400_000, "private")


def test_a_missing_resource_is_invalid_params_with_its_uri() -> None:
    session = _session()
    dispatch = _one(session.receive(_req(2, "resources/read", {"uri": "test://nope"})))
    assert isinstance(dispatch, Dispatch)
    body, _ = _reply(session.finish(dispatch.call, error=ResourceNotFound("test://nope")))
    assert body["error"] == {
        "code": -32602,
        "message": "Resource not found: test://nope",
        "data": {"uri": "test://nope"},
    }


def test_logs_need_the_requests_own_log_level() -> None:
    session = _session()
    quiet = _one(session.receive(_req(1, "tools/call", {"name": "test_logging_tool"})))
    info = _meta(**{"io.modelcontextprotocol/logLevel": "info"})
    loud = _one(session.receive(_req(2, "tools/call", {"name": "test_logging_tool"}, meta=info)))
    assert isinstance(quiet, Dispatch) and isinstance(loud, Dispatch)
    assert session.log(quiet.call, "error", "x") is None
    note = session.log(loud.call, "info", "x")
    assert isinstance(note, Notify) and note.related == 2
    assert session.log(loud.call, "debug", "x") is None


# ---------------------------------------------------------------- input-required results (SEP-2322)


def _ask_user_name(session: Session, rid: int, extra: dict[str, Any] | None = None) -> Event:
    params = {"name": "test_input_required_result_elicitation", "arguments": {}, **(extra or {})}
    return _one(session.receive(_req(rid, "tools/call", params, meta=_meta({"elicitation": {}}))))


def test_input_required_round_trip_carries_answers_in_a_sealed_state() -> None:
    session = _session()
    first = _ask_user_name(session, 1)
    assert isinstance(first, Dispatch) and first.call.answers == {}
    asked = InputRequired({"user_name": ("elicitation/create", {"message": "name?"})})
    body, status = _reply(session.finish(first.call, error=asked))
    result = body["result"]
    assert status == 200 and result["resultType"] == "input_required"
    assert result["inputRequests"] == {
        "user_name": {"method": "elicitation/create", "params": {"message": "name?"}}
    }
    answer = {"action": "accept", "content": {"name": "A"}}
    retry = _ask_user_name(
        session, 2, {"inputResponses": {"user_name": answer}, "requestState": result["requestState"]}
    )
    assert isinstance(retry, Dispatch) and retry.call.answers == {"user_name": answer}


def test_a_tampered_foreign_or_expired_state_is_refused() -> None:
    clock = Clock()
    session = _session(clock=clock)
    first = _ask_user_name(session, 1)
    assert isinstance(first, Dispatch)
    state = _reply(session.finish(first.call, error=InputRequired({"k": ("roots/list", {})})))[0]["result"][
        "requestState"
    ]
    for bad in (state + "x", state[:-2], "AAAA"):
        body, _ = _reply([_ask_user_name(session, 2, {"requestState": bad})])
        assert body["error"]["code"] == -32602
    other = _one(session.receive(_req(4, "tools/call", {"name": "test_input_required_result_multi_round",
                                                          "requestState": state})))  # fmt: skip
    assert _reply([other])[0]["error"]["code"] == -32602  # issued for another tool
    mallory = _session(principal="mallory", clock=clock)
    assert _reply([_ask_user_name(mallory, 5, {"requestState": state})])[0]["error"]["code"] == -32602
    clock.now += mrtr.STATE_TTL + 1
    assert "expired" in _reply([_ask_user_name(session, 6, {"requestState": state})])[0]["error"]["message"]


def test_input_responses_must_be_objects() -> None:
    body, _ = _reply([_ask_user_name(_session(), 1, {"inputResponses": {"user_name": 12345}})])
    assert body["error"]["code"] == -32602


def test_only_calls_prompts_and_reads_may_answer_input_required() -> None:
    session = _session()
    ref = {"type": "ref/prompt", "name": "test_prompt_with_arguments"}
    dispatch = _one(
        session.receive(_req(1, "completion/complete", {"ref": ref, "argument": {"name": "arg1"}}))
    )
    assert isinstance(dispatch, Dispatch)
    body, _ = _reply(session.finish(dispatch.call, error=InputRequired({"k": ("roots/list", {})})))
    assert body["error"]["code"] == -32603


def test_missing_client_capability_names_it() -> None:
    session = _session()
    dispatch = _one(session.receive(_req(1, "tools/call", {"name": "test_missing_capability"})))
    assert isinstance(dispatch, Dispatch)
    with pytest.raises(Exception) as raised:
        session.require(dispatch.call, ["sampling/createMessage"])
    body, status = _reply(session.finish(dispatch.call, error=raised.value))
    assert (body["error"]["code"], status) == (-32021, 400)
    assert body["error"]["data"] == {"requiredCapabilities": {"sampling": {}}}


# ---------------------------------------------------------------- tasks (extension)


def _task_call(
    session: Session, rid: int, name: str = "slow_compute", caps: dict[str, Any] | None = None
) -> Event:
    return _one(session.receive(_req(rid, "tools/call", {"name": name, "arguments": {}}, meta=_meta(caps))))


def test_a_task_capable_call_becomes_a_task_only_for_a_client_with_the_extension() -> None:
    session = _session()
    plain = _task_call(session, 1)
    assert isinstance(plain, Dispatch) and plain.call.task_support == "forbidden"
    assert session.promote(plain.call) is None
    required = _one(session.receive(_req(2, "tools/call", {"name": "failing_job"})))
    body, status = _reply([required])  # type: ignore[list-item]
    assert (body["error"]["code"], status) == (-32021, 400)
    capable = _task_call(session, 3, caps=TASKS)
    assert isinstance(capable, Dispatch) and capable.call.task_support == "optional"
    created, _ = _reply([session.promote(capable.call, "busy")])  # type: ignore[list-item]
    task = created["result"]
    assert task["resultType"] == "task" and task["status"] == "working" and task["statusMessage"] == "busy"
    assert 3 not in session.inflight  # answered: the id may be reused


def test_task_lifecycle_through_get_update_and_cancel() -> None:
    session = _session()
    call = _task_call(session, 1, caps=TASKS)
    assert isinstance(call, Dispatch)
    task_id = _reply([session.promote(call.call)])[0]["result"]["taskId"]  # type: ignore[list-item]
    get = _req(2, "tasks/get", {"taskId": task_id}, meta=_meta(TASKS))
    assert _reply(session.receive(get))[0]["result"]["status"] == "working"
    keys = session.park(call.call, {"confirm": ("elicitation/create", {"message": "ok?"})})
    detailed = _reply(session.receive(get))[0]["result"]
    assert detailed["status"] == "input_required" and list(detailed["inputRequests"]) == list(keys.values())
    answers = {"confirm": {"action": "accept"}, "unknown": {}}
    update = _req(3, "tasks/update", {"taskId": task_id, "inputResponses": answers}, meta=_meta(TASKS))
    ack, *rest = session.receive(update)
    assert isinstance(ack, Reply) and msgspec.json.decode(ack.data)["result"]["resultType"] == "complete"
    assert rest == [Provide(task_id, {"confirm": {"action": "accept"}})]
    assert _reply(session.receive(get))[0]["result"]["status"] == "working"
    assert session.finish(call.call, result=CallToolResult([])) == []  # the reply went out long ago
    done = _reply(session.receive(get))[0]["result"]
    assert done["status"] == "completed" and done["result"]["content"] == []
    cancel = _req(4, "tasks/cancel", {"taskId": task_id}, meta=_meta(TASKS))
    assert len(session.receive(cancel)) == 1  # finished: an ack, nothing to stop


def test_cancel_stops_a_running_task_and_keys_are_never_reused() -> None:
    session = _session()
    call = _task_call(session, 1, caps=TASKS)
    assert isinstance(call, Dispatch)
    task_id = _reply([session.promote(call.call)])[0]["result"]["taskId"]  # type: ignore[list-item]
    first = session.park(call.call, {"k": ("roots/list", {})})
    session.receive(
        _req(2, "tasks/update", {"taskId": task_id, "inputResponses": {first["k"]: {}}}, meta=_meta(TASKS))
    )
    second = session.park(call.call, {"k": ("roots/list", {})})
    assert first["k"] != second["k"]
    events = session.receive(_req(3, "tasks/cancel", {"taskId": task_id}, meta=_meta(TASKS)))
    assert events[1:] == [StopTask(task_id)]
    got = _reply(session.receive(_req(4, "tasks/get", {"taskId": task_id}, meta=_meta(TASKS))))[0]["result"]
    assert got["status"] == "cancelled"


def test_tasks_belong_to_their_principal_and_need_the_extension() -> None:
    session = _session(principal="alice")
    call = _task_call(session, 1, caps=TASKS)
    assert isinstance(call, Dispatch)
    task_id = _reply([session.promote(call.call)])[0]["result"]["taskId"]  # type: ignore[list-item]
    other = Session(session.core, principal="bob")
    body, _ = _reply(other.receive(_req(2, "tasks/get", {"taskId": task_id}, meta=_meta(TASKS))))
    assert body["error"]["code"] == -32602
    body, status = _reply(session.receive(_req(3, "tasks/get", {"taskId": task_id})))
    assert (body["error"]["code"], status) == (-32021, 400)


def test_the_task_state_machine_refuses_illegal_moves() -> None:
    store = TaskStore(b"x" * 32, Clock())
    record = store.create(None)
    assert record is not None
    store.complete(record, b"{}")
    with pytest.raises(TaskError):
        store.move(record, "working")
    assert not store.cancel(record)  # a finished task stays finished
    with pytest.raises(InvalidParams):
        store.get("nope", None)


# ---------------------------------------------------------------- subscriptions/listen, cancellation, eras


def test_listen_acknowledges_then_tags_what_was_asked() -> None:
    session = _session()
    wanted = {"toolsListChanged": True, "resourceSubscriptions": ["test://x"]}
    listen = _req(7, "subscriptions/listen", {"notifications": wanted})
    opened, ack = session.receive(listen)
    assert opened == Listen(7) and isinstance(ack, Notify) and ack.related == 7
    assert msgspec.json.decode(ack.data)["params"]["_meta"] == {"io.modelcontextprotocol/subscriptionId": 7}
    [tools] = session.list_changed("tools")
    assert tools.related == 7 and b"subscriptionId" in tools.data
    assert session.list_changed("prompts") == []  # not asked for
    assert [n.related for n in session.resource_updated("test://x")] == [7]
    # stdio: the client ends it with notifications/cancelled; the server ends it with a response.
    assert (
        session.receive(b'{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":7}}')
        == []
    )
    assert session.list_changed("tools") == []


def test_a_stateless_call_is_cancelled_like_any_other() -> None:
    session = _session()
    call = _one(session.receive(_req("c", "tools/call", {"name": "test_simple_text"})))
    assert isinstance(call, Dispatch)
    assert session.receive(
        b'{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"c"}}'
    ) == [Cancel("c")]
    assert session.finish(call.call, result=CallToolResult([])) == []


def test_both_eras_share_one_connection() -> None:
    session = _session()
    assert "result" in _reply(session.receive(_req(1, "server/discover")))[0]
    init = b'{"jsonrpc":"2.0","id":2,"method":"initialize","params":{"protocolVersion":"2025-11-25"}}'
    assert _reply(session.receive(init))[0]["result"]["protocolVersion"] == "2025-11-25"
    legacy = _reply(session.receive(_req(3, "prompts/list", meta=None)))[0]["result"]
    modern = _reply(session.receive(_req(4, "prompts/list")))[0]["result"]
    assert "resultType" not in legacy and modern["resultType"] == "complete"
    assert isinstance(session.receive(b'[{"jsonrpc":"2.0","id":5,"method":"ping"}]')[0], Reply)  # no batches
    assert not isinstance(session.receive(b'[{"jsonrpc":"2.0","id":5,"method":"ping"}]')[0], Batch)


def test_sessionless_http_needs_initialize_or_a_stateless_request() -> None:
    session = _session(http=True)
    body, status = _reply(session.receive(_req(1, "tools/list", meta=None), HttpHeaders()))
    assert status == 400 and body["error"]["code"] == -32000 and body["id"] is None
    body, status = _reply(session.receive(_req(2, "server/discover", meta=None), HttpHeaders()))
    assert status == 400 and body["error"]["code"] == -32601
