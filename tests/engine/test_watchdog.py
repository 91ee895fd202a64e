"""Sandboxes end with their engine and with their deadline, whatever happens to the engine's process
(issue 17, item 7). The engine runs in a child process here, as it does in an MCP server or a service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from contree.engine.local import LocalEngine
from contree.engine.runtime import hostcheck
from contree.engine.runtime.cgroups import CgroupManager
from contree.engine.runtime.paths import NETNS_DIR
from contree.engine.storage.bootstrap import build_busybox_rootfs
from contree.engine.storage.overlay import mounts_under
from tests.contract.conftest import run
from tests.engine.conftest import require_root
from tests.engine.test_userns import _find_process

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]
RELEASED_WITHIN = 10.0  # seconds; the watchdog takes well under one on an idle machine

# The child: an engine with NAT networking running one sandbox; it reports what the sandbox holds on
# the host and then waits to be stopped or killed.
CHILD = r"""
import asyncio, json, shutil, sys
from pathlib import Path
from contree import api
from contree.engine.local import LocalEngine

async def main(home, tree, command, timeout):
    engine = LocalEngine(Path(home))
    await engine.start()
    store = engine.store
    stage = store.staging_dir("seed")
    shutil.copytree(tree, stage / "layer", symlinks=True)
    image = store.create_image_from_layer_dirs([stage / "layer"], tag="busybox:latest").uuid
    spawned = await engine.spawn(api.InstanceSpawnRequest(command=command, shell=True, image=image,
                                                          timeout=int(timeout)))
    rt = engine.runtime
    watchdog = getattr(engine, "watchdog", None)
    print(json.dumps({"op": spawned.uuid, "tag": rt.network.tag, "if_prefix": rt.network.if_prefix,
                      "engine_id": rt.engine_id, "cgroup_parent": rt.cgroups.parent,
                      "dirs": [str(rt.bundles), str(rt.rootfs_binds), str(rt.root_dir)],
                      "watchdog": watchdog.pid if watchdog is not None else None}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_root()
    root = tmp_path_factory.mktemp("wd") / "busybox"
    build_busybox_rootfs(root)
    return root


class Hosted:
    """The child process hosting an engine, and what its sandbox holds on the host."""

    def __init__(self, proc: subprocess.Popen[bytes], info: dict[str, Any], home: Path) -> None:
        self.proc = proc
        self.info = info
        self.home = home

    def leftovers(self) -> list[str]:
        tag, engine_id = self.info["tag"], self.info["engine_id"]
        found = [f"mount {p}" for p in mounts_under(self.home)]
        if NETNS_DIR.is_dir():
            found += [f"netns {n}" for n in os.listdir(NETNS_DIR) if n.startswith(f"contree-{tag}-")]
        rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
        found += [f"iptables chain {c}" for c in sorted(set(rules.split())) if c.startswith(f"CT-{tag}-")]
        if CgroupManager(hostcheck.detect(), self.info["cgroup_parent"]).exists(None):
            found.append(f"cgroup {self.info['cgroup_parent']} of engine {engine_id}")
        found += [f"dir {d}" for d in self.info["dirs"] if os.path.exists(d)]
        found += [f"veth {n}" for n in os.listdir("/sys/class/net") if n.startswith(self.info["if_prefix"])]
        return found


@contextlib.asynccontextmanager
async def hosted_engine(tmp_path: Path, tree: Path, command: str, run_timeout: int) -> AsyncIterator[Hosted]:
    """Start the child and wait for its report; at the end kill it and recover the home with an engine
    of our own, so nothing is left even when the test failed."""
    home = tmp_path / "home"
    proc = subprocess.Popen(  # noqa: ASYNC220 - a plain child we SIGKILL, no asyncio plumbing wanted
        [sys.executable, "-c", CHILD, str(home), str(tree), command, str(run_timeout)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert line, proc.stderr.read().decode() if proc.stderr else "the child said nothing"
        yield Hosted(proc, json.loads(line), home)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.to_thread(proc.wait, 30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        engine = LocalEngine(home)
        await engine.start()
        await engine.close()


def _pidfd_exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])


async def _until(check: Any, limit: float) -> float:
    """Seconds until `check()` is true (at most `limit`, then whatever it is)."""
    started = time.monotonic()
    while not check() and time.monotonic() - started < limit:  # noqa: ASYNC110 - polling the host
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _network_ready(hosted: Hosted) -> None:
    prefix = f"contree-{hosted.info['tag']}-"
    await _until(lambda: any(n.startswith(prefix) for n in os.listdir(NETNS_DIR)), 30)
    assert any(n.startswith(prefix) for n in os.listdir(NETNS_DIR)), "the sandbox got no network namespace"


async def test_sigkill_of_the_engines_process_releases_its_sandboxes_at_once(tmp_path: Path,
                                                                              tree: Path) -> None:
    async with hosted_engine(tmp_path, tree, "exec sleep 600.25", run_timeout=20) as hosted:
        sleeper = os.pidfd_open(await _find_process("sleep", "600.25"))
        try:
            await _network_ready(hosted)
            assert hosted.leftovers(), "nothing to release: the test would prove nothing"
            hosted.proc.send_signal(signal.SIGKILL)
            took = await _until(lambda: _pidfd_exited(sleeper) and not hosted.leftovers(), RELEASED_WITHIN)
            assert _pidfd_exited(sleeper), f"the sandbox's sleep outlived its engine by {took:.1f} s"
            assert hosted.leftovers() == [], f"left {took:.1f} s after the engine died"
            print(f"released {took:.2f} s after the engine died")
            assert "died; released what it left" in (hosted.home / "watchdog.log").read_text()
        finally:
            os.close(sleeper)
        if hosted.info["watchdog"] is not None:
            with contextlib.suppress(ProcessLookupError):
                watchdog = os.pidfd_open(hosted.info["watchdog"])
                try:
                    await _until(lambda: _pidfd_exited(watchdog), 5)
                    assert _pidfd_exited(watchdog), "the watchdog did not exit after its work"
                finally:
                    os.close(watchdog)


async def test_a_sandbox_dies_at_its_deadline_while_the_engine_is_stopped(tmp_path: Path, tree: Path) -> None:
    """SIGSTOP (a debugger, Ctrl-Z of a stdio server in a terminal) freezes the engine's own timeout."""
    from contree.engine.runtime.watchdog import GRACE

    timeout = 2
    async with hosted_engine(tmp_path, tree, "exec sleep 600.75", run_timeout=timeout) as hosted:
        sleeper = os.pidfd_open(await _find_process("sleep", "600.75"))
        try:
            hosted.proc.send_signal(signal.SIGSTOP)
            took = await _until(lambda: _pidfd_exited(sleeper), timeout + GRACE + RELEASED_WITHIN)
            assert _pidfd_exited(sleeper), f"the sandbox outlived its {timeout} s timeout by {took:.0f} s"
            assert took >= timeout, "killed before its deadline"
            assert hosted.proc.poll() is None, "the engine itself must be left alone"
        finally:
            os.close(sleeper)
            hosted.proc.send_signal(signal.SIGCONT)


async def test_a_dead_watchdog_is_replaced_and_a_closing_engine_stops_it(tmp_path: Path, tree: Path) -> None:
    engine = LocalEngine(tmp_path / "home")
    await engine.start()
    try:
        assert engine.store is not None and engine.watchdog is not None
        first = engine.watchdog._proc
        assert first is not None
        first.kill()
        first.wait(10)
        stage = engine.store.staging_dir("seed")
        shutil.copytree(tree, stage / "layer", symlinks=True)
        image = engine.store.create_image_from_layer_dirs([stage / "layer"]).uuid
        done = await run(engine, image, "echo hi", disposable=True)
        assert done.status == "SUCCESS"
        second = engine.watchdog._proc
        assert second is not None and second is not first and second.poll() is None
    finally:
        await engine.close()
    assert second.wait(10) == 0, "the watchdog did not exit when its engine closed"


async def test_a_stopped_watchdog_never_blocks_the_engine(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    require_root()
    from contree.engine.runtime.watchdog import Watchdog

    dog = Watchdog.start(engine_id="feedc0de", cgroup_parent="/contree-engine/feedc0de", home=tmp_path)
    proc = dog._proc
    assert proc is not None
    proc.send_signal(signal.SIGSTOP)
    try:
        def flood() -> None:  # far more than a pipe holds
            for i in range(3000):
                dog.deadline(f"sandbox-{i:05d}-with-a-long-enough-name", time.monotonic() + 3600)

        await asyncio.wait_for(asyncio.to_thread(flood), 30)
        assert "does not read its pipe" in caplog.text
    finally:
        proc.send_signal(signal.SIGCONT)
        dog.stop()
    assert proc.wait(10) == 0


# The child for long-lived sandboxes: an engine running one sandbox with NAT networking, a background
# process, a server and a port forward to it, reporting what it holds before it waits to be killed.
SANDBOX_CHILD = r"""
import asyncio, json, shutil, sys
from pathlib import Path
from contree import api
from contree.engine.local import LocalEngine
from contree.sandbox_api import SandboxRequest

async def main(home, tree, marker):
    engine = LocalEngine(Path(home))
    await engine.start()
    store = engine.store
    stage = store.staging_dir("seed")
    shutil.copytree(tree, stage / "layer", symlinks=True)
    store.create_image_from_layer_dirs([stage / "layer"], tag="busybox:latest")
    box = await engine.start_sandbox(SandboxRequest(image="tag:busybox:latest", networking=True))
    sid = box.uuid
    await engine.create_subprocess(sid, api.ExecSpec(command=f"exec sleep {marker}", shell=True))
    await engine.create_subprocess(sid, api.ExecSpec(
        command="mkdir -p /www && echo up > /www/index.html && exec httpd -f -p 8080 -h /www", shell=True))
    for _ in range(100):  # the server listens
        spid = await engine.create_subprocess(sid, api.ExecSpec(
            command="wget -qO- http://127.0.0.1:8080/", shell=True, timeout=5))
        done = await engine.wait_subprocess(sid, spid, 10)
        if done.state.exit_code == 0:
            break
        await asyncio.sleep(0.1)
    forward = await engine.expose_port(sid, 8080)
    rt = engine.runtime
    print(json.dumps({"sandbox": sid, "host_port": forward.host_port, "tag": rt.network.tag,
                      "if_prefix": rt.network.if_prefix, "engine_id": rt.engine_id,
                      "cgroup_parent": rt.cgroups.parent,
                      "dirs": [str(rt.bundles), str(rt.rootfs_binds), str(rt.root_dir)],
                      "watchdog": engine.watchdog.pid}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.parametrize("frozen", [False, True], ids=["running", "frozen-mid-snapshot"])
async def test_sigkill_of_the_engine_releases_a_long_lived_sandbox_and_its_forward(
        tmp_path: Path, tree: Path, frozen: bool) -> None:
    """A sandbox holds more than a run (its init, background processes, a port forward, and, while a
    snapshot copies its files, a frozen cgroup): all of it goes when its engine is SIGKILLed."""
    marker = "600.5" if frozen else "600.45"
    home = tmp_path / "home"
    proc = subprocess.Popen(  # noqa: ASYNC220 - a plain child we SIGKILL, no asyncio plumbing wanted
        [sys.executable, "-c", SANDBOX_CHILD, str(home), str(tree), marker],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 90)
        assert line, proc.stderr.read().decode() if proc.stderr else "the child said nothing"
        hosted = Hosted(proc, json.loads(line), home)
        sid, host_port = hosted.info["sandbox"], hosted.info["host_port"]
        sleeper = os.pidfd_open(await _find_process("sleep", marker))
        try:
            await _network_ready(hosted)
            status, body = await asyncio.to_thread(_http_get, f"http://127.0.0.1:{host_port}/")
            assert (status, body) == (200, b"up\n")
            cgroups = CgroupManager(hostcheck.detect(), hosted.info["cgroup_parent"])
            assert cgroups.exists(sid), "the sandbox has no cgroup: the test would prove nothing"
            if frozen:  # what a snapshot does while it copies the sandbox's files
                assert cgroups.freeze(sid)
            proc.send_signal(signal.SIGKILL)
            took = await _until(lambda: _pidfd_exited(sleeper) and not hosted.leftovers(), RELEASED_WITHIN)
            assert _pidfd_exited(sleeper), f"the sandbox's sleep outlived its engine by {took:.1f} s"
            assert hosted.leftovers() == [], f"left {took:.1f} s after the engine died"
            assert not cgroups.exists(sid)
            assert _refused(host_port), "the port forward outlived its engine"
            assert "died; released what it left" in (home / "watchdog.log").read_text()
        finally:
            os.close(sleeper)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.to_thread(proc.wait, 30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        engine = LocalEngine(home)
        await engine.start()
        await engine.close()


def _http_get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read()


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(5)
        return sock.connect_ex(("127.0.0.1", port)) != 0
