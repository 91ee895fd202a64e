"""Issue 17 item 8 through the real server: rsync answers when a file turns into a FIFO between its scan
and its read, and the stdio server exits promptly on stdin EOF even while a sync's reading thread is stuck
in a syscall (the engine still cleans up). Hooks in `tests.tools.hooked_server` make both deterministic."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.tools.conftest import require_engine_host

ROOT = Path(__file__).resolve().parents[2]
INIT = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}


def server_argv(home: Path, root: Path) -> list[str]:
    return [
        sys.executable, "-m", "tests.tools.hooked_server", "--backend", "local", "--home", str(home),
        "--allowed-root", str(root),
    ]  # fmt: skip


def server_env(**hooks: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **hooks}


@contextlib.contextmanager
def writer_for(fifo: Path) -> Iterator[None]:
    """At the end, a reader still stuck on `fifo` (the bug) is let go, so a failing test ends."""
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW))


async def test_rsync_answers_when_a_file_turns_into_a_fifo(engine_home: Path, workdir: Path) -> None:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    src = workdir / "proj"
    src.mkdir()
    (src / "main.py").write_text("print(1)\n")
    (src / "data.txt").write_text("data\n")
    fifo = src / "data.txt"
    command, *args = server_argv(engine_home, workdir)
    params = StdioServerParameters(
        command=command, args=args, cwd=str(ROOT), env=server_env(CONTREE_TEST_SWAP_FOR_FIFO=str(fifo))
    )
    with writer_for(fifo), open(workdir.parent / "server-stderr.log", "a") as errlog:  # noqa: ASYNC230
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                result = await session.call_tool(
                    "rsync",
                    {"source": str(src), "destination": "/app"},
                    read_timeout_seconds=timedelta(seconds=30),
                )
    assert result.isError
    text = result.content[0].text  # type: ignore[union-attr]
    assert f"{fifo} became a FIFO while it was synced; sync again" in text


def _send(proc: subprocess.Popen[bytes], message: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(message).encode() + b"\n")
    proc.stdin.flush()


def test_stdio_server_exits_on_eof_while_a_sync_is_stuck_in_a_syscall(
    engine_home: Path, workdir: Path
) -> None:
    require_engine_host()
    src = workdir / "proj"
    src.mkdir()
    (src / "main.py").write_text("print(1)\n")
    fifo = workdir / "never-written"
    os.mkfifo(fifo)
    log_path = workdir.parent / "server-stderr.log"
    with open(log_path, "ab") as errlog:
        proc = subprocess.Popen(
            server_argv(engine_home, workdir), cwd=ROOT, env=server_env(CONTREE_TEST_BLOCK_READ=str(fifo)),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errlog,
        )  # fmt: skip
    with writer_for(fifo):
        try:
            _send(proc, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT})
            assert proc.stdout is not None and b'"id":1' in proc.stdout.readline().replace(b" ", b"")
            _send(proc, {"jsonrpc": "2.0", "method": "notifications/initialized"})
            call = {"name": "rsync", "arguments": {"source": str(src), "destination": "/app"}}
            _send(proc, {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": call})
            deadline = time.monotonic() + 60
            while not Path(f"{fifo}.blocked").exists():
                assert proc.poll() is None and time.monotonic() < deadline, "the sync never started reading"
                time.sleep(0.05)
            assert proc.stdin is not None
            proc.stdin.close()  # the client goes away while the reading thread is stuck in open()
            try:
                code = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pytest.fail("the server did not exit within 10 s of stdin EOF")
            # 0: it left through its clean-up path (engine closed, sandboxes and mounts released)
            assert code == 0
            log = log_path.read_text()
            assert "Traceback" not in log
            with open("/proc/self/mountinfo") as mounts:
                assert str(engine_home) not in mounts.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


async def test_upload_of_a_file_swapped_for_a_fifo_after_its_checks_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.tools.fakes import FakeBackend, call, make_registry
    from tools import sync_tools

    path = tmp_path / "upload.bin"
    path.write_bytes(b"payload")
    real_require = sync_tools.require_inside

    def require_then_swap(*args: Any, **kwargs: Any) -> Any:
        checked = real_require(*args, **kwargs)
        path.unlink()
        os.mkfifo(path)
        return checked

    monkeypatch.setattr(sync_tools, "require_inside", require_then_swap)
    reg, state = make_registry(FakeBackend(), tmp_path)
    with writer_for(path):
        out = await asyncio.wait_for(call(reg, "upload", {"path": str(path)}), 30)
    assert out.get("isError") and "not a regular file (a FIFO)" in out["content"][0]["text"]
    await state.close()
