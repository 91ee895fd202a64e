"""Protocol benchmark (`make bench` → `python -m bench protocol`): contree-mcp vs FastMCP (mcp 1.x).

Both servers expose the same number of tools (ours: the conformance fixtures; FastMCP: as many trivial
ones) and are driven by the SAME raw client below (not an SDK): pipelined `ping` and `tools/list` over
stdio (all requests written back to back, answers read concurrently) and over Streamable HTTP (32
requests in flight), median round-trip latency, and server start → initialize answered. Runs are
interleaved in one process so the ratios compare like with like on a noisy machine.
Targets: ≥ 10x FastMCP's stdio throughput, ≥ 5x over HTTP, start → initialized < 150 ms.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

ROOT = Path(__file__).resolve().parents[1]
LATEST = "2025-11-25"
INIT_PARAMS = {"protocolVersion": LATEST, "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}
HTTP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
HTTP_CONCURRENCY = 32
LATENCY_SAMPLES = 200
STARTS = 7

_encode = msgspec.json.encode
_decode = msgspec.json.decode


def _request(rid: int, method: str, params: Any = None) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        message["params"] = params
    return _encode(message)


INITIALIZED = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'


def _tool_count() -> int:
    from protocol.testing.conformance import build_registry

    return len(build_registry().tools)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- the raw stdio client


class StdioClient:
    def __init__(self, proc: asyncio.subprocess.Process, startup: float) -> None:
        self.proc = proc
        self.startup = startup
        self._next = 1

    @classmethod
    async def start(cls, argv: Sequence[str]) -> StdioClient:
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            limit=64 * 1024 * 1024,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(_request(0, "initialize", INIT_PARAMS) + b"\n")
        await proc.stdin.drain()
        answer = _decode(await proc.stdout.readline())
        startup = time.perf_counter() - started
        assert answer["result"]["protocolVersion"] == LATEST, answer
        proc.stdin.write(INITIALIZED + b"\n")
        await proc.stdin.drain()
        return cls(proc, startup)

    async def pipelined(self, method: str, count: int) -> float:
        """Requests per second with all `count` requests written back to back."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        first = self._next
        self._next += count
        lines = [_request(first + i, method) + b"\n" for i in range(count)]
        stdout = self.proc.stdout

        async def read_all() -> None:
            seen = 0
            while seen < count:
                line = await stdout.readline()
                if not line:
                    raise RuntimeError("server closed stdout")
                if b'"id"' in line:
                    seen += 1

        started = time.perf_counter()
        reader = asyncio.ensure_future(read_all())
        for i in range(0, count, 500):
            self.proc.stdin.write(b"".join(lines[i : i + 500]))
            await self.proc.stdin.drain()
        await reader
        return count / (time.perf_counter() - started)

    async def latency(self, method: str, samples: int) -> float:
        """Median round trip in seconds, one request at a time."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        times: list[float] = []
        for _ in range(samples):
            rid = self._next
            self._next += 1
            started = time.perf_counter()
            self.proc.stdin.write(_request(rid, method) + b"\n")
            await self.proc.stdin.drain()
            await self.proc.stdout.readline()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    async def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


# ---------------------------------------------------------------- the raw Streamable HTTP client


class HttpClient:
    def __init__(
        self, proc: asyncio.subprocess.Process, http: aiohttp.ClientSession, url: str, startup: float
    ) -> None:
        self.proc = proc
        self.http = http
        self.url = url
        self.startup = startup
        self.headers = dict(HTTP_HEADERS)
        self._next = 1

    @classmethod
    async def start(cls, argv: Sequence[str], port: int) -> HttpClient:
        url = f"http://127.0.0.1:{port}/mcp"
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=HTTP_CONCURRENCY))
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        body = _request(0, "initialize", INIT_PARAMS)
        while True:
            try:
                async with http.post(url, data=body, headers=HTTP_HEADERS) as resp:
                    answer = await _answer(resp)
                    session = resp.headers.get("Mcp-Session-Id")
                break
            except aiohttp.ClientConnectionError:
                if proc.returncode is not None or time.perf_counter() - started > 30:
                    raise RuntimeError(f"{argv} did not start") from None
                await asyncio.sleep(0.002)
        startup = time.perf_counter() - started
        assert answer["result"]["protocolVersion"] == LATEST, answer
        client = cls(proc, http, url, startup)
        if session:
            client.headers["Mcp-Session-Id"] = session
        client.headers["MCP-Protocol-Version"] = LATEST
        async with http.post(url, data=INITIALIZED, headers=client.headers) as resp:
            assert resp.status == 202, resp.status
        return client

    async def call(self, method: str) -> Any:
        rid = self._next
        self._next += 1
        async with self.http.post(self.url, data=_request(rid, method), headers=self.headers) as resp:
            answer = await _answer(resp)
        assert answer.get("id") == rid, answer
        return answer

    async def pipelined(self, method: str, count: int) -> float:
        remaining = count

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await self.call(method)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(HTTP_CONCURRENCY)))
        return count / (time.perf_counter() - started)

    async def latency(self, method: str, samples: int) -> float:
        times: list[float] = []
        for _ in range(samples):
            started = time.perf_counter()
            await self.call(method)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    async def stop(self) -> None:
        await self.http.close()
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def _answer(resp: aiohttp.ClientResponse) -> Any:
    """The JSON-RPC response in a JSON body or in an SSE stream (the last `data:` carrying an id)."""
    if resp.content_type == "text/event-stream":
        async for raw in resp.content:
            if raw.startswith(b"data:"):
                data = raw[5:].strip()
                if data:
                    message = _decode(data)
                    if "id" in message and "method" not in message:
                        return message
        raise RuntimeError("the SSE stream ended without a response")
    return _decode(await resp.read())


# ---------------------------------------------------------------- the run


def _ours(mode: str, port: int = 0) -> list[str]:
    argv = [sys.executable, "-m", "protocol.testing.conformance", "--mode", mode]
    return [*argv, "--http-port", str(port)] if mode == "http" else argv


def _fastmcp(mode: str, tools: int, port: int = 0) -> list[str]:
    argv = [sys.executable, "-m", "bench.fastmcp_server", "--tools", str(tools), "--mode", mode]
    return [*argv, "--port", str(port)] if mode == "http" else argv


async def _stdio_figures(argv: list[str], count: int) -> dict[str, float]:
    client = await StdioClient.start(argv)
    try:
        await client.pipelined("ping", min(count, 200))  # warm-up
        return {
            "stdio ping req/s": await client.pipelined("ping", count),
            "stdio tools/list req/s": await client.pipelined("tools/list", count),
            "stdio ping median ms": await client.latency("ping", LATENCY_SAMPLES) * 1000,
            "stdio tools/list median ms": await client.latency("tools/list", LATENCY_SAMPLES) * 1000,
        }
    finally:
        await client.stop()


async def _http_figures(argv_for_port: Any, count: int) -> dict[str, float]:
    port = _free_port()
    client = await HttpClient.start(argv_for_port(port), port)
    try:
        await client.pipelined("ping", min(count, 200))  # warm-up
        return {
            "http ping req/s": await client.pipelined("ping", count),
            "http tools/list req/s": await client.pipelined("tools/list", count),
            "http ping median ms": await client.latency("ping", LATENCY_SAMPLES) * 1000,
            "http tools/list median ms": await client.latency("tools/list", LATENCY_SAMPLES) * 1000,
            "http start→initialized ms": client.startup * 1000,
        }
    finally:
        await client.stop()


async def _one_start(argv: list[str]) -> float:
    client = await StdioClient.start(argv)
    await client.stop()
    return client.startup


async def _interpreter_start() -> float:
    """A bare `python -c "import asyncio, msgspec"` starting and exiting: the part of start-up no server
    code can win back on this machine at this moment (the machine is shared and often loaded)."""
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "import asyncio, msgspec")
    await proc.wait()
    return time.perf_counter() - started


async def _startups(ours: list[str], theirs: list[str]) -> tuple[float, float, float]:
    """Median start → initialized (ms) of both servers and the interpreter floor, interleaved."""
    floor: list[float] = []
    a: list[float] = []
    b: list[float] = []
    for _ in range(STARTS):
        floor.append(await _interpreter_start())
        a.append(await _one_start(ours))
        b.append(await _one_start(theirs))
    return statistics.median(a) * 1000, statistics.median(b) * 1000, statistics.median(floor) * 1000


async def run() -> dict[str, tuple[float, float]]:
    tools = _tool_count()
    ours: dict[str, float] = {}
    theirs: dict[str, float] = {}
    ours.update(await _stdio_figures(_ours("stdio"), 20000))
    theirs.update(await _stdio_figures(_fastmcp("stdio", tools), 2000))
    ours.update(await _http_figures(lambda port: _ours("http", port), 4000))
    theirs.update(await _http_figures(lambda port: _fastmcp("http", tools, port), 1000))
    start_ours, start_theirs, floor = await _startups(_ours("stdio"), _fastmcp("stdio", tools))
    ours["stdio start→initialized ms"] = start_ours
    theirs["stdio start→initialized ms"] = start_theirs
    ours["interpreter floor ms"] = theirs["interpreter floor ms"] = floor
    return {key: (ours[key], theirs[key]) for key in ours}


def main() -> None:
    figures = asyncio.run(run())
    print(f"{_tool_count()} tools each; same raw client; HTTP with {HTTP_CONCURRENCY} requests in flight")
    print(
        "interpreter floor: python -c 'import asyncio, msgspec' (start + exit), interleaved with the starts"
    )
    print(f"{'metric':32} {'contree-mcp':>12} {'FastMCP':>12} {'ratio':>8}")
    for key, (ours, theirs) in figures.items():
        # Ratio = how many times better we are (higher throughput, lower latency/start time).
        better = ours / theirs if key.endswith("req/s") else theirs / ours
        digits = 3 if key.endswith("median ms") else 1
        print(f"{key:32} {ours:12.{digits}f} {theirs:12.{digits}f} {better:7.1f}x")
    start, floor = figures["stdio start→initialized ms"][0], figures["interpreter floor ms"][0]
    print(f"start → initialized above the interpreter floor: {start - floor:.1f} ms")
    verdicts = [
        ("stdio throughput ≥ 10x", _worst_ratio(figures, "stdio") >= 10),
        ("HTTP throughput ≥ 5x", _worst_ratio(figures, "http") >= 5),
        ("start → initialized < 150 ms", start < 150),
    ]
    for name, ok in verdicts:
        print(f"target {name}: {'met' if ok else 'NOT met'}")


def _worst_ratio(figures: dict[str, tuple[float, float]], transport: str) -> float:
    return min(
        ours / theirs
        for key, (ours, theirs) in figures.items()
        if key.startswith(transport) and key.endswith("req/s")
    )


if __name__ == "__main__":
    main()
