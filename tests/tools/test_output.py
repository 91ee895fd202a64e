"""Whole output through the official SDK client (mcp 1.30) on the embedded engine: every byte a run
writes is readable through `contree://operations/instance/<id>/stdout|stderr`, text pages never split a
UTF-8 character, bad paging arguments are errors, the per-run quota is stated, and the server's memory
does not grow with a run's output."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from mcp.shared.exceptions import McpError
from pydantic import AnyUrl

from tests.tools.conftest import mcp_session
from tests.tools.test_sdk_tools import result

MB50 = 50 * 1024 * 1024


async def page_through(session: Any, uri: str, limit: int | None) -> tuple[bytes, list[Any]]:
    """Every byte of a stream resource, following `_meta.next_offset`; returns (bytes, page items)."""
    data = bytearray()
    items: list[Any] = []
    offset = 0
    while True:
        query = f"?offset={offset}" + (f"&limit={limit}" if limit else "")
        item = (await session.read_resource(AnyUrl(uri + query))).contents[0]
        chunk = item.text.encode() if getattr(item, "text", None) is not None else base64.b64decode(item.blob)
        assert item.meta["offset"] == offset and item.meta["bytes"] == len(chunk)
        if not chunk:
            assert item.meta["complete"] and offset == item.meta["total_bytes"]
            return bytes(data), items
        items.append(item)
        data += chunk
        offset = item.meta["next_offset"]


async def test_50_mb_of_stdout_read_back_byte_for_byte(engine_home: Path, workdir: Path) -> None:
    async with mcp_session(engine_home, workdir, "--read-max-bytes", str(8 << 20)) as s:
        session: Any = s
        done = result(
            await session.call_tool(
                "run",
                {
                    # random bytes (binary pages), their checksum on stderr
                    "command": f"head -c {MB50} /dev/urandom > /tmp/d && sha256sum /tmp/d >&2 && cat /tmp/d",
                    "image": "busybox:latest",
                    "timeout": 300,
                },
            )
        )
        assert done["exit_code"] == 0 and done["stdout_truncated"] is True
        assert done["stdout_bytes"] == MB50 and done["output_quota_exceeded"] is False
        assert done["stdout_resource"] == f"contree://operations/instance/{done['uuid']}/stdout"
        assert f"offset={len(done['stdout'].encode())}" in done["hint"] or "offset=" in done["hint"]
        data, items = await page_through(session, done["stdout_resource"], 8 << 20)
        assert len(data) == MB50
        assert hashlib.sha256(data).hexdigest() == done["stderr"].split()[0]
        assert all(i.mimeType == "application/octet-stream" for i in items)


async def test_utf8_output_paged_9_bytes_at_a_time_comes_back_whole(engine_home: Path, workdir: Path) -> None:
    line = "héllo wörld ✓ 𝄞 日本語 ok\n"
    text = line * 40
    async with mcp_session(engine_home, workdir) as s:
        session: Any = s
        done = result(
            await session.call_tool(
                "run",
                {
                    "command": f"for i in $(seq 40); do printf '{line[:-1]}\\n'; done",
                    "image": "busybox:latest",
                },
            )
        )
        assert done["stdout"] == text  # 1360 bytes: within the default 8000
        uri = f"contree://operations/instance/{done['uuid']}/stdout"
        data, items = await page_through(session, uri, 9)
        assert data.decode() == text
        assert all(getattr(i, "text", None) is not None for i in items)  # every page is text, not a blob
        assert all(len(i.text.encode()) <= 9 for i in items)
        assert min(len(i.text.encode()) for i in items) < 9  # some pages stopped before a character
        one = await page_through(session, uri, 1)  # a limit below a character's size gives that character
        assert one[0].decode() == text and max(len(i.text.encode()) for i in one[1]) == 4


async def test_bad_offsets_and_limits_are_errors(engine_home: Path, workdir: Path) -> None:
    async with mcp_session(engine_home, workdir) as s:
        session: Any = s
        done = result(
            await session.call_tool("run", {"command": "printf 'twelve bytes'", "image": "busybox:latest"})
        )
        uri = f"contree://operations/instance/{done['uuid']}/stdout"
        for query in (
            "?offset=-1",
            "?offset=x",
            "?limit=0",
            "?limit=99999999999",
            "?limit=",
            "?offset=1&offset=2",
            "?page=2",
            "?offset=13",  # beyond the 12 bytes there are
        ):
            with pytest.raises(McpError) as caught:
                await session.read_resource(AnyUrl(uri + query))
            assert caught.value.error.code == -32602, query
        end = (await session.read_resource(AnyUrl(uri + "?offset=12"))).contents[0]
        assert end.text == "" and end.meta["complete"] is True and end.meta["total_bytes"] == 12


async def test_output_quota_is_configurable_reported_and_stated(engine_home: Path, workdir: Path) -> None:
    async with mcp_session(engine_home, workdir, "--output-quota", "1M") as s:
        session: Any = s
        me = result(await session.call_tool("whoami", {}))
        assert me["limits"]["output_quota_bytes"] == 1 << 20
        done = result(
            await session.call_tool(
                "run",
                {"command": "yes 0123456789 | head -c 3000000; echo done >&2", "image": "busybox:latest"},
            )
        )
        assert done["exit_code"] == 0 and done["output_quota_exceeded"] is True
        # stdout used up the quota; stderr's first bytes are kept anyway (the API's event log has them)
        assert (done["stdout_bytes"], done["stderr"], done["stderr_bytes"]) == (1 << 20, "done\n", 5)
        assert done["output_bytes_kept"] == (1 << 20) + 5
        assert "output quota" in done["hint"]
        item = (await session.read_resource(AnyUrl(done["stdout_resource"] + "?offset=0&limit=10"))).contents[
            0
        ]
        assert item.meta["quota_bytes"] == 1 << 20 and item.meta["dropped_bytes"] > 0


async def test_get_operation_pages_a_stream_for_clients_without_resources(
    engine_home: Path, workdir: Path
) -> None:
    async with mcp_session(engine_home, workdir) as s:
        session: Any = s
        done = result(await session.call_tool("run", {"command": "seq 1 30000", "image": "busybox:latest"}))
        expected = "".join(f"{i}\n" for i in range(1, 30001))
        assert done["stdout_truncated"] is True and done["stdout_bytes"] == len(expected)
        assert expected.startswith(done["stdout"]) and expected.endswith(done["stdout_tail"])
        got, offset = "", 0
        while True:
            page = result(
                await session.call_tool(
                    "get_operation", {"operation_id": done["uuid"], "stream": "stdout", "offset": offset}
                )
            )
            got += page["stdout"]
            offset += len(page["stdout"].encode())
            if "that is the end" in page["hint"]:
                break
            assert f"offset={offset}" in page["hint"]
        assert got == expected


def _children_rss(home: Path) -> int:
    """VmRSS (bytes) of our child server process serving `home` (an unreaped child's pid cannot be reused)."""
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = f.read().rsplit(")", 1)[1].split()[1]
            if ppid != me or str(home) not in Path(f"/proc/{entry}/cmdline").read_text():
                continue
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except (OSError, IndexError):
            continue
    raise AssertionError("the server process was not found")


async def test_server_memory_stays_flat_while_a_run_prints_1_gb(engine_home: Path, workdir: Path) -> None:
    async with mcp_session(engine_home, workdir) as s:
        session: Any = s
        result(await session.call_tool("run", {"command": "seq 1 100000", "image": "busybox:latest"}))
        base = _children_rss(engine_home)
        peak = base
        run = asyncio.create_task(
            session.call_tool(
                "run",
                {
                    "command": "yes 0123456789abcdef | head -c 1000000000",
                    "image": "busybox:latest",
                    "timeout": 600,
                },
            )
        )
        while not run.done():
            peak = max(peak, _children_rss(engine_home))
            await asyncio.sleep(0.1)
        done = result(await run)
        assert done["exit_code"] == 0 and done["stdout_bytes"] == 1_000_000_000
        assert peak - base <= 50 * 1024 * 1024, f"RSS grew by {(peak - base) >> 20} MiB"
        tail = (
            await session.read_resource(AnyUrl(done["stdout_resource"] + "?offset=999999990&limit=10"))
        ).contents[0]
        line = "0123456789abcdef\n"
        end = 1_000_000_000 % len(line)  # where the last (cut) line stops
        expected = (line * 2)[len(line) + end - 10 : len(line) + end]
        assert tail.text == expected and tail.meta["next_offset"] == 1_000_000_000
