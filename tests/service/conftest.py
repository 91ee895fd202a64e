"""Helpers for the engine service tests: the real `contree-mcp engine …` commands, a client of a home's
service, and homes whose service is stopped after the test whatever happened."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from contree import api
from contree.service.client import ServiceBackend
from tests.service_util import stop_service
from tests.tools.conftest import engine_home, require_engine_host, server_command, workdir

__all__ = ["engine_home", "workdir"]


def engine_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`contree-mcp engine <args>`, as a user runs it."""
    return subprocess.run(
        [*server_command(), "engine", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def fresh_home(tmp_path: Path) -> Iterator[Path]:
    """A home that does not exist yet (no images); its service is stopped afterwards."""
    require_engine_host()
    home = tmp_path / "fresh"
    try:
        yield home
    finally:
        stop_service(home)


@asynccontextmanager
async def service_client(home: Path, name: str = "test", **kwargs: object) -> AsyncIterator[ServiceBackend]:
    client = ServiceBackend(home, client_name=name, **kwargs)  # type: ignore[arg-type]
    try:
        await client.connect()
        yield client
    finally:
        await client.close()


async def spawn(client: ServiceBackend, command: str, **fields: object) -> str:
    image = await client.resolve_tag("busybox:latest")
    request = api.InstanceSpawnRequest(command=command, image=image, shell=True, **fields)  # type: ignore[arg-type]
    return (await client.spawn(request)).uuid


POLL = 0.05


async def wait_status(
    client: ServiceBackend, op: str, wanted: set[str], limit: float = 60
) -> api.OperationResponse:
    for _ in range(int(limit / POLL)):
        resp = await client.get_operation(op)
        if resp.status in wanted:
            return resp
        await asyncio.sleep(POLL)
    raise AssertionError(f"operation {op} is still {resp.status}, not {wanted}, after {limit:g} s")


async def wait_for(predicate: Callable[[], object], limit: float = 30) -> None:
    """Poll a condition of the host (processes, files) that no event announces."""
    for _ in range(int(limit / POLL)):
        if predicate():
            return
        await asyncio.sleep(POLL)
    raise AssertionError(f"still not true after {limit:g} s")


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]


def processes_with(marker: str) -> list[str]:
    """Command lines of host processes containing `marker` (a sandbox's processes show in /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(cmdline)
    return found
