"""stdio transport integration (MCP-PROTOCOL.md §4.1): a real subprocess, NDJSON both ways."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

ROOT = Path(__file__).resolve().parents[2]
INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {"sampling": {}},
        "clientInfo": {"name": "t", "version": "1"},
    },
}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


class Proc:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def write(self, *items: Any) -> None:
        assert self.proc.stdin is not None
        for item in items:
            self.proc.stdin.write(item if isinstance(item, bytes) else msgspec.json.encode(item) + b"\n")
        await self.proc.stdin.drain()

    async def read(self, wait: float = 5) -> Any:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), wait)
        assert line.endswith(b"\n"), line
        return msgspec.json.decode(line)

    async def read_until_id(self, rid: Any, wait: float = 5) -> tuple[Any, list[Any]]:
        seen: list[Any] = []
        while True:
            message = await self.read(wait)
            if message.get("id") == rid and "method" not in message:
                return message, seen
            seen.append(message)

    async def close_stdin(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return await asyncio.wait_for(self.proc.wait(), 5)


@pytest.fixture
async def server() -> AsyncIterator[Proc]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.protocol.stdio_app",
        "2",
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    p = Proc(proc)
    try:
        yield p
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _init(p: Proc) -> None:
    await p.write(INIT, INITIALIZED)
    reply = await p.read()
    assert reply["result"]["protocolVersion"] == "2025-11-25"


async def test_initialize_then_list_over_stdio(server: Proc) -> None:
    await _init(server)
    await server.write({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    reply = await server.read()
    assert len(reply["result"]["tools"]) == 2 and "nextCursor" in reply["result"]


async def test_crlf_and_blank_lines_are_tolerated(server: Proc) -> None:
    await server.write(
        msgspec.json.encode(INIT) + b"\r\n",
        b"\n",
        b"   \r\n",
        b'{"jsonrpc":"2.0","id":1,"method":"ping"}\r\n',
    )
    assert (await server.read())["id"] == 0
    assert await server.read() == {"jsonrpc": "2.0", "id": 1, "result": {}}


async def test_non_json_line_is_parse_error_and_serving_continues(server: Proc) -> None:
    await server.write(b"this is not json\n", {"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert await server.read() == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32700, "message": "Parse error"},
    }
    assert (await server.read())["id"] == 1


async def test_stdout_carries_only_protocol_even_when_a_tool_prints(server: Proc) -> None:
    await _init(server)
    await server.write({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "noisy"}})
    reply = await server.read()
    assert reply["id"] == 1 and reply["result"]["structuredContent"] == {"result": "quiet"}
    assert await server.close_stdin() == 0
    assert server.proc.stdout is not None and await server.proc.stdout.read() == b""
    assert server.proc.stderr is not None and b"stray print from a tool" in await server.proc.stderr.read()


async def test_slow_call_does_not_block_ping(server: Proc) -> None:
    await _init(server)
    await server.write(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "sleepy"}},
        {"jsonrpc": "2.0", "id": 2, "method": "ping"},
    )
    assert (await server.read(wait=2))["id"] == 2


async def test_cancelled_call_gets_no_response(server: Proc) -> None:
    await _init(server)
    await server.write(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "sleepy"}},
        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "test_simple_text"}},
    )
    reply, seen = await server.read_until_id(2)
    assert "result" in reply and seen == []
    assert await server.close_stdin() == 0
    assert server.proc.stdout is not None and await server.proc.stdout.read() == b""
    assert server.proc.stderr is not None and b"sleepy cancelled" in await server.proc.stderr.read()


async def test_eof_exits_zero_promptly_and_cancels_in_flight_work(server: Proc) -> None:
    await _init(server)
    await server.write({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "sleepy"}})
    await asyncio.sleep(0.1)
    assert await server.close_stdin() == 0
    assert server.proc.stderr is not None and b"sleepy cancelled" in await server.proc.stderr.read()


async def test_server_to_client_request_round_trip(server: Proc) -> None:
    await _init(server)
    await server.write(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "test_sampling", "arguments": {"prompt": "p"}},
        }
    )
    ask = await server.read()
    assert ask["method"] == "sampling/createMessage"
    await server.write(
        {
            "jsonrpc": "2.0",
            "id": ask["id"],
            "result": {"role": "assistant", "content": {"type": "text", "text": "A"}, "model": "m"},
        }
    )
    reply = await server.read()
    assert reply["result"]["content"][0]["text"] == "LLM response: A"


async def test_pipelined_requests_all_answered(server: Proc) -> None:
    await _init(server)
    await server.write(*({"jsonrpc": "2.0", "id": i, "method": "ping"} for i in range(1, 201)))
    ids = [(await server.read())["id"] for _ in range(200)]
    assert ids == list(range(1, 201))


async def test_serve_stdio_in_process_with_given_streams() -> None:
    from protocol.server import Server
    from protocol.stdio import serve_stdio
    from protocol.testing.conformance import build_registry

    class Collect:
        def __init__(self) -> None:
            self.data = b""

        def write(self, data: bytes) -> None:
            self.data += data

        async def drain(self) -> None:
            return None

    reader = asyncio.StreamReader()
    reader.feed_data(msgspec.json.encode(INIT) + b"\n\r\n" + b'{"jsonrpc":"2.0","id":1,"method":"ping"}\r\n')
    reader.feed_data(b'{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"test_simple_text"}}\n')
    reader.feed_eof()
    out = Collect()
    await asyncio.wait_for(serve_stdio(Server(build_registry()), reader, out), 5)
    lines = out.data.split(b"\n")
    assert lines[-1] == b""
    assert [msgspec.json.decode(line)["id"] for line in lines[:-1]] == [0, 1, 2]


async def test_closed_stdout_does_not_crash_the_loop() -> None:
    from protocol.server import Server
    from protocol.stdio import serve_stdio
    from protocol.testing.conformance import build_registry

    class Broken:
        writes = 0

        def write(self, data: bytes) -> None:
            Broken.writes += 1
            raise BrokenPipeError("reader went away")

        async def drain(self) -> None:
            return None

    reader = asyncio.StreamReader()
    reader.feed_data(msgspec.json.encode(INIT) + b"\n" + b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n' * 5)
    reader.feed_eof()
    await asyncio.wait_for(serve_stdio(Server(build_registry()), reader, Broken()), 5)
    assert Broken.writes == 1


@pytest.mark.parametrize("source", ["devnull", "regular-file"])
def test_non_pollable_stdin_is_served_and_exits_on_eof(source: str, tmp_path: Path) -> None:
    # epoll refuses /dev/null (EPERM) and regular files: the server must still read them and exit.
    import subprocess

    if source == "devnull":
        stdin_path, expected = os.devnull, []
    else:
        stdin_path = str(tmp_path / "requests.ndjson")
        ping = {"jsonrpc": "2.0", "id": 7, "method": "ping"}
        Path(stdin_path).write_bytes(msgspec.json.encode(ping) + b"\n")
        expected = [{"jsonrpc": "2.0", "id": 7, "result": {}}]
    with open(stdin_path, "rb") as stdin:
        done = subprocess.run(
            [sys.executable, "-m", "protocol.testing.conformance", "--mode", "stdio"],
            cwd=ROOT, stdin=stdin, capture_output=True, timeout=20,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    assert done.returncode == 0, done.stderr.decode()
    assert [msgspec.json.decode(line) for line in done.stdout.splitlines()] == expected


async def test_idle_is_called_once_after_an_answer_when_no_work_is_in_flight() -> None:
    # the server loads what later requests need there (tools.cli: the backend's HTTP client), so it
    # must come after the handshake's answer and never while a request is being served
    from protocol.registry import RequestContext, ToolResult
    from protocol.server import Server
    from protocol.stdio import IDLE_AFTER, serve_stdio
    from protocol.testing.conformance import build_registry

    registry = build_registry("1")
    release = asyncio.Event()

    @registry.tool("gated", description="Answers once the test lets it.")
    async def gated(ctx: RequestContext) -> ToolResult:
        await release.wait()
        return ToolResult(content=[])

    class Collect:
        def __init__(self) -> None:
            self.lines: list[Any] = []

        def write(self, data: bytes) -> None:
            self.lines += [msgspec.json.decode(line) for line in data.splitlines() if line]

        async def drain(self) -> None:
            return None

    out = Collect()
    idle: list[list[Any]] = []
    reader = asyncio.StreamReader()
    serving = asyncio.ensure_future(
        serve_stdio(Server(registry), reader, out, idle=lambda: idle.append(out.lines[:]))
    )
    await asyncio.sleep(IDLE_AFTER * 3)
    assert idle == []  # nothing answered yet: the handshake must not wait for the server's preparations
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "gated", "arguments": {}}}
    reader.feed_data(msgspec.json.encode(INIT) + b"\n" + msgspec.json.encode(INITIALIZED) + b"\n")
    reader.feed_data(msgspec.json.encode(call) + b"\n")
    await asyncio.sleep(IDLE_AFTER * 3)
    assert idle == [] and [line["id"] for line in out.lines] == [0]  # the call is still in flight
    release.set()
    for _ in range(100):
        if idle:
            break
        await asyncio.sleep(IDLE_AFTER / 2)
    assert len(idle) == 1 and [line["id"] for line in idle[0]] == [0, 1]
    reader.feed_data(b'{"jsonrpc":"2.0","id":2,"method":"ping"}\n')
    await asyncio.sleep(IDLE_AFTER * 3)
    reader.feed_eof()
    await asyncio.wait_for(serving, 5)
    assert len(idle) == 1 and [line["id"] for line in out.lines] == [0, 1, 2]
