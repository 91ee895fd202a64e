"""Loopback helpers shared by the test packages: a free port, and a server subprocess that is waited for
until it answers and is always stopped."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def server_process(
    argv: Sequence[str],
    *,
    ready_url: str,
    log: Path,
    name: str,
    cwd: Path | None = None,
    headers: Mapping[str, str] | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Start `argv` (output appended to `log`), wait up to 30 s for `ready_url` to answer 200, and
    terminate it (kill after 15 s) when the block ends, whatever happened."""
    with open(log, "ab") as out:  # noqa: ASYNC230
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=str(cwd) if cwd else None, stdout=out, stderr=out
        )
    try:
        async with aiohttp.ClientSession(headers=dict(headers or {})) as http:
            for _ in range(300):
                if proc.returncode is not None:
                    pytest.fail(f"{name} exited with {proc.returncode}; see {log}")
                try:
                    async with http.get(ready_url) as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"{name} did not come up")
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
