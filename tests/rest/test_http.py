"""The REST server's HTTP surface: statuses, headers, bodies and SSE framing as the spec states."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from contree import api
from contree.client import RemoteBackend
from contree.rest import build_app
from contree.rest.sse import SseParser
from tests.fake_backend import FakeBackend
from tests.rest.conftest import TOKEN

SPAWN = {"command": "echo hi", "image": "tag:busybox:latest"}


async def error_of(response: aiohttp.ClientResponse) -> api.Error:
    assert response.content_type == "application/json"
    error = msgspec.json.decode(await response.read(), type=api.Error)
    assert error.status == response.status and error.traceback is None
    return error


async def test_auth_required_both_styles(base_url: str) -> None:
    async with aiohttp.ClientSession(base_url=base_url) as anon:
        async with anon.get("/v1/whoami") as r:
            assert r.status == 401
            assert "token" in (await error_of(r)).message()
        async with anon.get("/v1/whoami", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with anon.get("/v1/whoami", headers={"Authorization": f"Basic {TOKEN}"}) as r:
            assert r.status == 401
        # JWT style: bearer only.
        async with anon.get("/v1/whoami", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200
        # IAM style: bearer + Project.
        headers = {"Authorization": f"Bearer {TOKEN}", "Project": "project-e00x"}
        async with anon.get("/v1/whoami", headers=headers) as r:
            assert r.status == 200


async def test_spawn_201_location_and_unknown_fields(http: aiohttp.ClientSession, fake: FakeBackend) -> None:
    async with http.post("/v1/instances", json=SPAWN) as r:
        assert r.status == 201
        body = await r.json()
        assert r.headers["Location"] == f"/v1/operations/{body['uuid']}"
        assert body["image"] == fake.busybox and body["result"] is None
        assert "stdin" not in body and "timeout" not in body  # absent, never null (not nullable)
    async with http.post("/v1/instances", json={**SPAWN, "bogus": 1}) as r:
        assert r.status == 400
        assert "bogus" in (await error_of(r)).message()
    async with http.post("/v1/instances", json={"command": "x"}) as r:
        assert r.status == 400 and "image" in (await error_of(r)).message()
    async with http.post(
        "/v1/instances", data=b"{not json", headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 400
    async with http.post("/v1/instances", json={**SPAWN, "cwd": "relative"}) as r:
        assert r.status == 400
    async with http.post("/v1/instances", json={**SPAWN, "truncate_output_at": 10485761}) as r:
        assert r.status == 400
    assert len(fake.spawned) == 1


async def test_operation_status_retry_after_and_cancel(
    http: aiohttp.ClientSession, fake: FakeBackend
) -> None:
    fake.hold.clear()
    async with http.post("/v1/instances", json=SPAWN) as r:
        op = (await r.json())["uuid"]
    async with http.get(f"/v1/operations/{op}", params={"inflight": ""}) as r:
        assert r.status == 200 and int(r.headers["Retry-After"]) >= 1
        assert (await r.json())["status"] == "EXECUTING"
    async with http.get(f"/v1/operations/{op}", params={"inflight": "maybe"}) as r:
        assert r.status == 400
    async with http.delete(f"/v1/operations/{op}") as r:
        assert r.status == 202
    async with http.delete(f"/v1/operations/{op}") as r:
        assert r.status == 409
        await error_of(r)
    async with http.get("/v1/operations/not-a-uuid") as r:
        assert r.status == 400
    async with http.get("/v1/operations/11111111-2222-3333-4444-555555555555") as r:
        assert r.status == 404
        assert "not found" in (await error_of(r)).message()
    async with http.get("/v1/operations", params={"status": "cancelled"}) as r:
        assert r.status == 200
        assert [o["uuid"] for o in await r.json()] == [op]  # bare array, lowercase accepted
    fake.hold.set()


@pytest.mark.parametrize(
    "query",
    [
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "x"},
        {"offset": "-1"},
        {"status": "RUNNING"},
        {"kind": "vm"},
    ],
)
async def test_list_parameter_validation(http: aiohttp.ClientSession, query: dict[str, str]) -> None:
    async with http.get("/v1/operations", params=query) as r:
        assert r.status == 400
        await error_of(r)


async def test_images_flags_and_tags(http: aiohttp.ClientSession, fake: FakeBackend) -> None:
    untagged = fake.add_image(None, {})
    async with http.get("/v1/images?tagged") as r:
        assert [i["uuid"] for i in (await r.json())["images"]] == [fake.busybox]
    async with http.get("/v1/images?tagged=0") as r:
        assert len((await r.json())["images"]) == 2
    async with http.get("/v1/images", params={"limit": "1000", "offset": "0", "kind": "1", "junk": "x"}) as r:
        assert r.status == 200  # unknown parameters are ignored
    async with http.patch(f"/v1/images/{untagged}/tag", json={"tag": "mine:1"}) as r:
        assert r.status == 200 and (await r.json())["tag"] == "mine:1"
    async with http.patch(f"/v1/images/{untagged}/tag", json={}) as r:
        assert r.status == 400
    async with http.delete(f"/v1/images/{untagged}/tag", params={"tag": "mine:1"}) as r:
        assert r.status == 204 and await r.read() == b""
    async with http.delete("/v1/images/garbage/tag") as r:
        assert r.status == 404


async def test_import_201_location(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/images/import", json={"registry": {"url": "docker://busybox"}}) as r:
        assert r.status == 201
        op = (await r.json())["uuid"]
        assert r.headers["Location"] == f"/v1/operations/{op}"


async def test_inspect_redirects(http: aiohttp.ClientSession, fake: FakeBackend) -> None:
    async with http.get("/v1/inspect", allow_redirects=False) as r:
        assert r.status == 307 and r.headers["Location"] == "/v1/inspect/"
    async with http.get(f"/v1/inspect/{fake.busybox}", allow_redirects=False) as r:
        assert r.status == 307 and r.headers["Location"] == f"/v1/inspect/{fake.busybox}/"
    async with http.get("/v1/inspect/", params={"tag": "busybox:latest"}, allow_redirects=False) as r:
        assert r.status == 302 and r.headers["Location"] == f"/v1/inspect/{fake.busybox}/"
    async with http.get("/v1/inspect/", params={"tag": "busybox:latest"}) as r:
        assert r.status == 200 and (await r.json())["uuid"] == fake.busybox
    async with http.get("/v1/inspect/", params={"tag": "nope"}, allow_redirects=False) as r:
        assert r.status == 404
    async with http.get("/v1/inspect/", allow_redirects=False) as r:
        assert r.status == 400


async def test_inspect_download_archive_head(http: aiohttp.ClientSession, fake: FakeBackend) -> None:
    base = f"/v1/inspect/{fake.busybox}"
    async with http.get(f"{base}/download", params={"path": "/etc/hosts"}) as r:
        assert r.status == 200 and r.content_type == "application/octet-stream"
        assert await r.read() == b"127.0.0.1 localhost\n"
    async with http.get(f"{base}/download?path=/etc/hosts&text") as r:
        assert r.content_type == "text/plain"
    async with http.get(f"{base}/download", params={"path": "/etc"}) as r:
        assert r.status == 422
        await error_of(r)
    async with http.get(f"{base}/download") as r:
        assert r.status == 400
    async with http.head(f"{base}/download", params={"path": "/etc/hosts"}) as r:
        assert r.status == 200
    async with http.head(f"{base}/download", params={"path": "/nope"}) as r:
        assert r.status == 404
    async with http.get(f"{base}/archive", params={"path": "/etc/hosts"}) as r:
        assert r.status == 200 and r.content_type == "application/x-tar"
        assert r.headers["Content-Disposition"] == 'attachment; filename="etc_hosts.tar"'
    async with http.head(f"{base}/archive", params={"path": "/etc"}) as r:
        assert r.status == 200
    async with http.get(f"{base}/list", params={"path": "/", "text": "1"}) as r:
        assert r.content_type == "text/plain" and (await r.text()).startswith("total")
    async with http.get(f"{base}/list", params={"path": "/etc/hosts"}) as r:
        assert r.status == 422


async def test_grep_parameters(http: aiohttp.ClientSession, fake: FakeBackend) -> None:
    url = f"/v1/inspect/{fake.busybox}/grep"
    async with http.get(url, params=[("pattern", "local"), ("path", "/etc")]) as r:
        body = await r.json()
        assert r.status == 200 and body["matches"][0]["path"] == "/etc/hosts"
    for bad in (
        [],
        [("pattern", "x")] * 17,
        [("pattern", "x"), ("before", "51")],
        [("pattern", "x"), ("case", "up")],
    ):
        async with http.get(url, params=bad) as r:
            assert r.status == 400, bad


async def test_files_head_and_get(http: aiohttp.ClientSession) -> None:
    async with http.post("/v1/files", data=b"abc", headers={"Content-Type": "application/octet-stream"}) as r:
        assert r.status == 201
        sha = (await r.json())["sha256"]
    async with http.head(f"/v1/files/{sha}") as r:
        assert r.status == 200
    async with http.head(f"/v1/files/{'0' * 64}") as r:
        assert r.status == 404
    async with http.get(f"/v1/files/{sha}") as r:
        assert set(await r.json()) == {"uuid", "sha256", "size", "created_at", "updated_at"}


async def test_subprocess_routes(http: aiohttp.ClientSession, fake: FakeBackend) -> None:
    fake.hold.clear()
    async with http.post("/v1/instances", json=SPAWN) as r:
        op = (await r.json())["uuid"]
    async with http.post(f"/v1/operations/{op}/subprocesses", json={"command": "ls"}) as r:
        assert r.status == 201 and (await r.json()) == {"spid": 2}
        assert r.headers["Location"] == f"/v1/operations/{op}/subprocesses/2"
    async with http.post(f"/v1/operations/{op}/subprocesses", json={"command": "ls", "image": "x"}) as r:
        assert r.status == 400  # VM-level fields are rejected on ExecSpec
    async with http.delete(f"/v1/operations/{op}/subprocesses/2", params={"signal": "SIGTERM"}) as r:
        assert r.status == 204
    async with http.delete(f"/v1/operations/{op}/subprocesses/2", params={"signal": "SIGBOGUS"}) as r:
        assert r.status == 400
    async with http.get(f"/v1/operations/{op}/subprocesses/0") as r:
        assert r.status == 400
    stdin = f"/v1/operations/{op}/subprocesses/1/stdin"
    async with http.post(stdin, json={"value": "!!", "encoding": "base64"}) as r:
        assert r.status == 400
    async with http.post(stdin, json={"value": "hi\n", "close": False}) as r:
        assert r.status == 204
    fake.hold.set()


async def read_frames(response: aiohttp.ClientResponse) -> list[tuple[str, str | None, str]]:
    parser = SseParser()
    frames = []
    async for chunk in response.content.iter_any():
        frames += [(f.event, f.id, f.data) for f in parser.feed(chunk)]
    return frames


async def test_sse_frames_since_and_last_event_id(http: aiohttp.ClientSession, fake: FakeBackend) -> None:
    async with http.post("/v1/instances", json=SPAWN) as r:
        op = (await r.json())["uuid"]
    await asyncio.sleep(0.05)
    async with http.get(f"/v1/operations/{op}/events") as r:
        assert r.status == 200
        assert r.content_type == "text/event-stream" and r.headers["Cache-Control"] == "no-cache"
        frames = await read_frames(r)
    assert [f[0] for f in frames] == ["init", "spawn", "stdout", "exit", "completion"]
    for event, ident, data in frames:
        decoded = msgspec.json.decode(data, type=api.OperationEvent)
        assert decoded.type == event and str(decoded.id) == ident
    async with http.get(f"/v1/operations/{op}/events", params={"since": "2"}) as r:
        assert [f[1] for f in await read_frames(r)] == ["3", "4"]
    async with http.get(
        f"/v1/operations/{op}/events", params={"since": "0"}, headers={"Last-Event-Id": "3"}
    ) as r:
        assert [f[1] for f in await read_frames(r)] == ["4"]
    async with http.get(f"/v1/operations/{op}/events", params={"spid": "1"}) as r:
        assert [f[0] for f in await read_frames(r)] == ["spawn", "stdout", "exit"]
    async with http.get(f"/v1/operations/{op}/events", params={"since": "x"}) as r:
        assert r.status == 400
    async with http.get(f"/v1/operations/{op}/events", headers={"Last-Event-Id": "-1"}) as r:
        assert r.status == 400
    async with http.get("/v1/operations/11111111-2222-3333-4444-555555555555/events") as r:
        assert r.status == 404


async def test_sse_follow_keepalive_then_events(http: aiohttp.ClientSession, fake: FakeBackend) -> None:
    fake.hold.clear()
    async with http.post("/v1/instances", json=SPAWN) as r:
        op = (await r.json())["uuid"]
    async with http.get(f"/v1/operations/{op}/events", params={"follow": "1", "since": "1"}) as r:
        assert r.status == 200  # headers come although no event is available yet
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
        assert first == b": keepalive\n\n"
        fake.hold.set()
        frames = await asyncio.wait_for(read_frames(r), 5)
    assert [f[0] for f in frames] == ["stdout", "exit", "completion"]


async def test_sse_record_follows_completion_when_asked(
    http: aiohttp.ClientSession, client: RemoteBackend, fake: FakeBackend
) -> None:
    """`record=1` (beyond the API, what the engine service's clients ask for): a stream that ended with
    `completion` carries the operation's record after it, as an `operation` frame without an id; a stream
    that ends otherwise (a spid filter) or was not asked for it does not."""
    async with http.post("/v1/instances", json=SPAWN) as r:
        op = (await r.json())["uuid"]
    await asyncio.sleep(0.05)
    async with http.get(f"/v1/operations/{op}/events", params={"follow": "1", "record": "1"}) as r:
        frames = await read_frames(r)
    assert [f[0] for f in frames] == ["init", "spawn", "stdout", "exit", "completion", "operation"]
    assert frames[-1][1] is None
    record = msgspec.json.decode(frames[-1][2], type=api.OperationResponse)
    assert record == await client.get_operation(op) and record.status == "SUCCESS"
    async with http.get(f"/v1/operations/{op}/events", params={"spid": "1", "record": "1"}) as r:
        assert [f[0] for f in await read_frames(r)] == ["spawn", "stdout", "exit"]
    async with http.get(f"/v1/operations/{op}/events", params={"follow": "1"}) as r:
        assert [f[0] for f in await read_frames(r)][-1] == "completion"
    # the client's follower yields the record last, once, also when it starts after some events
    seen = [e async for e in client._follow_events(op, follow=True, spid=None, since=1, record=True)]
    assert [getattr(e, "type", None) for e in seen] == ["stdout", "exit", "completion", None]
    assert seen[-1] == record


async def test_a_followed_stream_read_to_its_end_leaves_its_connection_open(
    http: aiohttp.ClientSession, client: RemoteBackend, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower that stops at the record (or at `completion`) still reads the stream's end, so the next
    request reuses the connection instead of opening one (the engine service's runs: one connection),
    also when the end comes a little after the last event."""
    events = fake.events

    async def late_end(*args: Any, **kwargs: Any) -> AsyncIterator[api.OperationEvent]:
        async for event in events(*args, **kwargs):
            yield event
        await asyncio.sleep(0.05)

    monkeypatch.setattr(fake, "events", late_end)
    opened = []
    create = aiohttp.TCPConnector._create_connection

    async def counted(self: aiohttp.TCPConnector, *args: Any, **kwargs: Any) -> Any:
        opened.append(1)
        return await create(self, *args, **kwargs)

    monkeypatch.setattr(aiohttp.TCPConnector, "_create_connection", counted)
    async with http.post("/v1/instances", json=SPAWN) as r:
        op = (await r.json())["uuid"]
    await asyncio.sleep(0.05)
    await client.get_operation(op)
    opened.clear()  # the client's connection is open now
    for record in (True, False):
        stream = client._follow_events(op, follow=True, spid=None, since=None, record=record)
        async for event in stream:
            if isinstance(event, api.OperationResponse) or (not record and event.type == "completion"):
                break
        await stream.aclose()  # what the loop's finaliser does for a dropped generator
        await client.get_operation(op)
    assert opened == []


async def test_sse_quiet_follower_ends_once_its_client_is_gone(
    fake: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower of an operation that writes nothing: the first keepalive after its client left ends the
    stream (and closes the backend's event iterator), not the operation's next event. Served as the
    engine service and serve-api serve (aiohttp does not cancel a handler whose client left; the test
    server would)."""
    closed = asyncio.Event()
    events = fake.events

    async def watched(*args: Any, **kwargs: Any) -> AsyncIterator[api.OperationEvent]:
        try:
            async for event in events(*args, **kwargs):
                yield event
        finally:
            closed.set()

    monkeypatch.setattr(fake, "events", watched)
    runner = web.AppRunner(build_app(fake, token=TOKEN, keepalive=0.2), access_log=None)
    await runner.setup()
    fake.hold.clear()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}", headers=headers) as http:
            async with http.post("/v1/instances", json=SPAWN) as r:
                op = (await r.json())["uuid"]
            async with http.get(f"/v1/operations/{op}/events", params={"follow": "1", "since": "1"}) as r:
                assert await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5) == b": keepalive\n\n"
                r.close()  # the client leaves while the operation still runs
            await asyncio.wait_for(closed.wait(), 5)  # keepalive=0.2 s
        assert fake.ops[op].status not in api.TERMINAL_STATUSES
    finally:
        fake.hold.set()
        await runner.cleanup()


async def test_sse_too_early_keeps_its_status(http: aiohttp.ClientSession, fake: FakeBackend) -> None:
    async with http.post("/v1/instances", json=SPAWN) as r:
        op = (await r.json())["uuid"]
    fake.too_early.add(op)
    async with http.get(f"/v1/operations/{op}/events") as r:
        assert r.status == 425 and r.headers["Retry-After"] == "0"


async def test_unknown_route_has_error_body(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/nope") as r:
        assert r.status == 404
        await error_of(r)
    async with http.put("/v1/images") as r:
        assert r.status == 405
        assert {m.strip() for m in r.headers["Allow"].split(",")} == {"GET", "HEAD"}
        await error_of(r)
    async with http.post("/v1/operations/00000000-0000-4000-8000-000000000000") as r:
        assert r.status == 405
        assert {m.strip() for m in r.headers["Allow"].split(",")} == {"GET", "HEAD", "DELETE"}


async def test_an_empty_path_is_named_empty_not_missing(http: aiohttp.ClientSession) -> None:
    uuid = "00000000-0000-4000-8000-000000000000"
    for endpoint in ("list", "download", "archive"):
        async with http.get(f"/v1/inspect/{uuid}/{endpoint}", params={"path": ""}) as r:
            assert r.status == 400 and (await error_of(r)).message() == "path must not be empty", endpoint
        async with http.get(f"/v1/inspect/{uuid}/{endpoint}") as r:
            assert r.status == 400
            assert (await error_of(r)).message() == "missing required query parameter: path", endpoint


async def test_too_early_without_a_backend_delay_still_has_retry_after(
    http: aiohttp.ClientSession, fake: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from contree.errors import TooEarly

    async def not_ready(operation_id: str, spid: int) -> api.InstanceResult:
        raise TooEarly("no worker holds the operation yet")

    monkeypatch.setattr(fake, "get_subprocess", not_ready)
    async with http.get("/v1/operations/11111111-2222-3333-4444-555555555555/subprocesses/1") as r:
        assert r.status == 425 and r.headers["Retry-After"] == "1"
        assert (await error_of(r)).message() == "no worker holds the operation yet"
