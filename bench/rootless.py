"""Rootless engine cost (`python -m bench rootless`): `echo hi` three ways, interleaved in one run.

* the rootless engine: a throwaway user's `LocalEngine` in its own namespaces (spawn -> completion);
* the root engine: `LocalEngine` in this (root) process, the same measure;
* bare rootless crun: the same user running `crun run` of the same hardened config directly.

All with networking off (the rootless engine with networking on too, for information). Targets: the
rootless engine <= 1.5x bare rootless crun and <= 2x the root engine.
The user is made like the tests make theirs (`tests/rootless_env.py`: useradd, a venv of its own with
this checkout's wheel) and removed afterwards with everything it ran.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from bench.engine import RUNS, WARMUPS, _engine_run, _local_engine, _median_ms, _row


class _Worker:
    """One side run by the user (`bench/rootless_worker.py`): each request times one `echo hi`."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, user: object, side: str) -> _Worker:
        from tests.rootless_env import RootlessUser

        assert isinstance(user, RootlessUser)
        script = user.home / "rootless_worker.py"
        script.write_bytes((Path(__file__).parent / "rootless_worker.py").read_bytes())
        work = user.home / f"bench-{side}"
        proc = await asyncio.create_subprocess_exec(
            *user.as_user([str(user.venv / "bin" / "python"), str(script), side, str(work)]),
            cwd=str(user.home), env=user.env(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        worker = cls(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 180)
        if line != b"ready\n":
            raise RuntimeError(f"the {side} worker did not start: {line!r} (exit {await proc.wait()})")
        return worker

    async def sample(self, request: bytes = b"go\n") -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(request)
        await self.proc.stdin.drain()
        return float(await asyncio.wait_for(self.proc.stdout.readline(), 120))

    async def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 60)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def _compare(user: object, work: Path) -> None:
    from contree import api

    engine, image = await _local_engine(work, 4)
    off = api.InstanceNetworking(enabled=False)
    rootless = await _Worker.start(user, "engine")
    bare = await _Worker.start(user, "crun")
    try:
        async def root() -> float:
            return (await _engine_run(engine, image, "echo hi", disposable=True, networking=off))[0]

        async def rootless_net() -> float:
            return await rootless.sample(b"net\n")

        sides = {"bare": bare.sample, "rootless": rootless.sample, "root": root, "rootless_net": rootless_net}
        samples: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(WARMUPS + RUNS):
            order = list(sides.items())
            for name, fn in order[i % 4:] + order[:i % 4]:  # each side goes first as often as the others
                took = await fn()
                if i >= WARMUPS:
                    samples[name].append(took)
    finally:
        await rootless.close()
        await bare.close()
        await engine.close()
    base = _median_ms(samples["bare"])
    print(_row("bare rootless crun run (the user, same hardened config)", samples["bare"]))
    print(_row("rootless engine spawn -> completion, networking off", samples["rootless"], base))
    print(_row("root engine spawn -> completion, networking off", samples["root"], base))
    print(_row("rootless engine, networking on (slirp4netns, filter)", samples["rootless_net"], base))
    vs_bare = _median_ms(samples["rootless"]) / base
    vs_root = _median_ms(samples["rootless"]) / _median_ms(samples["root"])
    print(f"  => rootless engine / bare rootless crun = {vs_bare:.2f}x (target <= 1.5x): "
          f"{'OK' if vs_bare <= 1.5 else 'OVER TARGET'}")
    print(f"  => rootless engine / root engine = {vs_root:.2f}x (target <= 2x): "
          f"{'OK' if vs_root <= 2 else 'OVER TARGET'}")


def echo_hi_rootless_vs_root_vs_bare_crun() -> None:
    from tests.rootless_env import throwaway_rootless_user

    started = time.perf_counter()
    with throwaway_rootless_user() as user:
        print(f"  user {user.name} made and the project installed in {time.perf_counter() - started:.1f} s")
        work = Path(tempfile.mkdtemp(prefix="contree-bench-rootless-", dir="/var/tmp"))
        try:
            asyncio.run(_compare(user, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    echo_hi_rootless_vs_root_vs_bare_crun()
