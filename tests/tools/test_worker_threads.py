"""The server's default executor: results and errors come back like ThreadPoolExecutor's, and a worker
stuck in a blocking call never holds up shutdown (nor, being a daemon, the interpreter's exit)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tools.worker_threads import WorkerThreads


async def test_to_thread_work_runs_on_it() -> None:
    loop = asyncio.get_running_loop()
    pool = WorkerThreads(max_workers=2)
    loop.set_default_executor(pool)
    names = await asyncio.gather(
        *(asyncio.to_thread(lambda: threading.current_thread().name) for _ in range(8))
    )
    assert set(names) <= {"worker_0", "worker_1"}
    with pytest.raises(ZeroDivisionError):
        await asyncio.to_thread(lambda: 1 / 0)


def test_shutdown_gives_a_stuck_worker_only_the_grace_period() -> None:
    pool = WorkerThreads(grace=0.2)
    release = threading.Event()
    stuck = pool.submit(release.wait)
    queued = [pool.submit(time.sleep, 0) for _ in range(3)]
    started = time.monotonic()
    pool.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - started < 5  # bounded by the grace period, not by the stuck call
    assert not stuck.done() and all(f.done() for f in queued)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(time.sleep, 0)
    release.set()
    assert stuck.result(5) is True


def test_a_stuck_worker_does_not_keep_the_interpreter_alive() -> None:
    code = textwrap.dedent(
        """
        import asyncio, os, threading
        from tools.worker_threads import WorkerThreads

        async def main():
            asyncio.get_running_loop().set_default_executor(WorkerThreads(grace=0.2))
            r, w = os.pipe()
            asyncio.get_running_loop().run_in_executor(None, os.read, r, 1)  # never answered
            await asyncio.sleep(0.1)

        asyncio.run(main())
        print("done")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr
