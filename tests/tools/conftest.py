"""Fixtures for driving `contree-mcp` through the official Python SDK client (mcp==1.30.0) on the
embedded engine: each test gets an engine home with `busybox:latest` bootstrapped into it."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests import prereqs
from tests.netutil import server_process
from tests.service_util import stop_service

BUSYBOX_TAG = "busybox:latest"


def require_engine_host() -> None:
    prereqs.require_engine_host("the MCP tool tests run the embedded engine and need root")


def seed_busybox(home: Path) -> str:
    """Bootstrap busybox:latest into an engine home with the real subcommand; returns its UUID."""
    import subprocess

    out = subprocess.run(
        [*server_command(), "images", "bootstrap", "--home", str(home), "--only", "busybox"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode != 0:
        pytest.fail(f"contree-mcp images bootstrap failed: {out.stderr}")
    tag, uuid = out.stdout.strip().splitlines()[-1].split("\t")
    assert tag == BUSYBOX_TAG
    return uuid


@pytest.fixture
def engine_home(tmp_path: Path) -> Iterator[Path]:
    """A seeded home; the engine service the servers under test start in it is stopped afterwards."""
    require_engine_host()
    home = tmp_path / "engine"
    seed_busybox(home)
    try:
        yield home
    finally:
        stop_service(home)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The allowed root of the server under test (its cwd)."""
    path = tmp_path / "work"
    path.mkdir()
    return path


def server_command() -> list[str]:
    script = Path(sys.executable).parent / "contree-mcp"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "tools"]


@asynccontextmanager
async def mcp_session(
    home: Path,
    cwd: Path,
    *extra: str,
    message_handler: Any = None,
    elicitation_callback: Any = None,
    backend_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> AsyncIterator[object]:
    """An initialized `mcp.ClientSession` talking to `contree-mcp --backend local --home <home>` (stdio)."""
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    command, *args = server_command()
    params = StdioServerParameters(
        command=command,
        args=[
            *args,
            *(backend_args or ["--backend", "local", "--home", str(home)]),
            "--allowed-root",
            str(cwd),
            *extra,
        ],
        cwd=str(cwd),
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    with open(cwd.parent / "server-stderr.log", "a") as errlog:  # noqa: ASYNC230
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(
                read, write, message_handler=message_handler, elicitation_callback=elicitation_callback
            ) as session:
                await session.initialize()
                yield session


@asynccontextmanager
async def http_server(home: Path, cwd: Path, port: int, *extra: str) -> AsyncIterator[str]:
    """`contree-mcp --mode http` on 127.0.0.1:<port> (embedded engine); yields the base URL when up."""
    argv = [
        *server_command(),
        "--backend",
        "local",
        "--home",
        str(home),
        "--allowed-root",
        str(cwd),
        "--mode",
        "http",
        "--http-listen",
        "127.0.0.1",
        "--http-port",
        str(port),
        *extra,
    ]
    base = f"http://127.0.0.1:{port}"
    log = cwd.parent / "http-server.log"
    async with server_process(argv, ready_url=base + "/", log=log, name="contree-mcp --mode http", cwd=cwd):
        yield base
