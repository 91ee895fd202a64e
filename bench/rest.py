"""REST layer benchmark: what going through HTTP costs, side by side with direct Backend calls.

The in-memory fake backend (tests/fake_backend.py) is served on 127.0.0.1 and driven by
RemoteBackend in the same process, so the figures are the client + server + loopback overhead:

* status polls (`get_operation`) per second, sequential and 32 in flight, vs direct calls;
* SSE event throughput (a 20 000-event log read with `events()`), vs iterating the fake directly;
* download throughput of a 64 MiB file, vs the fake's own chunk iterator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp.test_utils import TestServer

from contree import api
from contree.client import RemoteBackend
from contree.rest import build_app
from tests.fake_backend import FakeBackend

EVENTS = 20_000
DOWNLOAD = 64 * 1024 * 1024
POLLS = 2_000


async def _rate(n: int, call: Callable[[], Awaitable[object]], concurrency: int = 1) -> float:
    """Calls per second for `n` calls with `concurrency` in flight."""
    per_worker = n // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            await call()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return per_worker * concurrency / (time.perf_counter() - start)


async def _bench() -> list[tuple[str, float, float, str]]:
    fake = FakeBackend()
    spawned = await fake.spawn(api.InstanceSpawnRequest(command="bench", image=fake.busybox))
    await asyncio.sleep(0)
    op = spawned.uuid
    chunk = api.encode_event_stream(b"x" * 200 + b"\n")
    events = fake.op_events[op]
    for _ in range(EVENTS):
        events.append(
            api.OperationEvent.make(
                id=len(events), ts="2026-01-01T00:00:00Z", type="stdout", data=chunk, spid=1
            )
        )
    big = fake.add_image(None, {"/big": bytes(range(256)) * (DOWNLOAD // 256)})

    server = TestServer(build_app(fake, token="bench"), host="127.0.0.1")
    await server.start_server()
    client = RemoteBackend(str(server.make_url("")), token="bench")
    rows = []
    try:
        await client.whoami()  # connection warm-up
        direct = await _rate(POLLS, lambda: fake.get_operation(op))
        remote = await _rate(POLLS, lambda: client.get_operation(op))
        rows.append(("get_operation, sequential", remote, direct, "calls/s"))
        remote32 = await _rate(POLLS, lambda: client.get_operation(op), concurrency=32)
        rows.append(("get_operation, 32 in flight", remote32, direct, "calls/s"))

        async def read_direct() -> int:
            return sum([1 async for _ in fake.events(op)])

        async def read_remote() -> int:
            return sum([1 async for _ in client.events(op)])

        start = time.perf_counter()
        count = await read_direct()
        direct_ev = count / (time.perf_counter() - start)
        start = time.perf_counter()
        count = await read_remote()
        remote_ev = count / (time.perf_counter() - start)
        rows.append((f"events() over SSE ({count} events)", remote_ev, direct_ev, "events/s"))

        start = time.perf_counter()
        size = sum([len(c) async for c in fake.download(big, "/big")])
        direct_mb = size / (time.perf_counter() - start) / 1e6
        start = time.perf_counter()
        size = sum([len(c) async for c in client.download(big, "/big")])
        remote_mb = size / (time.perf_counter() - start) / 1e6
        rows.append((f"download {size // (1024 * 1024)} MiB", remote_mb, direct_mb, "MB/s"))
    finally:
        await client.close()
        await server.close()
    return rows


def main() -> None:
    rows = asyncio.run(_bench())
    print(f"{'measure':38} {'via REST':>12} {'direct':>12} {'slowdown':>10}  unit")
    for name, remote, direct, unit in rows:
        print(f"{name:38} {remote:12.0f} {direct:12.0f} {direct / remote:9.0f}x  {unit}")


if __name__ == "__main__":
    main()
