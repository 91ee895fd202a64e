"""Issue 17 item 9 at the REST API on the embedded engine: NUL bytes in what becomes a command line and
numbers no store can hold are a 400 naming the field, and nothing runs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from contree.rest import build_app
from tests.contract.conftest import busybox_tree, local_engine

__all__ = ["busybox_tree"]  # the session fixture, re-exported for this module

TOKEN = "validation-token"


@pytest.fixture
async def api_url(tmp_path: Path, busybox_tree: Path) -> AsyncIterator[str]:
    engine = await local_engine(tmp_path / "home", busybox_tree)
    server = TestServer(build_app(engine, token=TOKEN), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/v1"))
    finally:
        await server.close()
        await engine.close()


async def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(url, data=json.dumps(body)) as response:
            return response.status, await response.json()


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"command": "echo a\u0000b; echo after", "shell": True}, "command"),
        ({"command": "/bin/echo", "args": ["a\u0000b"]}, "args[0]"),
        ({"env": {"SECRET": "hunter2\u0000"}}, "environment variable SECRET"),
        ({"env": {"A\u0000B": "x"}}, "environment variable name"),
        ({"resources_limits": {"max_layer_bytes": 2**80}}, "resources_limits.max_layer_bytes"),
        ({"timeout": 2**80}, "timeout"),
    ],
)
async def test_spawn_refuses_what_would_be_cut_or_overflow(
    api_url: str, extra: dict[str, Any], field: str
) -> None:
    body = {"command": "true", "image": "tag:busybox:latest", **extra}
    status, error = await post(f"{api_url}/instances", body)
    assert status == 400 and error["error"].startswith(field), error
    assert "hunter2" not in error["error"]  # an env value is never echoed
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{api_url}/operations") as response:
            assert await response.json() == []
