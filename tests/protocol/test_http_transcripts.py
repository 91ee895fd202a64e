"""The golden protocol transcripts (fixtures/transcripts) replayed over Streamable HTTP.

Each client frame becomes one POST (a 2026-07-28 frame with the headers that mirror its body); JSON
bodies, SSE events and HTTP-level JSON-RPC errors are fed back to the replayer in arrival order, so the
same expectations hold as over stdio.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from protocol.http_app import build_app
from protocol.http_guard import HttpSettings
from protocol.server import Server
from protocol.testing import transcript as t
from protocol.testing.conformance import build_registry
from tests.protocol.httpkit import POST_HEADERS, REPO, events

# lifecycle.jsonl sends ping and tools/list before `initialize`: over HTTP such requests have no session
# to go to and the transport answers 400 (test_http.py pins those rules); stdio replays it.
STDIO_ONLY = {"lifecycle"}
TRANSCRIPTS = [
    p
    for p in sorted((REPO / "fixtures" / "transcripts").glob("*.jsonl"))
    if "protocol.testing.conformance" in t.load(p).argv and p.stem not in STDIO_ONLY
]


class HttpTransport:
    """TranscriptTransport over Streamable HTTP: one POST per frame, answers queued as they arrive."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client
        self.headers: dict[str, str] = {}
        self.frames: asyncio.Queue[Any] = asyncio.Queue()
        self.readers: set[asyncio.Task[None]] = set()

    async def send(self, data: bytes) -> None:
        # Returns once the server has taken the frame (headers back), so the next frame cannot overtake it.
        headers = {**POST_HEADERS, **self.headers, **stateless_headers(data)}
        resp = await self.client.post("/mcp", data=data, headers=headers)
        session = resp.headers.get("Mcp-Session-Id")
        if session and "Mcp-Session-Id" not in self.headers:
            self.headers["Mcp-Session-Id"] = session
        if resp.content_type == "text/event-stream":
            task = asyncio.ensure_future(self._pump(resp))
            self.readers.add(task)
            task.add_done_callback(self.readers.discard)
            return
        body = await resp.read()
        if body:
            assert resp.content_type == "application/json", (resp.status, body)
            await self.frames.put(msgspec.json.decode(body))

    async def _pump(self, resp: ClientResponse) -> None:
        async for event in events(resp, limit=30):
            if event.data:
                await self.frames.put(event.json())

    async def receive(self, wait: float) -> Any:
        return await asyncio.wait_for(self.frames.get(), wait)

    async def close(self) -> None:
        for task in list(self.readers):
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)


def stateless_headers(data: bytes) -> dict[str, str]:
    """What a 2026-07-28 client adds to a POST: the headers mirroring the body (SEP-2243)."""
    try:
        message = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return {}
    params = message.get("params") if isinstance(message, dict) else None
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict) or "io.modelcontextprotocol/protocolVersion" not in meta:
        return {}
    headers = {"MCP-Protocol-Version": str(meta["io.modelcontextprotocol/protocolVersion"])}
    if "id" in message:
        headers["Mcp-Method"] = message["method"]
        name = params.get(
            {"resources/read": "uri"}.get(message["method"], "taskId" if "taskId" in params else "name")
        )
        if isinstance(name, str):
            headers["Mcp-Name"] = name
    return headers


def _page_size(argv: list[str]) -> int:
    return int(argv[argv.index("--page-size") + 1]) if "--page-size" in argv else 100


def test_transcripts_exist() -> None:
    assert len(TRANSCRIPTS) >= 10


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
async def test_replay_over_streamable_http(path: Path) -> None:
    transcript = t.load(path)
    server = Server(build_registry(), page_size=_page_size(transcript.argv))
    app = build_app(server, HttpSettings(sse_after=0.05))
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        transport = HttpTransport(client)
        try:
            await t.replay(transcript, transport)
            with pytest.raises(TimeoutError):
                extra = await transport.receive(0.2)
                raise AssertionError(f"unexpected message after the last step: {extra}")
        finally:
            await transport.close()
    await server.close()


async def test_http_replay_detects_a_wrong_expectation(tmp_path: Path) -> None:
    path = tmp_path / "wrong.jsonl"
    init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "x", "version": "1"}}
    path.write_text(
        t.dump(
            [
                {"meta": {"description": "x", "argv": ["{python}", "-m", "protocol.testing.conformance"]}},
                {"send": {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init}},
                {"send": {"jsonrpc": "2.0", "id": 1, "method": "ping"}},
                {"expect": [{"jsonrpc": "2.0", "id": 1, "result": {}}]},
            ]
        )
    )
    server = Server(build_registry())
    async with TestClient(TestServer(build_app(server), host="127.0.0.1")) as client:
        transport = HttpTransport(client)
        with pytest.raises(t.TranscriptMismatch, match="mismatch"):
            await t.replay(t.load(path), transport)  # the initialize answer arrives first
        await transport.close()
    await server.close()
