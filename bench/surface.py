"""MCP surface benchmark: what the per-principal scoping and list_files paging cost, side by side.

Tools are called through the registry (no transport) on the in-memory backend of the tool tests, so the
figures are the tools layer's own cost:

* get_image, read_file and list_images (1,000 images, 100 of them the caller's) for a scoped principal vs
  an unscoped server (the scoping tables live in SQLite files, as in production);
* list_files of a 100,000-entry directory: one page (the tool) vs converting and encoding the whole
  listing (what the tool did before it paged).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from contree import api
from tests.tools.fakes import FakeBackend, FakeContext, call, make_registry
from tools.inspect_tools import file_entry

ALICE = FakeContext("alice")


async def _per_call(n: int, fn: Callable[[], Awaitable[Any]]) -> float:
    """Microseconds per call (best of three rounds of `n`)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            await fn()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


async def _scoping(work: Path) -> list[tuple[str, float, float]]:
    rows = []
    servers = {}
    for scoped in (False, True):
        backend = FakeBackend()
        reg, state = make_registry(backend, work / f"scoped-{scoped}", scoped_operations=scoped)
        mine = ""
        for i in range(1000):
            if i % 10 == 0:
                args = {"command": "x", "image": "busybox:latest", "disposable": False, "wait": False}
                op = (await call(reg, "run", args, ALICE))["structuredContent"]["result"]["operation_id"]
                mine = backend.add_image(None, {"/etc/hostname": b"box\n"})
                backend.finish(op, result_image=mine)
                await call(reg, "get_operation", {"operation_id": op}, ALICE)
            else:
                backend.add_image(None)
        servers[scoped] = (reg, state, mine)
    calls: list[tuple[str, int, dict[str, Any]]] = [
        ("get_image (own image)", 300, {"image": "{mine}"}),
        ("read_file (own image)", 300, {"image": "{mine}", "path": "/etc/hostname"}),
        ("list_images (1,000 images)", 20, {}),
    ]
    for label, n, args in calls:
        tool = label.split()[0]
        timing = []
        for scoped in (False, True):
            reg, _, mine = servers[scoped]
            filled = {k: v.format(mine=mine) for k, v in args.items()}

            async def one(reg: Any = reg, tool: str = tool, filled: dict[str, Any] = filled) -> None:
                out = await call(reg, tool, filled, ALICE)
                assert not out.get("isError"), out

            timing.append(await _per_call(n, one))
        rows.append((label, timing[1], timing[0]))
    for _, state, _ in servers.values():
        await state.close()
    return rows


class _BigDirectory(FakeBackend):
    def __init__(self, count: int) -> None:
        super().__init__()
        item = dict(
            size=1, owner=0, group=0, mode=0o100644, mtime=0, nlink=1, uid=0, gid=0, is_dir=False,
            is_regular=True, is_symlink=False, is_socket=False, is_fifo=False, symlink_to="",
        )  # fmt: skip
        self.listing = api.DirectoryList(
            path="/big", files=[api.FileItem(path=f"entry-{i:06d}", **item) for i in range(count)]
        )

    async def list_directory(self, image_uuid: str, path: str) -> api.DirectoryList:
        return self.listing


async def _paging(work: Path) -> tuple[float, float, int, int]:
    backend = _BigDirectory(100_000)
    reg, state = make_registry(backend, work / "paging")
    args = {"image": "busybox:latest", "path": "/big"}
    page = await call(reg, "list_files", args)
    page_bytes = len(msgspec.json.encode(page))

    async def whole() -> bytes:
        listing = await backend.list_directory("", "/big")
        entries = [file_entry("/big", item) for item in listing.files]
        doc = {"path": "/big", "count": len(entries), "files": entries}
        structured = msgspec.json.encode(doc)
        return structured + msgspec.json.format(structured, indent=2)

    whole_bytes = len(await whole())
    paged_us = await _per_call(20, lambda: call(reg, "list_files", args))
    whole_us = await _per_call(3, whole)
    await state.close()
    return paged_us, whole_us, page_bytes, whole_bytes


async def _run(work: Path) -> None:
    print(f"{'measure':34} {'scoped µs':>10} {'unscoped µs':>12} {'ratio':>7}")
    for label, scoped, unscoped in await _scoping(work):
        print(f"{label:34} {scoped:10.0f} {unscoped:12.0f} {scoped / unscoped:6.2f}x")
    paged, whole, page_bytes, whole_bytes = await _paging(work)
    print(
        f"list_files, 100,000 entries: one page {paged / 1000:.1f} ms ({page_bytes / 1024:.0f} KiB) vs the "
        f"whole listing {whole / 1000:.0f} ms ({whole_bytes / 1024 / 1024:.1f} MiB): {whole / paged:.0f}x"
    )


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="contree-bench-surface-"))
    try:
        asyncio.run(_run(work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
