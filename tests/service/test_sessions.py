"""Agent sessions sharing one engine, driven by the official SDK client (mcp 1.30) over stdio exactly as a
user starts them: `contree-mcp` with no flags, on the default home of a (temporary) user.

Two sessions initialize and run side by side, an image made in one is read in the other, a `wait=false`
run outlives the session that started it, a `wait=true` run outlives a client that goes away, a third
session comes later, and five servers started at once end up on exactly one engine service.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import McpError
from pydantic import AnyUrl

from contree.service.control import ControlConnection, probe
from tests.service.conftest import mounts_under, wait_for
from tests.service_util import TEST_IDLE_EXIT, stop_service
from tests.tools.conftest import require_engine_host, seed_busybox, server_command
from tests.tools.test_sdk_tools import result

SEQ = "".join(f"{i}\n" for i in range(1, 20001))  # ~109 KB: far beyond the result's 8000-byte cut


async def read_all(session: Any, uri: str) -> str:
    """A paged output resource read to its end (`_meta.next_offset` until it reaches `total_bytes` of a
    `complete` stream)."""
    text, offset = "", 0
    for _ in range(1000):
        item = (await session.read_resource(AnyUrl(f"{uri}?offset={offset}"))).contents[0]
        text += item.text
        offset = item.meta["next_offset"]
        if item.meta["complete"] and offset >= item.meta["total_bytes"]:
            return text
    raise AssertionError(f"{uri} did not end")


class User:
    """A throwaway user environment: HOME and XDG_DATA_HOME in tmp_path, no Contree settings, so
    `contree-mcp` picks the embedded engine and its default home `$XDG_DATA_HOME/contree-mcp`."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "user"
        self.home = self.root / ".local" / "share" / "contree-mcp"
        self.work = tmp_path / "work"
        self.work.mkdir()
        self.log = tmp_path / "servers-stderr.log"
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("CONTREE_", "NEBIUS_", "XDG_"))}
        self.env = {
            **keep,
            "HOME": str(self.root),
            "XDG_DATA_HOME": str(self.root / ".local" / "share"),
            "XDG_CONFIG_HOME": str(self.root / ".config"),
            "CONTREE_ENGINE_IDLE_EXIT": TEST_IDLE_EXIT,
            "PYTHONUNBUFFERED": "1",
        }


@pytest.fixture
def user(tmp_path: Path) -> Any:
    require_engine_host()
    person = User(tmp_path)
    seed_busybox(person.home)
    try:
        yield person
    finally:
        stop_service(person.home)


@asynccontextmanager
async def stdio_session(user: User) -> AsyncIterator[Any]:
    command, *args = server_command()
    params = StdioServerParameters(command=command, args=args, cwd=str(user.work), env=user.env)
    with open(user.log, "a") as errlog:  # noqa: ASYNC230
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


class Held:
    """A session held open by a task of its own (the SDK's contexts must close in the task that opened
    them), so several can open at the same time and each can end while the others go on."""

    def __init__(self, user: User) -> None:
        self.user = user
        self.session: Any = None
        self._opened = asyncio.Event()
        self._close = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> Held:
        self._task = asyncio.create_task(self._hold())
        opened = asyncio.create_task(self._opened.wait())
        await asyncio.wait([self._task, opened], return_when=asyncio.FIRST_COMPLETED)
        opened.cancel()
        if not self._opened.is_set():
            await self._task  # raises why it could not open
        return self

    async def _hold(self) -> None:
        async with stdio_session(self.user) as session:
            self.session = session
            self._opened.set()
            await self._close.wait()

    async def close(self) -> None:
        """End the session; returns once the server process has exited."""
        self._close.set()
        if self._task is not None:
            await self._task

    async def run(self, command: str, **arguments: Any) -> Any:
        arguments.setdefault("image", "busybox:latest")
        return result(await self.session.call_tool("run", {"command": command, **arguments}))


async def test_sessions_on_the_default_home_share_one_engine_and_work_outlives_them(user: User) -> None:
    a, b = await asyncio.gather(Held(user).open(), Held(user).open())  # two servers start together
    try:
        ran_a, ran_b = await asyncio.gather(a.run("echo from-a"), b.run("echo from-b"))
        assert (ran_a["stdout"], ran_b["stdout"]) == ("from-a\n", "from-b\n")
        status = probe(user.home)
        assert status is not None and len(status.clients) == 2, status  # one service, both attached

        made = await a.run("echo shared > /shared.txt", disposable=False)
        image = made["result_image_uuid"]
        read = result(await b.session.call_tool("read_file", {"image": image, "path": "/shared.txt"}))
        assert read["content"] == "shared\n"
        busybox = result(await b.session.call_tool("get_image", {"image": "busybox:latest"}))["uuid"]
        lineage = (await b.session.read_resource(AnyUrl(f"contree://image/{image}/lineage"))).contents[0]
        view = json.loads(lineage.text)  # the engine's own records, seen from the other session
        assert view["parent"] == busybox and view["depth"] == 1 and view["is_known"] is True

        # a directory state made by rsync in one session is injected by a run of the other
        (user.work / "proj").mkdir()
        (user.work / "proj" / "greet.sh").write_text("echo synced in a\n")
        state_id = result(
            await a.session.call_tool("rsync", {"source": str(user.work / "proj"), "destination": "/proj"})
        )
        assert (await b.run("sh /proj/greet.sh", directory_state_id=state_id))["stdout"] == "synced in a\n"

        detached = {"command": "sleep 5; seq 1 20000", "image": image, "wait": False}
        op = result(await a.session.call_tool("run", detached))["operation_id"]
        await a.close()  # A's server exits while its run goes on
        await wait_for(lambda: (s := probe(user.home)) is not None and len(s.clients) == 1)
        status = probe(user.home)
        assert status is not None and status.running_operations == 1, status

        waited = result(await b.session.call_tool("wait_operations", {"operation_ids": [op], "timeout": 120}))
        assert waited["results"][op]["status"] == "SUCCESS" and waited["results"][op]["exit_code"] == 0
        assert await read_all(b.session, f"contree://operations/instance/{op}/stdout") == SEQ
    finally:
        await asyncio.gather(a.close(), b.close())

    c = await Held(user).open()  # a third session, later, sees all of it
    try:
        got = result(await c.session.call_tool("get_operation", {"operation_id": op}))
        assert got["status"] == "SUCCESS"
        assert (await c.run("cat /shared.txt", image=image))["stdout"] == "shared\n"
    finally:
        await c.close()
    with ControlConnection(user.home, pin=True) as service:
        service.stop("now")
        assert service.wait_exit(60)
    assert mounts_under(user.home) == []


async def test_a_waiting_run_outlives_a_client_that_goes_away(user: User) -> None:
    a = await Held(user).open()
    call = asyncio.create_task(a.run("sleep 3; echo finished anyway"))
    await wait_for(lambda: (s := probe(user.home)) is not None and s.running_operations == 1)
    await a.close()  # the client goes away mid-call (no notifications/cancelled)
    call.cancel()
    b = await Held(user).open()
    try:
        listed = result(await b.session.call_tool("list_operations", {"type": "instance"}))
        [op] = [o["uuid"] for o in listed["operations"]]
        waited = result(await b.session.call_tool("wait_operations", {"operation_ids": [op], "timeout": 60}))
        assert waited["results"][op]["status"] == "SUCCESS"
        assert waited["results"][op]["stdout"] == "finished anyway\n"
    finally:
        await b.close()


async def test_five_servers_started_at_once_share_exactly_one_service(user: User) -> None:
    sessions = await asyncio.gather(*(Held(user).open() for _ in range(5)))
    try:
        outputs = await asyncio.gather(*(s.run(f"echo session-{i}") for i, s in enumerate(sessions)))
        assert [o["stdout"] for o in outputs] == [f"session-{i}\n" for i in range(5)]
        status = probe(user.home)
        assert status is not None and len(status.clients) == 5, status
        def services() -> list[str]:
            return _top_processes(lambda line: "contree.service" in line and str(user.home) in line)

        await wait_for(lambda: len(services()) == 1, 20)  # the losers of the race attached and exited
    finally:
        await asyncio.gather(*(s.close() for s in sessions))


async def test_an_engine_that_cannot_start_is_a_clear_error_for_the_client(
    user: User, tmp_path: Path
) -> None:
    broken = tmp_path / "not-a-dir"
    broken.write_text("x")
    user.env["XDG_DATA_HOME"] = str(broken)
    command, *args = server_command()
    params = StdioServerParameters(command=command, args=args, cwd=str(user.work), env=user.env)
    error: McpError | None = None
    with open(user.log, "a") as errlog:  # noqa: ASYNC230
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as session:
                try:
                    await session.initialize()
                except McpError as exc:
                    error = exc
    home = broken / "contree-mcp"
    assert error is not None and error.error.code == -32603
    assert str(error).startswith(f"the engine at {home} could not start: ") and "\n" not in str(error)
    stderr = user.log.read_text()
    assert "Traceback" not in stderr
    assert f"[ERROR] {error}\n" in stderr


def _top_processes(matches: Callable[[str], bool]) -> list[str]:
    """Command lines of the matching processes, one snapshot, leaving out those whose parent matches too
    (a service's own forked helpers carry its command line until they exec)."""
    found: dict[str, tuple[str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = (entry / "status").read_text()
        except OSError:
            continue
        if matches(line):
            parent = next((r.split()[1] for r in status.splitlines() if r.startswith("PPid:")), "")
            found[entry.name] = (parent, line)
    return [line for parent, line in found.values() if parent not in found]
