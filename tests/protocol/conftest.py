"""Shared helpers for the protocol tests: an in-memory harness around one ServerSession."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import msgspec
import pytest

from protocol.registry import Registry, RequestContext
from protocol.server import Server, ServerSession
from protocol.testing.conformance import build_registry
from protocol.types import Outgoing


class Harness:
    """Feeds frames to one session and collects everything it sends back (decoded)."""

    def __init__(self, registry: Registry | None = None, *, page_size: int = 100) -> None:
        self.server = Server(registry or build_registry(), page_size=page_size)
        self.session: ServerSession = self.server.create_session(transport="test")
        self.sent: list[bytes] = []
        self._ids = itertools.count(1)

    async def sink(self, message: Outgoing) -> None:
        assert b"\n" not in message.data, "messages must be single-line JSON"
        self.sent.append(message.data)

    async def send(self, message: Any) -> list[Any]:
        """One frame (an object, a list, or raw bytes); returns the messages it caused, decoded."""
        data = message if isinstance(message, bytes) else msgspec.json.encode(message)
        mine: list[bytes] = []

        async def sink(out: Outgoing) -> None:
            await self.sink(out)
            mine.append(out.data)

        await self.session.handle(data, sink)
        return [msgspec.json.decode(b) for b in mine]

    async def request(
        self, method: str, params: dict[str, Any] | None = None, **extra: Any
    ) -> dict[str, Any]:
        """A request; returns its response (asserting exactly one response among the messages)."""
        rid = extra.pop("id", next(self._ids))
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        out = await self.send(msg)
        responses = [m for m in out if "method" not in m]
        assert len(responses) == 1, out
        assert responses[0]["id"] == rid
        return responses[0]  # type: ignore[no-any-return]

    async def result(self, method: str, params: dict[str, Any] | None = None) -> Any:
        response = await self.request(method, params)
        assert "result" in response, response
        return response["result"]

    async def initialize(
        self, version: str = "2025-11-25", capabilities: dict[str, Any] | None = None
    ) -> Any:
        result = await self.result(
            "initialize",
            {
                "protocolVersion": version,
                "capabilities": capabilities or {},
                "clientInfo": {"name": "pytest", "version": "1"},
            },
        )
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return result


def error_code(response: dict[str, Any]) -> int:
    assert "error" in response, response
    return response["error"]["code"]  # type: ignore[no-any-return]


async def gated_tool(name: str) -> tuple[Harness, asyncio.Event]:
    """An initialized harness whose only tool `name` waits for the returned event, then answers 1."""
    registry = Registry("t", "1")
    release = asyncio.Event()

    @registry.tool(name, description="waits")
    async def wait(ctx: RequestContext) -> int:
        await release.wait()
        return 1

    h = Harness(registry)
    await h.initialize()
    return h, release


async def sleeping_tool() -> tuple[Harness, asyncio.Event, asyncio.Event]:
    """An initialized harness whose tool `slow` sleeps 30 s; the events say it started and it stopped."""
    registry = Registry("t", "1")
    started, stopped = asyncio.Event(), asyncio.Event()

    @registry.tool("slow", description="sleeps")
    async def slow(ctx: RequestContext) -> int:
        started.set()
        try:
            await asyncio.sleep(30)
        finally:
            stopped.set()
        return 1

    h = Harness(registry)
    await h.initialize()
    return h, started, stopped


@pytest.fixture
def harness() -> Harness:
    return Harness()


@pytest.fixture
async def ready() -> Harness:
    h = Harness()
    await h.initialize()
    return h
