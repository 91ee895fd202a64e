"""Streamable HTTP at /mcp, driven with a raw aiohttp client: one status rule per test."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator

import pytest

from protocol.http_app import STREAMABLE_KEY, build_app
from protocol.http_guard import HttpConfigError, HttpSettings
from protocol.messages import encode_notification, encode_result
from protocol.server import Server
from protocol.sse import EventStream
from tests.protocol.httpkit import (
    POST_HEADERS,
    Event,
    Probe,
    all_events,
    events,
    init_body,
    initialize,
    make_registry,
    messages,
    post,
    rpc,
    serve,
)

# ---------------------------------------------------------------- sessions


async def test_initialize_mints_a_session_id_of_visible_ascii() -> None:
    async with serve() as (client, _):
        resp = await client.post("/mcp", data=init_body(), headers=POST_HEADERS)
        assert resp.status == 200
        assert resp.content_type == "application/json"
        sid = resp.headers["Mcp-Session-Id"]
        assert re.fullmatch(r"[\x21-\x7e]{22,}", sid)  # ≥ 128 bits
        assert (await resp.json())["result"]["serverInfo"]["name"] == "contree-mcp-conformance"


async def test_two_initializes_get_different_sessions() -> None:
    async with serve() as (client, _):
        a = await initialize(client)
        b = await initialize(client)
        assert a["Mcp-Session-Id"] != b["Mcp-Session-Id"]


async def test_request_without_session_id_is_400() -> None:
    async with serve() as (client, _):
        await initialize(client)
        resp = await client.post("/mcp", data=rpc(1, "tools/list"), headers=POST_HEADERS)
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == -32000


async def test_unknown_session_id_is_404() -> None:
    async with serve() as (client, _):
        resp = await post(client, {"Mcp-Session-Id": "nope"}, rpc(1, "ping"))
        assert resp.status == 404
        assert resp.content_type == "application/json"


async def test_server_discover_without_session_gets_method_not_found_at_once() -> None:
    async with serve() as (client, _):
        resp = await asyncio.wait_for(
            client.post("/mcp", data=rpc(1, "server/discover", {}), headers=POST_HEADERS), 1.0
        )
        assert resp.status == 400
        body = await resp.json()
        assert body["id"] == 1 and body["error"]["code"] == -32601


async def test_failed_initialize_keeps_no_session() -> None:
    async with serve() as (client, server):
        resp = await client.post(
            "/mcp", data=rpc(1, "initialize", {"protocolVersion": 7}), headers=POST_HEADERS
        )
        assert resp.status == 200
        assert (await resp.json())["error"]["code"] == -32602
        assert "Mcp-Session-Id" not in resp.headers
        assert server.sessions == {}


async def test_delete_ends_the_session_then_404() -> None:
    async with serve() as (client, server):
        session = await initialize(client)
        resp = await client.delete("/mcp", headers=session)
        assert resp.status == 204
        assert server.sessions == {}
        resp = await post(client, session, rpc(1, "ping"))
        assert resp.status == 404


async def test_delete_without_session_id_is_400() -> None:
    async with serve() as (client, _):
        resp = await client.delete("/mcp")
        assert resp.status == 400


async def test_delete_cancels_the_sessions_work() -> None:
    probe = Probe()
    async with serve(HttpSettings(sse_after=0.05), probe) as (client, _):
        session = await initialize(client)
        call = asyncio.ensure_future(post(client, session, rpc(1, "tools/call", _slow(30))))
        await asyncio.wait_for(probe.started.wait(), 5)
        resp = await client.delete("/mcp", headers=session)
        assert resp.status == 204
        answer = await asyncio.wait_for(call, 5)
        assert messages(await all_events(answer)) == []  # the stream ends without a response
        assert probe.cancelled


async def test_idle_sessions_are_reaped() -> None:
    async with serve(HttpSettings(session_idle_timeout=0.2)) as (client, server):
        session = await initialize(client)
        await asyncio.sleep(0.6)
        assert server.sessions == {}
        assert (await post(client, session, rpc(1, "ping"))).status == 404


async def test_max_sessions_evicts_the_least_recently_used_idle_session() -> None:
    async with serve(HttpSettings(max_sessions=2)) as (client, _):
        first = await initialize(client)
        second = await initialize(client)
        await initialize(client)
        assert (await post(client, first, rpc(1, "ping"))).status == 404
        assert (await post(client, second, rpc(1, "ping"))).status == 200


# ---------------------------------------------------------------- headers


async def test_missing_protocol_version_header_is_accepted() -> None:
    async with serve() as (client, _):
        session = await initialize(client)
        del session["MCP-Protocol-Version"]
        resp = await post(client, session, rpc(1, "ping"))
        assert resp.status == 200
        assert (await resp.json())["result"] == {}


async def test_unsupported_protocol_version_header_is_400() -> None:
    async with serve() as (client, _):
        session = await initialize(client)
        resp = await post(client, {**session, "MCP-Protocol-Version": "1999-01-01"}, rpc(1, "ping"))
        assert resp.status == 400
        assert resp.content_type == "application/json"


async def test_accept_without_event_stream_is_406() -> None:
    async with serve() as (client, _):
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        resp = await client.post("/mcp", data=init_body(), headers=headers)
        assert resp.status == 406


async def test_accept_wildcard_is_enough() -> None:
    async with serve() as (client, _):
        headers = {"Accept": "*/*", "Content-Type": "application/json"}
        resp = await client.post("/mcp", data=init_body(), headers=headers)
        assert resp.status == 200


async def test_get_without_event_stream_accept_is_406() -> None:
    async with serve() as (client, _):
        session = await initialize(client)
        resp = await client.get("/mcp", headers={**session, "Accept": "application/json"})
        assert resp.status == 406


async def test_non_json_content_type_is_415() -> None:
    async with serve() as (client, _):
        headers = {**POST_HEADERS, "Content-Type": "text/plain"}
        resp = await client.post("/mcp", data=init_body(), headers=headers)
        assert resp.status == 415


async def test_malformed_json_is_400_with_parse_error_body() -> None:
    async with serve() as (client, _):
        session = await initialize(client)
        resp = await post(client, session, b'{"jsonrpc": "2.0", "id": 1, "meth')
        assert resp.status == 400
        assert resp.content_type == "application/json"
        body = await resp.json()
        assert body["id"] is None and body["error"]["code"] == -32700


async def test_malformed_json_without_session_is_400_parse_error() -> None:
    async with serve() as (client, _):
        resp = await client.post("/mcp", data=b"{nope", headers=POST_HEADERS)
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == -32700


async def test_other_methods_are_405() -> None:
    async with serve() as (client, _):
        resp = await client.put("/mcp", data=b"{}")
        assert resp.status == 405
        assert "POST" in resp.headers["Allow"]


async def test_trailing_slash_redirects_307() -> None:
    async with serve() as (client, _):
        resp = await client.post("/mcp/", data=init_body(), headers=POST_HEADERS, allow_redirects=False)
        assert resp.status == 307
        assert resp.headers["Location"] == "/mcp"


# ---------------------------------------------------------------- answers


async def test_notification_only_body_is_202_without_body() -> None:
    async with serve() as (client, _):
        session = await initialize(client)
        resp = await post(client, session, rpc(None, "notifications/cancelled", {"requestId": 99}))
        assert resp.status == 202
        assert await resp.read() == b""


async def test_client_response_body_is_202() -> None:
    async with serve() as (client, _):
        session = await initialize(client)
        resp = await post(client, session, b'{"jsonrpc":"2.0","id":12345,"result":{}}')
        assert resp.status == 202


async def test_quick_request_is_answered_as_json() -> None:
    async with serve() as (client, _):
        session = await initialize(client)
        resp = await post(client, session, rpc(7, "tools/list"))
        assert resp.status == 200
        assert resp.content_type == "application/json"
        body = await resp.json()
        assert body["id"] == 7 and any(t["name"] == "test_simple_text" for t in body["result"]["tools"])


async def test_call_without_notifications_is_answered_as_json() -> None:
    async with serve() as (client, _):
        session = await initialize(client)
        resp = await post(client, session, rpc(1, "tools/call", {"name": "test_simple_text"}))
        assert resp.content_type == "application/json"
        assert (await resp.json())["result"]["content"][0]["type"] == "text"


async def test_progress_token_opens_sse_with_priming_event_first() -> None:
    async with serve() as (client, _):
        session = await initialize(client)
        params = {"name": "test_tool_with_progress", "_meta": {"progressToken": "p"}}
        resp = await post(client, session, rpc(3, "tools/call", params))
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        evs = await all_events(resp)
        assert evs[0].id is not None and evs[0].data == "" and evs[0].retry is not None
        msgs = messages(evs)
        assert [m["params"]["progress"] for m in msgs[:-1]] == [0, 50, 100]
        assert msgs[-1]["id"] == 3 and "result" in msgs[-1]


async def test_event_ids_name_the_stream_and_are_unique_per_session() -> None:
    async with serve() as (client, _):
        session = await initialize(client)
        ids: list[str] = []
        for rid in (1, 2):
            params = {"name": "test_tool_with_progress", "_meta": {"progressToken": rid}}
            ids += [
                e.id
                for e in await all_events(await post(client, session, rpc(rid, "tools/call", params)))
                if e.id
            ]
        assert len(ids) == len(set(ids)) == 10
        streams = {i.split(":")[0] for i in ids}
        assert len(streams) == 2
        assert all(re.fullmatch(r"[^:]+:\d+", i) for i in ids)


async def test_notifications_without_progress_token_switch_the_answer_to_sse() -> None:
    async with serve() as (client, _):
        session = await initialize(client)
        await post(client, session, rpc(1, "logging/setLevel", {"level": "info"}))
        resp = await post(client, session, rpc(2, "tools/call", {"name": "test_tool_with_logging"}))
        assert resp.content_type == "text/event-stream"
        msgs = messages(await all_events(resp))
        assert [m["method"] for m in msgs[:3]] == ["notifications/message"] * 3
        assert msgs[3]["id"] == 2


async def test_long_silent_call_switches_to_sse_after_sse_after() -> None:
    async with serve(HttpSettings(sse_after=0.05)) as (client, _):
        session = await initialize(client)
        resp = await post(client, session, rpc(1, "tools/call", _slow(0.3)))
        assert resp.content_type == "text/event-stream"
        msgs = messages(await all_events(resp))
        assert msgs == [{"jsonrpc": "2.0", "id": 1, "result": msgs[0]["result"]}]
        assert msgs[0]["result"]["content"][0]["text"] == "slept 0.3"


async def test_json_response_setting_keeps_json_and_sends_notifications_on_get_stream() -> None:
    async with serve(HttpSettings(json_response=True)) as (client, _):
        session = await initialize(client)
        get = await client.get("/mcp", headers={**session, "Accept": "text/event-stream"})
        params = {"name": "test_tool_with_progress", "_meta": {"progressToken": "t"}}
        resp = await post(client, session, rpc(1, "tools/call", params))
        assert resp.content_type == "application/json"
        assert (await resp.json())["id"] == 1
        seen = []
        async for event in events(get, limit=5):
            if event.data:
                seen.append(event.json()["params"]["progress"])
            if len(seen) == 3:
                break
        assert seen == [0, 50, 100]
        get.close()


async def test_batch_under_2025_03_26_gets_one_json_array() -> None:
    async with serve() as (client, _):
        session = await initialize(client, "2025-03-26")
        body = b"[" + rpc(1, "ping") + b"," + rpc(2, "tools/list") + b"]"
        resp = await post(client, session, body)
        assert resp.content_type == "application/json"
        assert sorted(m["id"] for m in await resp.json()) == [1, 2]


async def test_batch_under_2025_11_25_is_400_invalid_request() -> None:
    async with serve() as (client, _):
        session = await initialize(client)
        resp = await post(client, session, b"[" + rpc(1, "ping") + b"]")
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == -32600


async def test_sampling_request_travels_on_the_post_stream_and_the_answer_comes_back_by_post() -> None:
    async with serve() as (client, _):
        session = await initialize(client, capabilities={"sampling": {}})
        resp = await post(
            client, session, rpc(5, "tools/call", {"name": "test_sampling", "arguments": {"prompt": "hi"}})
        )
        assert resp.content_type == "text/event-stream"
        reader = events(resp)
        async for event in reader:
            if event.data:
                request = event.json()
                break
        assert request["method"] == "sampling/createMessage"
        answer = encode_result(
            request["id"], {"role": "assistant", "content": {"type": "text", "text": "yo"}, "model": "m"}
        )
        assert (await post(client, session, answer)).status == 202
        async for event in reader:
            if event.data:
                final = event.json()
                break
        assert final["id"] == 5 and final["result"]["content"][0]["text"] == "LLM response: yo"


# ---------------------------------------------------------------- GET stream and resumption


async def test_get_stream_primes_at_once_and_carries_unrelated_messages() -> None:
    async with serve() as (client, server):
        session = await initialize(client)
        await post(client, session, rpc(1, "resources/subscribe", {"uri": "test://watched-resource"}))
        resp = await client.get("/mcp", headers={**session, "Accept": "text/event-stream"})
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        reader = events(resp, limit=5)
        first = await anext(reader)
        assert first.comment is not None  # priming comment before any message
        await server.resource_updated("test://watched-resource")
        event = await anext(reader)
        assert event.id is not None
        assert event.json() == {
            "jsonrpc": "2.0",
            "method": "notifications/resources/updated",
            "params": {"uri": "test://watched-resource"},
        }
        resp.close()


async def test_get_stream_resumes_with_last_event_id() -> None:
    async with serve() as (client, server):
        session = await initialize(client)
        await post(client, session, rpc(1, "resources/subscribe", {"uri": "test://watched-resource"}))
        headers = {**session, "Accept": "text/event-stream"}
        resp = await client.get("/mcp", headers=headers)
        reader = events(resp, limit=5)
        await anext(reader)
        await server.resource_updated("test://watched-resource")
        first = await anext(reader)
        resp.close()
        await asyncio.sleep(0.05)
        await server.resource_updated("test://watched-resource")  # sent while nobody listens
        resumed = await client.get("/mcp", headers={**headers, "Last-Event-ID": first.id or ""})
        got = [e async for e in _take(events(resumed, limit=5), 2)]
        assert got[0].comment is not None
        assert got[1].json()["method"] == "notifications/resources/updated"
        resumed.close()


async def test_server_closes_post_stream_and_client_resumes_with_get() -> None:
    async with serve() as (client, _):
        session = await initialize(client)
        resp = await post(client, session, rpc(9, "tools/call", {"name": "test_reconnection"}))
        assert resp.content_type == "text/event-stream"
        evs = await all_events(resp)
        assert messages(evs) == []  # closed before the answer
        assert any(e.retry is not None for e in evs)
        last = [e.id for e in evs if e.id][-1]
        resumed = await client.get(
            "/mcp", headers={**session, "Accept": "text/event-stream", "Last-Event-ID": last}
        )
        msgs = messages(await all_events(resumed))
        assert msgs[0]["id"] == 9 and "Reconnection test completed" in msgs[0]["result"]["content"][0]["text"]


async def test_client_disconnect_is_not_cancellation() -> None:
    probe = Probe()
    async with serve(HttpSettings(sse_after=0.05), probe) as (client, _):
        session = await initialize(client)
        resp = await post(client, session, rpc(4, "tools/call", _slow(0.4)))
        first = await anext(events(resp))
        resp.close()  # the client goes away mid-call
        await asyncio.wait_for(probe.finished.wait(), 5)
        assert not probe.cancelled
        assert first.id is not None
        resumed = await client.get(
            "/mcp", headers={**session, "Accept": "text/event-stream", "Last-Event-ID": first.id}
        )
        assert messages(await all_events(resumed))[0]["result"]["content"][0]["text"] == "slept 0.4"


async def test_poll_after_closes_long_post_streams_with_retry() -> None:
    async with serve(HttpSettings(sse_after=0.01, poll_after=0.1, retry_ms=50)) as (client, _):
        session = await initialize(client)
        resp = await post(client, session, rpc(1, "tools/call", _slow(0.5)))
        evs = await all_events(resp)
        assert messages(evs) == [] and evs[-1].retry == 50
        resumed = await client.get(
            "/mcp", headers={**session, "Accept": "text/event-stream", "Last-Event-ID": evs[0].id or ""}
        )
        # Each resumed connection is closed again after poll_after; keep polling like a client does.
        got: list[dict[str, object]] = []
        last = evs[0].id or ""
        for _ in range(20):
            evs = await all_events(resumed)
            got += messages(evs)
            if got:
                break
            last = next((e.id for e in reversed(evs) if e.id), last)
            resumed = await client.get(
                "/mcp", headers={**session, "Accept": "text/event-stream", "Last-Event-ID": last}
            )
        assert got[0]["id"] == 1


async def test_unknown_last_event_id_is_400_and_the_session_lives_on() -> None:
    async with serve() as (client, _):
        session = await initialize(client)
        resp = await client.get(
            "/mcp", headers={**session, "Accept": "text/event-stream", "Last-Event-ID": "77:3"}
        )
        assert resp.status == 400
        assert (await post(client, session, rpc(1, "ping"))).status == 200


# ---------------------------------------------------------------- Host, Origin, auth


async def test_bad_host_alone_is_403() -> None:
    async with serve() as (client, _):
        resp = await client.post(
            "/mcp", data=init_body(), headers={**POST_HEADERS, "Host": "evil.example:80"}
        )
        assert resp.status == 403
        assert resp.content_type == "application/json"


async def test_bad_origin_alone_is_403() -> None:
    async with serve() as (client, _):
        headers = {**POST_HEADERS, "Origin": "http://evil.example.com"}
        resp = await client.post("/mcp", data=init_body(), headers=headers)
        assert resp.status == 403


async def test_loopback_and_same_origin_are_allowed() -> None:
    settings = HttpSettings(allowed_hosts=("mcp.example",))
    async with serve(settings) as (client, _):
        for origin, host in (
            ("http://localhost:6274", None),
            ("http://[::1]:9", None),
            ("https://mcp.example", "mcp.example"),
        ):
            headers = {**POST_HEADERS, "Origin": origin}
            if host:
                headers["Host"] = host
            resp = await client.post("/mcp", data=init_body(), headers=headers)
            assert resp.status == 200, origin


async def test_configured_origin_is_allowed() -> None:
    async with serve(HttpSettings(allowed_origins=("https://app.example",))) as (client, _):
        resp = await client.post(
            "/mcp", data=init_body(), headers={**POST_HEADERS, "Origin": "https://app.example"}
        )
        assert resp.status == 200


async def test_missing_bearer_token_is_401_with_challenge() -> None:
    async with serve(HttpSettings(auth_token="s3cret")) as (client, _):
        resp = await client.post("/mcp", data=init_body(), headers=POST_HEADERS)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_wrong_bearer_token_is_401() -> None:
    async with serve(HttpSettings(auth_token="s3cret")) as (client, _):
        headers = {**POST_HEADERS, "Authorization": "Bearer s3cre7"}
        resp = await client.post("/mcp", data=init_body(), headers=headers)
        assert resp.status == 401
        assert "invalid_token" in resp.headers["WWW-Authenticate"]


async def test_right_bearer_token_is_accepted() -> None:
    async with serve(HttpSettings(auth_token="s3cret")) as (client, _):
        session = await initialize(client, headers={"Authorization": "Bearer s3cret"})
        assert (await post(client, session, rpc(1, "ping"))).status == 200


async def test_sessions_are_bound_to_their_principal() -> None:
    settings = HttpSettings(auth_tokens={"alice-token": "alice", "bob-token": "bob"})
    async with serve(settings) as (client, server):
        alice = await initialize(client, headers={"Authorization": "Bearer alice-token"})
        assert [s.principal for s in server.sessions.values()] == ["alice"]
        stolen = {**alice, "Authorization": "Bearer bob-token"}
        assert (await post(client, stolen, rpc(1, "ping"))).status == 404


def test_listening_beyond_loopback_without_token_is_refused() -> None:
    with pytest.raises(HttpConfigError, match="token"):
        build_app(Server(make_registry()), HttpSettings(listen="0.0.0.0"))


async def test_wildcard_listen_with_token_accepts_remote_host_names() -> None:
    settings = HttpSettings(listen="0.0.0.0", auth_token="t")
    async with serve(settings) as (client, _):
        headers = {**POST_HEADERS, "Host": "build-box.lan:9452", "Authorization": "Bearer t"}
        assert (await client.post("/mcp", data=init_body(), headers=headers)).status == 200


async def test_specific_listen_address_accepts_only_that_host_name() -> None:
    settings = HttpSettings(listen="192.0.2.10", auth_token="t")
    async with serve(settings) as (client, _):
        auth = {**POST_HEADERS, "Authorization": "Bearer t"}
        assert (
            await client.post("/mcp", data=init_body(), headers={**auth, "Host": "192.0.2.10:9452"})
        ).status == 200
        assert (
            await client.post("/mcp", data=init_body(), headers={**auth, "Host": "other:9452"})
        ).status == 403


# ---------------------------------------------------------------- helpers


def _slow(seconds: float) -> dict[str, object]:
    return {"name": "slow", "arguments": {"seconds": seconds}}


async def _take(iterator: AsyncIterator[Event], n: int) -> AsyncIterator[Event]:
    for _ in range(n):
        yield await anext(iterator)


async def test_idle_sse_streams_get_keepalive_comments() -> None:
    async with serve(HttpSettings(keepalive=0.05)) as (client, _):
        session = await initialize(client)
        resp = await client.get("/mcp", headers={**session, "Accept": "text/event-stream"})
        got = [e async for e in _take(events(resp, limit=5), 3)]
        assert [e.comment for e in got] == ["stream open", "keepalive", "keepalive"]
        resp.close()


async def test_a_new_get_stream_replaces_the_previous_one() -> None:
    async with serve() as (client, server):
        session = await initialize(client)
        await post(client, session, rpc(1, "resources/subscribe", {"uri": "test://watched-resource"}))
        headers = {**session, "Accept": "text/event-stream"}
        old = await client.get("/mcp", headers=headers)
        new = await client.get("/mcp", headers=headers)
        assert [e.comment for e in await all_events(old)] == ["stream open"]  # ended by the newer one
        reader = events(new, limit=5)
        await anext(reader)
        await server.resource_updated("test://watched-resource")
        assert (await anext(reader)).json()["method"] == "notifications/resources/updated"
        new.close()


async def test_a_client_that_stops_reading_cannot_stall_the_session() -> None:
    async with serve(HttpSettings(write_timeout=0.2)) as (client, server):
        session = await initialize(client)
        sid = session["Mcp-Session-Id"]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", client.port))
        request = (
            f"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1:{client.port}\r\nAccept: text/event-stream\r\n"
            f"Mcp-Session-Id: {sid}\r\n\r\n"
        )
        await asyncio.get_running_loop().sock_sendall(sock, request.encode())  # …and never read
        hs = client.app[STREAMABLE_KEY].sessions[sid]
        for _ in range(100):
            if hs.get_stream is not None and hs.get_stream.live:
                break
            await asyncio.sleep(0.01)
        core = server.get_session(sid)
        assert core is not None
        big = encode_notification("notifications/message", {"level": "info", "data": "x" * 65536})
        async with asyncio.timeout(10):  # without a write timeout this blocks for good
            for _ in range(300):
                await core.send_unrelated(big)
        assert hs.get_stream is not None and not hs.get_stream.live
        assert (await post(client, session, rpc(1, "ping"))).status == 200
        sock.close()


def test_replay_buffer_is_bounded_in_events_and_bytes() -> None:
    by_count = EventStream("1", limit=3, limit_bytes=1 << 20)
    for i in range(10):
        by_count.append(b'{"n":%d}' % i)
    assert [seq for seq, _ in by_count.buffer] == [8, 9, 10]
    by_bytes = EventStream("2", limit=100, limit_bytes=2000)
    for _ in range(10):
        by_bytes.append(b"x" * 900)
    assert [seq for seq, _ in by_bytes.buffer] == [9, 10]
    huge = EventStream("3", limit=100, limit_bytes=10)
    huge.append(b"y" * 100)
    assert len(huge.buffer) == 1  # the newest event is kept whatever its size
