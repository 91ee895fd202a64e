"""RemoteBackend against a misbehaving server: retries where safe, never a duplicate spawn, no hangs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from contree import api
from contree.client import RemoteBackend, parse_retry_after
from contree.errors import BadRequest, Gone, RateLimited, Unavailable
from contree.rest import sse

OP = "11111111-2222-3333-4444-555555555555"
WHO = api.WhoAmIResponse(token_uuid="t", token_expiration=None, permissions={}, operations_stat={})
SPAWNED = api.InstanceSpawnResponse(uuid=OP, command="x", image="22222222-2222-3333-4444-555555555555")

Handler = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


@dataclass
class Script:
    """Route → handler(request, call_number); counts calls per route."""

    routes: dict[str, Handler] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    seen_headers: list[dict[str, str]] = field(default_factory=list)


def json(value: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=msgspec.json.encode(value), content_type="application/json", headers=headers
    )


def drop(request: web.Request) -> web.Response:
    assert request.transport is not None
    request.transport.close()
    return web.Response()  # never delivered


@pytest.fixture
async def faulty() -> AsyncIterator[tuple[Script, RemoteBackend]]:
    script = Script()

    async def dispatch(request: web.Request) -> web.StreamResponse:
        key = f"{request.method} {request.path}"
        script.calls[key] = script.calls.get(key, 0) + 1
        script.seen_headers.append(dict(request.headers))
        return await script.routes[key](request, script.calls[key])

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    client = RemoteBackend(str(server.make_url("")), token="tok", timeout=1.0, retries=3, backoff=0.01)
    try:
        yield script, client
    finally:
        await client.close()
        await server.close()


async def test_503_with_retry_after_is_retried_on_get(faulty: tuple[Script, RemoteBackend]) -> None:
    script, client = faulty

    async def whoami(request: web.Request, n: int) -> web.Response:
        if n < 3:
            return json(api.Error(error="busy", status=503), 503, {"Retry-After": "0"})
        return json(WHO)

    script.routes["GET /v1/whoami"] = whoami
    assert (await client.whoami()).token_uuid == "t"
    assert script.calls["GET /v1/whoami"] == 3


async def test_retry_after_is_honoured(faulty: tuple[Script, RemoteBackend]) -> None:
    script, client = faulty

    async def whoami(request: web.Request, n: int) -> web.Response:
        return json(WHO) if n > 1 else json(api.Error(error="slow down"), 429, {"Retry-After": "1"})

    script.routes["GET /v1/whoami"] = whoami
    start = time.monotonic()
    await client.whoami()
    assert time.monotonic() - start >= 0.9


async def test_retries_are_bounded_and_error_carries_server_message(
    faulty: tuple[Script, RemoteBackend],
) -> None:
    script, client = faulty

    async def whoami(request: web.Request, n: int) -> web.Response:
        body = {"error": "rate limited, try later", "status": 429, "traceback": ["secret internals"]}
        return json(body, 429, {"Retry-After": "0"})

    script.routes["GET /v1/whoami"] = whoami
    with pytest.raises(RateLimited) as info:
        await client.whoami()
    assert info.value.message == "rate limited, try later" and info.value.status == 429
    assert "secret" not in str(info.value)
    assert script.calls["GET /v1/whoami"] == 4  # first try + 3 retries


async def test_spawn_is_never_replayed_after_5xx_or_drop(faulty: tuple[Script, RemoteBackend]) -> None:
    script, client = faulty
    request = api.InstanceSpawnRequest(command="x", image=SPAWNED.image)

    async def unavailable(request: web.Request, n: int) -> web.Response:
        return json(api.Error(error="gateway timeout"), 504)

    script.routes["POST /v1/instances"] = unavailable
    with pytest.raises(Unavailable, match="gateway timeout"):
        await client.spawn(request)
    assert script.calls["POST /v1/instances"] == 1

    async def dropped(request: web.Request, n: int) -> web.Response:
        await request.read()
        return drop(request)

    script.routes["POST /v1/instances"] = dropped
    script.calls.clear()
    with pytest.raises(Unavailable, match="connection"):
        await client.spawn(request)
    assert script.calls["POST /v1/instances"] == 1


async def test_spawn_is_retried_on_429_and_425(faulty: tuple[Script, RemoteBackend]) -> None:
    script, client = faulty

    async def spawn(request: web.Request, n: int) -> web.Response:
        if n == 1:
            return json(api.Error(error="slow down"), 429, {"Retry-After": "0"})
        if n == 2:
            return json(api.Error(error="too early"), 425, {"Retry-After": "0"})
        return json(SPAWNED, 201, {"Location": f"/v1/operations/{OP}"})

    script.routes["POST /v1/instances"] = spawn
    result = await client.spawn(api.InstanceSpawnRequest(command="x", image=SPAWNED.image))
    assert result.uuid == OP and script.calls["POST /v1/instances"] == 3


async def test_stdin_write_not_retried_on_504(faulty: tuple[Script, RemoteBackend]) -> None:
    script, client = faulty
    path = f"POST /v1/operations/{OP}/subprocesses/1/stdin"

    async def stdin(request: web.Request, n: int) -> web.Response:
        return json(api.Error(error="guest write timed out"), 504)

    script.routes[path] = stdin
    with pytest.raises(Unavailable):
        await client.write_stdin(OP, 1, api.ClosableStreamRepr(value="x"))
    assert script.calls[path] == 1


async def test_dropped_connection_retried_for_idempotent_get(faulty: tuple[Script, RemoteBackend]) -> None:
    script, client = faulty

    async def whoami(request: web.Request, n: int) -> web.Response:
        return drop(request) if n == 1 else json(WHO)

    script.routes["GET /v1/whoami"] = whoami
    await client.whoami()
    assert script.calls["GET /v1/whoami"] == 2


async def test_slow_server_times_out_instead_of_hanging(faulty: tuple[Script, RemoteBackend]) -> None:
    script, client = faulty

    async def slow(request: web.Request, n: int) -> web.Response:
        await asyncio.sleep(30)
        return json(SPAWNED, 201)

    script.routes["POST /v1/instances"] = slow
    start = time.monotonic()
    with pytest.raises(Unavailable):
        await client.spawn(api.InstanceSpawnRequest(command="x", image=SPAWNED.image))
    assert time.monotonic() - start < 5
    assert script.calls["POST /v1/instances"] == 1


async def test_stalled_download_stream_times_out(faulty: tuple[Script, RemoteBackend]) -> None:
    script, client = faulty
    image = SPAWNED.image

    async def download(request: web.Request, n: int) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first chunk")
        await asyncio.sleep(30)
        return response

    script.routes[f"GET /v1/inspect/{image}/download"] = download
    received = []
    start = time.monotonic()
    with pytest.raises(Unavailable, match="stream broken"):
        async for chunk in client.download(image, "/f"):
            received.append(chunk)
    assert b"".join(received) == b"first chunk"
    assert time.monotonic() - start < 5


def frame(event_id: int, type_: api.OperationEventType, spid: int | None = 1) -> bytes:
    data: api.EventData
    if type_ == "completion":
        data = api.EventDataCompletion(status="SUCCESS", duration_ms=1)
    else:
        data = api.encode_event_stream(b"line %d\n" % event_id)
    event = api.OperationEvent.make(id=event_id, ts="2026-01-01T00:00:00Z", type=type_, data=data, spid=spid)
    return sse.event_frame(event)


async def test_event_stream_resumes_with_last_event_id(faulty: tuple[Script, RemoteBackend]) -> None:
    script, client = faulty
    last_ids: list[str | None] = []

    async def events(request: web.Request, n: int) -> web.StreamResponse:
        last_ids.append(request.headers.get("Last-Event-Id"))
        if n == 2:
            return json(api.Error(error="finalizing"), 410, {"Retry-After": "0"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if n == 1:
            await response.write(frame(0, "stdout") + frame(1, "stdout"))
            return drop(request)
        if n == 3:
            # replays event 1 (a server may resend the last id) and then fails in-band
            await response.write(
                frame(1, "stdout") + frame(2, "stdout") + sse.error_frames("upstream\nclosed")
            )
            return response
        await response.write(sse.KEEPALIVE + frame(3, "stdout") + frame(4, "completion", None))
        return response

    script.routes[f"GET /v1/operations/{OP}/events"] = events
    got = [e async for e in client.events(OP, follow=True)]
    assert [e.id for e in got] == [0, 1, 2, 3, 4]
    assert got[-1].type == "completion" and got[-1].spid is None
    assert last_ids == [None, "1", "1", "2"]


async def test_follow_stream_closed_without_completion_checks_status(
    faulty: tuple[Script, RemoteBackend],
) -> None:
    script, client = faulty

    async def events(request: web.Request, n: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if n == 1:
            assert request.query.get("follow") == "1"
            await response.write(frame(5, "stdout"))
        else:
            assert "follow" not in request.query and request.headers["Last-Event-Id"] == "5"
            await response.write(frame(6, "stdout"))
        return response

    async def status(request: web.Request, n: int) -> web.Response:
        return json(api.OperationResponse(uuid=OP, kind="instance", status="SUCCESS"))

    script.routes[f"GET /v1/operations/{OP}/events"] = events
    script.routes[f"GET /v1/operations/{OP}"] = status
    got = [e.id async for e in client.events(OP, follow=True, spid=1)]
    assert got == [5, 6]


async def test_gone_on_events_gives_up_after_retries(faulty: tuple[Script, RemoteBackend]) -> None:
    script, client = faulty

    async def events(request: web.Request, n: int) -> web.Response:
        return json(api.Error(error="not durable yet"), 410, {"Retry-After": "0"})

    script.routes[f"GET /v1/operations/{OP}/events"] = events
    with pytest.raises(Gone):
        _ = [e async for e in client.events(OP)]
    assert script.calls[f"GET /v1/operations/{OP}/events"] == 4


async def test_auth_headers_per_style(faulty: tuple[Script, RemoteBackend]) -> None:
    script, client = faulty

    async def whoami(request: web.Request, n: int) -> web.Response:
        return json(WHO)

    script.routes["GET /v1/whoami"] = whoami
    await client.whoami()
    assert script.seen_headers[-1]["Authorization"] == "Bearer tok"
    assert "Project" not in script.seen_headers[-1]
    assert script.seen_headers[-1]["User-Agent"].startswith("contree-mcp/")
    iam = RemoteBackend(client.base, token="iam-tok", project="proj-1", auth_type="iam")
    try:
        await iam.whoami()
    finally:
        await iam.close()
    assert script.seen_headers[-1]["Authorization"] == "Bearer iam-tok"
    assert script.seen_headers[-1]["Project"] == "proj-1"
    assert "iam-tok" not in repr(iam)


async def test_bad_request_is_not_retried(faulty: tuple[Script, RemoteBackend]) -> None:
    script, client = faulty

    async def whoami(request: web.Request, n: int) -> web.Response:
        return web.Response(status=400, text="plain text problem")

    script.routes["GET /v1/whoami"] = whoami
    with pytest.raises(BadRequest, match="plain text problem"):
        await client.whoami()
    assert script.calls["GET /v1/whoami"] == 1


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="project"):
        RemoteBackend("https://x", token="t", auth_type="iam")
    with pytest.raises(ValueError, match="http"):
        RemoteBackend("ftp://x", token="t")
    assert RemoteBackend("https://x/v1/", token="t").base == "https://x/v1"


async def test_timed_out_get_is_retried_once_only(faulty: tuple[Script, RemoteBackend]) -> None:
    script, client = faulty

    async def slow(request: web.Request, n: int) -> web.Response:
        await asyncio.sleep(30)
        return json(WHO)

    script.routes["GET /v1/whoami"] = slow
    start = time.monotonic()
    with pytest.raises(Unavailable):
        await client.whoami()
    assert script.calls["GET /v1/whoami"] == 2
    assert time.monotonic() - start < 5


def quiet_follow_routes(script: Script, running_for: int) -> None:
    async def events(request: web.Request, n: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse.KEEPALIVE)
        return response  # closes cleanly without any event

    async def status(request: web.Request, n: int) -> web.Response:
        state: api.OperationStatus = "EXECUTING" if n <= running_for else "SUCCESS"
        return json(api.OperationResponse(uuid=OP, kind="instance", status=state))

    script.routes[f"GET /v1/operations/{OP}/events"] = events
    script.routes[f"GET /v1/operations/{OP}"] = status


async def test_follow_gives_up_on_a_server_that_keeps_closing_at_once(
    faulty: tuple[Script, RemoteBackend],
) -> None:
    script, client = faulty
    quiet_follow_routes(script, running_for=1000)
    with pytest.raises(Unavailable, match="keeps failing"):
        _ = [e async for e in client.events(OP, follow=True)]
    assert script.calls[f"GET /v1/operations/{OP}/events"] == 4  # first + 3 retries


async def test_follow_survives_long_streams_cut_by_a_proxy(
    faulty: tuple[Script, RemoteBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    script, client = faulty
    monkeypatch.setattr("contree.client_events.HEALTHY_STREAM_SECONDS", 0.0)  # every stream counts as long
    quiet_follow_routes(script, running_for=8)
    assert [e async for e in client.events(OP, follow=True)] == []
    assert script.calls[f"GET /v1/operations/{OP}/events"] == 10  # first, 8 reconnects, final drain


async def test_body_cut_mid_way_is_reread_for_idempotent_get(faulty: tuple[Script, RemoteBackend]) -> None:
    script, client = faulty

    async def whoami(request: web.Request, n: int) -> web.StreamResponse:
        if n > 1:
            return json(WHO)
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "500"})
        await response.prepare(request)
        await response.write(b'{"token_uuid": "t", ')
        return drop(request)

    script.routes["GET /v1/whoami"] = whoami
    assert (await client.whoami()).token_uuid == "t"
    assert script.calls["GET /v1/whoami"] == 2
