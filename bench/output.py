"""Output and disk benchmarks (`make bench` → `python -m bench output`).

1. Paging a run's whole stdout through `contree://operations/instance/<id>/stdout` over stdio, with the
   raw NDJSON client of bench/protocol.py (what the server can deliver) and with the official SDK client
   (what a Python agent gets), beside the same bytes read from a plain pipe (`cat` of the spill) by the
   same raw client: the ratio is the cost of MCP framing, JSON and the paging itself. Target: ≥ 200 MB/s.
2. The server's RSS while a run prints 1 GB (target: ≤ +50 MB).
3. `contree-mcp images prune --untagged` on a store of many untagged images, beside `rm -rf` of the same
   amount of layer files (the floor): wall time, images/s, MB freed/s.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from bench.protocol import INIT_PARAMS, INITIALIZED, ROOT, _request

TEXT_BYTES = 200 * 1024 * 1024
BINARY_BYTES = 100 * 1024 * 1024
RSS_BYTES = 1_000_000_000
PRUNE_IMAGES = 150
PRUNE_FILES = 200


def _server(home: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tools", "--backend", "local", "--home", str(home), *extra]


def _bootstrap(home: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "tools", "images", "bootstrap", "--home", str(home), "--only", "busybox"],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )


class Raw:
    """A raw NDJSON stdio client (no SDK), one request at a time."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.next_id = 1

    @classmethod
    async def start(cls, argv: list[str], cwd: Path) -> Raw:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            limit=256 * 1024 * 1024,
        )
        client = cls(proc)
        await client.call("initialize", INIT_PARAMS)
        assert proc.stdin is not None
        proc.stdin.write(INITIALIZED + b"\n")
        return client

    async def call(self, method: str, params: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        rid = self.next_id
        self.next_id += 1
        self.proc.stdin.write(_request(rid, method, params) + b"\n")
        await self.proc.stdin.drain()
        while True:
            answer = msgspec.json.decode(await self.proc.stdout.readline())
            if answer.get("id") == rid:
                return answer["result"]

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        await self.proc.wait()


def _cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process (load-independent, unlike wall time on a shared machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _raw_paging(client: Raw, uri: str, limit: int, *, digest: bool = False) -> tuple[float, float, str]:
    """(MB/s wall, MB per server CPU second, sha256 when asked) of paging the whole stream."""
    import base64

    hashed = hashlib.sha256()
    offset = 0
    cpu = _cpu_seconds(client.proc.pid)
    started = time.perf_counter()
    while True:
        item = (await client.call("resources/read", {"uri": f"{uri}?offset={offset}&limit={limit}"}))[
            "contents"
        ][0]
        if item["_meta"]["bytes"] == 0:
            break
        if digest:
            hashed.update(item["text"].encode() if "text" in item else base64.b64decode(item["blob"]))
        offset = item["_meta"]["next_offset"]
    wall = time.perf_counter() - started
    cpu = _cpu_seconds(client.proc.pid) - cpu
    return offset / wall / 1e6, offset / max(cpu, 1e-6) / 1e6, hashed.hexdigest()


async def _pipe_floor(path: Path, chunk: int) -> float:
    """MB/s of the same bytes through a plain pipe into the same kind of asyncio reader."""
    proc = await asyncio.create_subprocess_exec("cat", str(path), stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    total = 0
    started = time.perf_counter()
    while data := await proc.stdout.read(chunk):
        total += len(data)
    await proc.wait()
    return total / (time.perf_counter() - started) / 1e6


async def _sdk_paging(home: Path, work: Path, uri: str, limit: int) -> float:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client
    from pydantic import AnyUrl

    params = StdioServerParameters(
        command=sys.executable, args=_server(home, "--read-max-bytes", str(8 << 20))[1:], cwd=str(work)
    )
    with open(os.devnull, "w") as devnull:  # noqa: ASYNC230
        async with (
            stdio_client(params, errlog=devnull) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            offset = 0
            started = time.perf_counter()
            while True:
                item = (await session.read_resource(AnyUrl(f"{uri}?offset={offset}&limit={limit}"))).contents[
                    0
                ]
                size = (
                    len(item.text.encode())
                    if getattr(item, "text", None) is not None
                    else len(item.blob) * 3 // 4
                )
                if not size:
                    break
                offset = item.meta["next_offset"]
            return offset / (time.perf_counter() - started) / 1e6


async def _paging(home: Path, work: Path) -> None:
    client = await Raw.start(_server(home, "--read-max-bytes", str(8 << 20)), work)
    try:
        made = {}
        for kind, command in (
            ("text", f"yes 'the quick brown fox jumps over the lazy dog' | head -c {TEXT_BYTES}"),
            ("binary", f"head -c {BINARY_BYTES} /dev/urandom"),
        ):
            out = await client.call(
                "tools/call",
                {"name": "run", "arguments": {"command": command, "image": "busybox:latest", "timeout": 600}},
            )
            made[kind] = out["structuredContent"]["result"]
        rows = []
        for kind, result in made.items():
            uri = result["stdout_resource"]
            spill = home / "output" / result["uuid"] / "1.stdout"
            _, _, digest = await _raw_paging(client, uri, 4 << 20, digest=True)
            assert digest == hashlib.sha256(spill.read_bytes()).hexdigest(), "paged bytes differ"
            for limit in (1 << 20, 4 << 20):
                floor = await _pipe_floor(spill, limit)
                ours, per_cpu, _ = await _raw_paging(client, uri, limit)
                rows.append((kind, limit, ours, floor, per_cpu))
    finally:
        await client.stop()
    sdk = await _sdk_paging(home, work, made["text"]["stdout_resource"], 1 << 20)  # one engine per home
    print(
        f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall figures shrink with load; "
        "'per server CPU s' does not)"
    )
    print(
        f"  {'stream':8} {'page':>6} {'resources/read MB/s':>20} {'plain pipe MB/s':>16} {'ratio':>7} "
        f"{'MB per server CPU s':>20}"
    )
    for kind, limit, ours, floor, per_cpu in rows:
        print(
            f"  {kind:8} {limit >> 20:>4} M {ours:20.0f} {floor:16.0f} {ours / floor:6.2f}x {per_cpu:20.0f}"
        )
    print(f"  text via the official SDK client (mcp 1.30, 1 MiB pages): {sdk:.0f} MB/s")
    best = max(ours for kind, _, ours, _, _ in rows if kind == "text")
    print(
        f"  target >= 200 MB/s over stdio (text, raw client): {'met' if best >= 200 else 'NOT met'} "
        f"({best:.0f})"
    )


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def _memory(home: Path, work: Path) -> None:
    client = await Raw.start(_server(home), work)
    try:
        await client.call(
            "tools/call", {"name": "run", "arguments": {"command": "seq 100000", "image": "busybox:latest"}}
        )
        base = peak = _rss(client.proc.pid)  # our unreaped child: its pid is stable
        started = time.perf_counter()
        call = asyncio.ensure_future(
            client.call(
                "tools/call",
                {
                    "name": "run",
                    "arguments": {
                        "command": f"yes 0123456789abcdef | head -c {RSS_BYTES}",
                        "image": "busybox:latest",
                        "timeout": 600,
                    },
                },
            )
        )
        while not call.done():
            peak = max(peak, _rss(client.proc.pid))
            await asyncio.sleep(0.05)
        result = (await call)["structuredContent"]["result"]
        took = time.perf_counter() - started
    finally:
        await client.stop()
    assert result["stdout_bytes"] == RSS_BYTES, result
    grew = (peak - base) / 1e6
    print(
        f"  a run printing 1 GB: {took:.1f} s ({RSS_BYTES / took / 1e6:.0f} MB/s into the spill); server RSS "
        f"{base / 1e6:.0f} MB before, peak {peak / 1e6:.0f} MB (+{grew:.1f} MB; target <= +50 MB: "
        f"{'met' if grew <= 50 else 'NOT met'})"
    )


def _prune(tmp: Path) -> None:
    from contree.engine.storage.store import ImageConfig, Store

    def build(home: Path) -> int:
        store = Store(home)
        total = 0
        try:
            stage = store.staging_dir("base")
            (stage / "etc").mkdir()
            base = store.create_image_from_layer_dirs([stage], config=ImageConfig(), tag="base:1")
            parent = base
            for i in range(PRUNE_IMAGES):
                stage = store.staging_dir("child")
                for j in range(PRUNE_FILES):
                    (stage / f"f{j}").write_bytes(os.urandom(4096))
                    total += 4096
                parent = store.create_image_from_layer_dirs([stage], parent=parent if i % 10 else base)
        finally:
            store.close()
        return total

    home = tmp / "prune-home"
    size = build(home)
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "tools", "images", "prune", "--home", str(home), "--untagged"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    took = time.perf_counter() - started
    check = subprocess.run(
        [sys.executable, "-m", "tools", "engine", "check", "--home", str(home)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    floor_home = tmp / "floor-home"
    build(floor_home)
    started = time.perf_counter()
    shutil.rmtree(floor_home / "layers")
    floor = time.perf_counter() - started
    dry_home = tmp / "dry-home"
    build(dry_home)
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tools",
            "images",
            "prune",
            "--home",
            str(dry_home),
            "--untagged",
            "--dry-run",
        ],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    dry = time.perf_counter() - started
    print(
        f"  prune --untagged of {PRUNE_IMAGES} images ({PRUNE_IMAGES * PRUNE_FILES} files, "
        f"{size / 1e6:.0f} MB): {took:.2f} s incl. interpreter start ({PRUNE_IMAGES / took:.0f} images/s, "
        f"{size / took / 1e6:.0f} MB/s); "
        f"rm -rf of the same layers {floor:.2f} s ({took / floor:.1f}x); --dry-run {dry:.2f} s; "
        f"engine check after: {'ok' if check.returncode == 0 else check.stdout}"
    )
    print("  " + out.stdout.strip().replace("\n", "; "))


def main() -> None:
    if os.geteuid() != 0:
        print("  the output benchmarks run the embedded engine: run them as root")
        return
    with tempfile.TemporaryDirectory(prefix="bench-output-") as raw:
        tmp = Path(raw)
        home, work = tmp / "home", tmp / "work"
        work.mkdir()
        _bootstrap(home)
        print("-- paging a run's whole stdout over stdio", flush=True)
        asyncio.run(_paging(home, work))
        print("-- server memory while a run prints 1 GB", flush=True)
        asyncio.run(_memory(home, work))
        print("-- images prune", flush=True)
        _prune(tmp)


if __name__ == "__main__":
    main()
