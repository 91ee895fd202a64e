"""Helpers shared by the runtime, isolation and network tests (no tests here).

Every runtime is opened through `open_runtime`, which closes it and then asserts that nothing it created
is left on the host: iptables chains, cgroups, network namespaces, veths, runtime state.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from contree.engine.runtime import paths
from contree.engine.runtime.netns import NetworkInfo
from contree.engine.runtime.paths import NETNS_DIR
from contree.engine.runtime.sandbox import RuntimeConfig, SandboxExit, SandboxRuntime, SandboxSpec
from contree.engine.runtime.subids import engine_range
from contree.engine.runtime.userns import IdMap
from contree.engine.storage.overlay import mount_overlay
from tests.engine.conftest import require_binary, require_root


def require_runtime_prereqs() -> None:
    require_root()
    require_binary("crun", "crun")
    require_binary("runc", "runc")
    require_binary("ip", "iproute2")
    require_binary("iptables-restore", "iptables")


def leftovers(rt: SandboxRuntime) -> list[str]:
    found = []
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    found += [f"iptables chain {c}" for c in rt.network.chains() if c in rules]
    if rt.cgroups.exists(None):
        found.append(f"cgroup {rt.cgroups.parent}")
    if NETNS_DIR.is_dir():
        found += [f"netns {n}" for n in os.listdir(NETNS_DIR) if n.startswith(f"contree-{rt.network.tag}-")]
    if rt.network.egress_cgroup is not None and rt.network.egress_cgroup.exists():
        found.append(f"egress cgroup {rt.network.egress_cgroup}")
    if rt.root_dir.exists():
        found.append(f"runtime state {rt.root_dir}")
    if rt.bundles.exists():
        found.append(f"bundles {rt.bundles}")
    if paths._engine_lock_path(rt.engine_id).exists():
        found.append(f"engine lock file of {rt.engine_id}")
    deadline = time.monotonic() + 3
    while True:  # veth pairs disappear asynchronously once their namespace is freed
        links = [n for n in os.listdir("/sys/class/net") if n.startswith(rt.network.if_prefix)]
        if not links or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    found += [f"veth {n}" for n in links]
    return found


@contextlib.asynccontextmanager
async def open_runtime(state: Path, **config: Any) -> AsyncIterator[SandboxRuntime]:
    require_runtime_prereqs()
    rt = await SandboxRuntime.create(RuntimeConfig(state_dir=state / "runtime", **config))
    try:
        yield rt
    finally:
        await rt.close()
        left = leftovers(rt)
        assert not left, f"left behind after close: {left}"


_idmap: IdMap | None = None


def overlay_rootfs(lower: Path, tmp: Path, *, userns: bool = True) -> Path:
    """A writable overlay over `lower` (the caller's `mount_guard` unmounts it), prepared the way the
    engine prepares it for a runtime with a user namespace (the default) unless `userns=False`."""
    global _idmap
    box = tmp / f"box-{uuid.uuid4().hex[:8]}"
    upper, work, merged = box / "upper", box / "work", box / "merged"
    for d in (upper, work, merged):
        d.mkdir(parents=True)
    if not userns:
        mount_overlay([lower], upper, work, merged)
        return merged
    if _idmap is None:
        ids = engine_range()  # the range every runtime uses, so any of them can use this rootfs
        _idmap = IdMap.create(ids.uid, ids.size, gid_base=ids.gid)
    with _idmap.lowers([lower]) as views:
        mount_overlay(views, upper, work, merged)
    _idmap.shift_in(upper, merged)
    return merged


class Result(msgspec.Struct, kw_only=True):
    exit: SandboxExit
    out: str
    err: str
    network: NetworkInfo


async def run(rt: SandboxRuntime | RootlessRuntime, rootfs: Path, script: str, *, stdin: bytes | None = None,
              kill_after: float | None = None, wait_timeout: float = 60, **spec: Any) -> Result:
    """Run `sh -c script` to completion (or kill it after `kill_after` s) and clean the sandbox up."""
    if isinstance(rt, RootlessRuntime):  # the same script, run as the throwaway user (rootless_host.py)
        return await rt.run(script, stdin=stdin, kill_after=kill_after, wait_timeout=wait_timeout, **spec)
    sandbox = await rt.start(SandboxSpec(sandbox_id=f"t{uuid.uuid4().hex[:10]}", rootfs=rootfs,
                                         argv=["sh", "-c", script], stdin=stdin is not None, **spec))
    try:
        if sandbox.stdin is not None:
            if stdin:
                sandbox.stdin.write(stdin)
                await sandbox.stdin.drain()
            sandbox.stdin.close()
        waiter = asyncio.ensure_future(asyncio.gather(sandbox.stdout.read(), sandbox.stderr.read(),
                                                      sandbox.wait()))
        if kill_after is not None:
            done, _ = await asyncio.wait({waiter}, timeout=kill_after)
            if not done:
                await sandbox.kill()
        out, err, exit_ = await asyncio.wait_for(waiter, wait_timeout)
        return Result(exit=exit_, out=out.decode(errors="replace"), err=err.decode(errors="replace"),
                      network=msgspec.structs.replace(sandbox.network))
    finally:
        await sandbox.cleanup()


def fail_unless(cond: bool, message: str) -> None:
    if not cond:
        pytest.fail(message)


class RootlessRuntime:
    """The isolation suite's handle on a rootless `SandboxRuntime` running as the throwaway user
    (`rootless_host.py`): `run` takes the same arguments as the module's `run` and returns a `Result`."""

    rootless = True

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def request(self, data: dict[str, Any], patience: float = 120) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(msgspec.json.encode(data) + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), patience)
        if not line:
            pytest.fail(f"the rootless runtime host exited ({await self.proc.wait()}); see its log")
        answer: dict[str, Any] = msgspec.json.decode(line)
        if "error" in answer:
            pytest.fail(f"the rootless runtime host failed: {answer['error']}")
        return answer

    async def run(self, script: str, *, stdin: bytes | None = None, kill_after: float | None = None,
                  wait_timeout: float = 60, **spec: Any) -> Result:
        answer = await self.request({"op": "run", "script": script, "kill_after": kill_after,
                                     "wait_timeout": wait_timeout, "spec": spec,
                                     "stdin": stdin.decode() if stdin is not None else None},
                                    patience=wait_timeout + 60)
        self.upper: dict[str, list[int]] = answer["upper"]
        return Result(exit=msgspec.convert(answer["exit"], SandboxExit), out=answer["out"], err=answer["err"],
                      network=msgspec.convert(answer["network"], NetworkInfo))


@contextlib.asynccontextmanager
async def open_rootless_runtime(user: Any) -> AsyncIterator[RootlessRuntime]:
    """A rootless runtime of the throwaway `user` (tests/rootless_env.py), closed afterwards."""
    from tests.rootless_env import RootlessUser

    assert isinstance(user, RootlessUser)
    work = user.home / f"isolation-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    os.chown(work, user.uid, user.gid)
    script = work / "rootless_host.py"
    script.write_bytes((Path(__file__).parent / "rootless_host.py").read_bytes())
    with open(user.home / "rootless-host.log", "ab") as log:  # noqa: ASYNC230
        proc = await asyncio.create_subprocess_exec(
            *user.as_user([str(user.venv / "bin" / "python"), str(script), str(work)]), cwd=str(user.home),
            env=user.env(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log)
    host = RootlessRuntime(proc)
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 120)
        if not ready:
            log_text = (user.home / "rootless-host.log").read_text()[-3000:]
            pytest.fail(f"the rootless runtime host did not start: {log_text}")
        assert msgspec.json.decode(ready) == {"ready": True, "rootless": True}
        yield host
    finally:
        with contextlib.suppress(Exception):
            if proc.returncode is None:
                await host.request({"op": "close"}, patience=60)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
