"""Engine service benchmarks (`make bench` → `python -m bench service`).

1. `echo hi` through MCP (JSON-RPC parse → dispatch → the `run` tool → result), once with the engine in
   this process (LocalEngine) and once through the home's socket to the engine service (ServiceBackend),
   interleaved, after warm-ups. Target: the service adds ≤ 2 ms (median). For scale, the median of one
   small request through the socket, back to back.
2. stdio start → `initialize` answered, with the service already running; beside it the interpreter
   floor (`python -c "import asyncio, msgspec"`) and the same server on the Contree API backend (no
   engine at all), interleaved. Target ≤ 150 ms. Also when `tools/list` is answered after it (a client
   can use the server only then) and when a first `run` sent at once is done, so that no work moved
   past `initialize` hides there. Bytecode is cached, as in an installed package.
3. Auto-start: `contree-mcp` on a home whose service is not running → the first `run` of `echo hi` done
   (initialize, engine service start, run). Target ≤ 1.5 s.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

RUNS = 40
WARMUPS = 3
STARTS = 7
COLD_STARTS = 5
QUIET = 0.1  # seconds after each sample for the engine's background tidying
LATEST = "2025-11-25"
INIT = {"protocolVersion": LATEST, "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}
ECHO = {"command": "echo hi", "image": "busybox:latest", "networking": False}
ROOT = Path(__file__).resolve().parents[1]


def _message(rid: int | None, method: str, params: Any = None) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if rid is not None:
        message["id"] = rid
    if params is not None:
        message["params"] = params
    return msgspec.json.encode(message)


def _seed(home: Path) -> None:
    from contree.engine.storage.bootstrap import bootstrap_images
    from contree.engine.storage.store import Store

    store = Store(home)
    try:
        list(bootstrap_images(store, ("busybox",)))
    finally:
        store.close()


def _engine_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "contree.service", *args]


def _stop_service(home: Path) -> None:
    subprocess.run(_engine_command("stop", "--now", "--home", str(home)), capture_output=True, timeout=120)


def _stdout(result: dict[str, Any]) -> Any:
    structured = result.get("structuredContent") or {}
    return structured.get("result", structured).get("stdout")


# ---------------------------------------------------------------- 1. echo hi: in-process vs service


class McpClient:
    """The MCP server stack in this process (protocol.Server + the tool registry) fed JSON-RPC bytes."""

    def __init__(self, backend: Any, cache: Path) -> None:
        from protocol.server import Server
        from tools.app import build_registry, build_state

        self.state = build_state(backend, "local", cache_dir=cache, allowed_roots=[cache])
        self.server = Server(build_registry(self.state))
        self.session = self.server.create_session(transport="bench")
        self.replies: list[bytes] = []
        self.session.set_default_sink(self._sink)
        self._next = 1

    async def _sink(self, message: Any) -> None:
        if type(message).__name__ == "Reply":
            self.replies.append(message.data)

    async def send(self, data: bytes) -> list[bytes]:
        self.replies = []
        await self.session.handle(data, self._sink)
        return self.replies

    async def start(self) -> None:
        await self.send(_message(0, "initialize", INIT))
        await self.send(_message(None, "notifications/initialized"))

    async def run_echo(self) -> float:
        rid, self._next = self._next, self._next + 1
        started = time.perf_counter()
        replies = await self.send(_message(rid, "tools/call", {"name": "run", "arguments": ECHO}))
        took = time.perf_counter() - started
        result = msgspec.json.decode(replies[-1])["result"]
        assert not result.get("isError") and _stdout(result) == "hi\n", result
        return took

    async def close(self) -> None:
        await self.session.close()
        await self.state.close()


async def _settle_local(engine: Any) -> None:
    await engine.drain()  # sandbox teardown runs after the result; keep it out of the next sample


async def _settle_service(home: Path, keep: int = 0) -> None:
    """Until the service runs no more than `keep` operations (a long-lived sandbox is one)."""
    from contree.service.control import probe

    while True:
        status = await asyncio.to_thread(probe, home)
        if status is None or status.running_operations + status.pending_operations <= keep:
            return
        await asyncio.sleep(0.005)


async def _round_trip(backend: Any) -> float:
    """Median ms of one small API request through the socket, back to back (`whoami`)."""
    for _ in range(20):
        await backend.whoami()
    samples = []
    for _ in range(200):
        started = time.perf_counter()
        await backend.whoami()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


async def _echo_in_process_vs_service(work: Path) -> tuple[float, float, float, float]:
    from contree.engine.local import LocalEngine
    from contree.service.client import ServiceBackend

    local_home, service_home = work / "local", work / "service"
    _seed(local_home)
    _seed(service_home)
    engine = LocalEngine(local_home)
    await engine.start()
    started = await asyncio.to_thread(
        subprocess.run,
        _engine_command("serve", "--home", str(service_home), "--detach", "--idle-exit", "never"),
        capture_output=True, text=True, timeout=120,
    )
    assert started.returncode == 0, started.stderr
    remote = ServiceBackend(service_home, client_name="bench")
    sent = _count_requests(remote)
    try:
        await remote.connect()
        local_client, service_client = McpClient(engine, work / "c1"), McpClient(remote, work / "c2")
        await local_client.start()
        await service_client.start()
        local: list[float] = []
        service: list[float] = []
        for i in range(WARMUPS + RUNS):
            # alternate the order so neither side always follows the other's teardown
            pairs = [(local_client, local), (service_client, service)]
            for client, samples in pairs if i % 2 == 0 else reversed(pairs):
                sent.clear()
                took = await client.run_echo()
                await (_settle_local(engine) if client is local_client else _settle_service(service_home))
                # the engine finishes tidying up (spare scratch directories, in worker threads) after its
                # queue drained: in this process, that would slow the other side's next sample
                await asyncio.sleep(QUIET)
                if i >= WARMUPS:
                    samples.append(took)
        await local_client.close()
        await service_client.close()
        per_run = list(sent)  # the last service run's requests
        round_trip = await _round_trip(remote)
    finally:
        await engine.close()
        await remote.close()
        _stop_service(service_home)
    # the cost of the service: the median of paired differences (each pair ran back to back), which
    # the machine's drift between pairs does not bias the way two separate medians can
    added = statistics.median(s - lo for s, lo in zip(service, local, strict=True)) * 1000
    return statistics.median(local) * 1000, statistics.median(service) * 1000, added, round_trip, per_run


def _count_requests(backend: Any) -> list[str]:
    """The API requests `backend` sends from now on ("GET /v1/operations/{id}/events"), in a list the
    caller clears."""
    import re

    sent: list[str] = []
    real = backend._request

    async def counted(method: str, url: Any, *args: Any, **kwargs: Any) -> Any:
        path = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "{id}", getattr(url, "path", str(url)))
        sent.append(f"{method} {path}")
        return await real(method, url, *args, **kwargs)

    backend._request = counted
    return sent


# ---------------------------------------------------------------- 2./3. stdio starts


async def _stdio_until(argv: list[str], cwd: Path, env: dict[str, str], *, run: bool) -> dict[str, float]:
    """Seconds from spawning the server to each milestone, sent the way a client sends them (each after
    the previous answer): `initialize` answered, `tools/list` answered (the client can use the server),
    and with `run`, the first `echo hi` run's result."""
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, limit=16 << 20,
    )
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    async def ask(rid: int, *messages: bytes) -> Any:
        stdin.write(b"".join(m + b"\n" for m in messages))
        await stdin.drain()
        while True:
            line = await stdout.readline()
            if not line:
                raise RuntimeError(f"{argv[0]} closed stdout before answering")
            reply = msgspec.json.decode(line)
            if reply.get("id") == rid:
                return reply["result"]

    took: dict[str, float] = {}
    result = await ask(0, _message(0, "initialize", INIT))
    took["initialize"] = time.perf_counter() - started
    assert result["protocolVersion"] == LATEST, result
    result = await ask(1, _message(None, "notifications/initialized"), _message(1, "tools/list"))
    took["tools/list"] = time.perf_counter() - started
    assert any(tool["name"] == "run" for tool in result["tools"]), result
    if run:
        result = await ask(2, _message(2, "tools/call", {"name": "run", "arguments": ECHO}))
        took["run"] = time.perf_counter() - started
        assert _stdout(result) == "hi\n", result
    stdin.close()
    await proc.wait()
    return took


async def _floor(env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "import asyncio, msgspec", env=env)
    await proc.wait()
    return time.perf_counter() - started


def _server() -> list[str]:
    script = Path(sys.executable).parent / "contree-mcp"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tools"]


def _server_env(work: Path) -> dict[str, str]:
    """The servers' environment. Bytecode is cached (in a directory of this run): an installed package
    has its .pyc files, so a start that compiles every module from source (PYTHONDONTWRITEBYTECODE, set
    in some shells) would measure something no user sees after the first start."""
    env = {**os.environ, "CONTREE_ENGINE_IDLE_EXIT": "10m", "PYTHONPYCACHEPREFIX": str(work / "pycache")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


async def _starts(work: Path) -> dict[str, float]:
    home = work / "start"
    _seed(home)
    env = _server_env(work)
    local = [*_server(), "--backend", "local", "--home", str(home), "--allowed-root", str(work)]
    remote = [*_server(), "--backend", "contree", "--url", "http://127.0.0.1:9", "--token", "t",
              "--auth-type", "jwt", "--cache-files", ":memory:", "--cache-general", ":memory:"]
    figures: dict[str, list[float]] = {}

    def add(prefix: str, took: dict[str, float]) -> None:
        for milestone, seconds in took.items():
            figures.setdefault(f"{prefix} {milestone}", []).append(seconds)

    try:
        await _stdio_until(local, work, env, run=True)  # starts the service and writes the bytecode caches
        await _stdio_until(remote, work, env, run=False)
        for _ in range(STARTS):
            figures.setdefault("floor", []).append(await _floor(env))
            add("service", await _stdio_until(local, work, env, run=False))
            add("api", await _stdio_until(remote, work, env, run=False))
            add("warm", await _stdio_until(local, work, env, run=True))
        for _ in range(COLD_STARTS):
            await asyncio.to_thread(_stop_service, home)
            add("cold", await _stdio_until(local, work, env, run=True))
    finally:
        _stop_service(home)
    return {key: statistics.median(values) * 1000 for key, values in figures.items()}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="contree-bench-service-") as tmp:
        work = Path(tmp)
        try:
            echo = asyncio.run(_echo_in_process_vs_service(work / "echo"))
            local, service, added, round_trip, per_run = echo
            starts = asyncio.run(_starts(work))
        finally:
            for home in (work / "echo" / "service", work / "start"):
                if home.exists():
                    _stop_service(home)
            shutil.rmtree(work, ignore_errors=True)
    print(f"echo hi through MCP, {RUNS} runs each after {WARMUPS} warm-ups, interleaved (networking off):")
    print(f"  {'engine in this process':<44} median {local:8.2f} ms")
    print(f"  {'MCP -> socket -> engine service':<44} median {service:8.2f} ms  ({service / local:4.2f}x)")
    print(f"  service adds {added:.2f} ms per run, median of paired differences")
    print(f"  {len(per_run)} requests per run: {', '.join(per_run)}")
    print(f"  one small request back to back through the socket takes {round_trip:.2f} ms")
    print(f"stdio start -> answered, {STARTS} starts each, interleaved (.pyc cached, as installed):")
    print(f"  {'interpreter floor (import asyncio, msgspec)':<44} median {starts['floor']:8.1f} ms")
    for label, key in (
        ("engine service running: initialize", "service initialize"),
        ("  then tools/list", "service tools/list"),
        ("  then the first echo hi run", "warm run"),
        ("Contree API backend (no engine): initialize", "api initialize"),
        ("  then tools/list", "api tools/list"),
    ):
        print(f"  {label:<44} median {starts[key]:8.1f} ms")
    print(f"auto-start: no service running -> first echo hi done, {COLD_STARTS} starts:")
    print(f"  {'contree-mcp, cold engine service':<44} median {starts['cold run']:8.1f} ms")
    for name, ok in (
        ("the service adds <= 2 ms per run", added <= 2.0),
        ("start -> initialized <= 150 ms (service running)", starts["service initialize"] <= 150),
        ("cold auto-start -> first run <= 1.5 s", starts["cold run"] <= 1500),
    ):
        print(f"target {name}: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
