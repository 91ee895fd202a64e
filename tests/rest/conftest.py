from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from contree.client import RemoteBackend
from contree.rest import build_app
from tests.fake_backend import FakeBackend

TOKEN = "test-token-123"


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
async def server(fake: FakeBackend) -> AsyncIterator[TestServer]:
    srv = TestServer(build_app(fake, token=TOKEN, keepalive=0.2), host="127.0.0.1")
    await srv.start_server()
    try:
        yield srv
    finally:
        await srv.close()


@pytest.fixture
def base_url(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[RemoteBackend]:
    backend = RemoteBackend(base_url, token=TOKEN, timeout=10, backoff=0.01)
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def http(base_url: str) -> AsyncIterator[aiohttp.ClientSession]:
    """A raw session with the token, for checking statuses and headers the client hides."""
    async with aiohttp.ClientSession(
        base_url=base_url, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as session:
        yield session
