"""Backend contract: event logs, cancel, inflight output, subprocesses and stdin (CONTREE-API §9 to §11)."""

from __future__ import annotations

import asyncio

import pytest

from contree import api
from contree.backend import Backend
from contree.errors import BackendError, Conflict, NotFound

from .conftest import result_of, run, stdout_of, wait_done

pytestmark = pytest.mark.engine


async def wait_status(
    backend: Backend, op: str, statuses: set[str], limit: float = 30
) -> api.OperationResponse:
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while True:
        resp = await backend.get_operation(op)
        if resp.status in statuses:
            return resp
        assert loop.time() < end, f"operation stuck in {resp.status}"
        await asyncio.sleep(0.05)


async def test_event_order_and_masking(backend: Backend, busybox: str) -> None:
    resp = await run(backend, busybox, "echo out; echo err >&2",
                     env={"GITHUB_TOKEN": "ghp_secret", "PLAIN": "visible"}, disposable=True)
    events = [e async for e in backend.events(resp.uuid)]
    types = [e.type for e in events]
    assert types[0] == "init"
    assert types[-2:] == ["shutdown", "completion"]
    assert types.index("spawn") < types.index("stdout") < types.index("exit") < types.index("shutdown")
    ids = [e.id for e in events]
    assert ids == sorted(set(ids))
    spawn_event = next(e for e in events if e.type == "spawn")
    assert spawn_event.spid == 1
    assert spawn_event.data["env"]["GITHUB_TOKEN"] == "<MASKED>"
    assert spawn_event.data["env"]["PLAIN"] == "visible"
    assert spawn_event.data["shell"] is True and spawn_event.data["args"][-1] == "echo out; echo err >&2"
    for event in events:
        event.payload()  # every payload matches its schema
    assert events[-1].spid is None
    assert events[-1].data["status"] == "SUCCESS"
    # metadata echoes the request as sent (only the event log masks)
    meta = resp.instance_metadata()
    assert meta is not None and meta.env is not None and meta.env["GITHUB_TOKEN"] == "ghp_secret"
    only_main = [e async for e in backend.events(resp.uuid, spid=1)]
    assert {e.spid for e in only_main} == {1}
    tail = [e async for e in backend.events(resp.uuid, since=ids[-3])]
    assert [e.id for e in tail] == ids[-2:]


async def test_follow_streams_live_output(backend: Backend, busybox: str) -> None:
    spawned = await backend.spawn(api.InstanceSpawnRequest(
        command="echo one; sleep 0.3; echo two", image=busybox, shell=True, disposable=True))
    chunks: list[str] = []
    async for event in backend.events(spawned.uuid, follow=True):
        if event.type == "stdout":
            chunks.append(event.data["value"])
        if event.type == "completion":
            break
    assert "".join(chunks) == "one\ntwo\n"


async def test_inflight_partial_output(backend: Backend, busybox: str) -> None:
    spawned = await backend.spawn(api.InstanceSpawnRequest(
        command="echo partial; sleep 20", image=busybox, shell=True, disposable=True, timeout=30))
    loop = asyncio.get_running_loop()
    end = loop.time() + 15
    while True:
        resp = await backend.get_operation(spawned.uuid, inflight=True)
        meta = resp.instance_metadata()
        result = meta.result if meta is not None else None
        if isinstance(result, api.InstanceResult) and result.stdout is not None \
                and result.stdout.value == "partial\n":
            break
        assert loop.time() < end, resp
        await asyncio.sleep(0.05)
    assert resp.status == "EXECUTING"
    assert result.state is not None and result.state.exit_code == -1
    await backend.cancel_operation(spawned.uuid)
    await wait_done(backend, spawned.uuid)


async def test_cancel_kills_and_leaves_no_image(backend: Backend, busybox: str) -> None:
    spawned = await backend.spawn(api.InstanceSpawnRequest(
        command="touch /created; sleep 30", image=busybox, shell=True, timeout=60))
    await wait_status(backend, spawned.uuid, {"EXECUTING"})
    await asyncio.sleep(0.2)
    await backend.cancel_operation(spawned.uuid)
    done = await wait_done(backend, spawned.uuid, limit=20)
    assert done.status == "CANCELLED"
    assert done.result_image_uuid is None
    with pytest.raises(Conflict):
        await backend.cancel_operation(spawned.uuid)
    with pytest.raises(NotFound):
        await backend.get_subprocess(spawned.uuid, 1)


async def test_cancel_of_queued_operation(backend: Backend, busybox: str) -> None:
    whoami = await backend.whoami()
    limit = whoami.limits["instance_max_concurrency"]
    blockers = [await backend.spawn(api.InstanceSpawnRequest(
        command="sleep 30", image=busybox, shell=True, disposable=True, timeout=60)) for _ in range(limit)]
    queued = await backend.spawn(api.InstanceSpawnRequest(command="true", image=busybox, disposable=True))
    await asyncio.sleep(0.1)
    assert (await backend.get_operation(queued.uuid)).status == "PENDING"
    await backend.cancel_operation(queued.uuid)
    done = await wait_done(backend, queued.uuid)
    assert done.status == "CANCELLED"
    for blocker in blockers:
        await backend.cancel_operation(blocker.uuid)
    for blocker in blockers:
        assert (await wait_done(backend, blocker.uuid)).status == "CANCELLED"


async def test_subprocess_with_stdin_and_main_stdin_kept_open(backend: Backend, busybox: str) -> None:
    spawned = await backend.spawn(api.InstanceSpawnRequest(
        command="cat > /main-in; echo main-done", image=busybox, shell=True, timeout=60,
        stdin=api.ClosableStreamRepr(value="first ", close=False)))
    await wait_status(backend, spawned.uuid, {"EXECUTING"})
    for _ in range(100):
        try:
            spid = await backend.create_subprocess(spawned.uuid, api.ExecSpec(
                command="cat; echo sub-done", shell=True,
                stdin=api.ClosableStreamRepr(value="x", close=False)))
            break
        except BackendError as exc:
            if exc.status != 425:
                raise
            await asyncio.sleep(0.05)
    assert spid == 2
    await backend.write_stdin(spawned.uuid, spid, api.ClosableStreamRepr(value="yz\n"))
    for _ in range(200):
        sub = await backend.get_subprocess(spawned.uuid, spid)
        if sub.state is not None and sub.state.exit_code != -1:
            break
        await asyncio.sleep(0.05)
    assert sub.stdout is not None and api.decode_stream(sub.stdout) == b"xyz\nsub-done\n"
    assert sub.state is not None and sub.state.exit_code == 0
    await backend.write_stdin(spawned.uuid, 1, api.ClosableStreamRepr(value="second\n", close=True))
    done = await wait_done(backend, spawned.uuid)
    assert done.status == "SUCCESS"
    assert stdout_of(done) == "main-done\n"
    assert done.result_image_uuid
    check = await run(backend, done.result_image_uuid, "cat /main-in", disposable=True)
    assert stdout_of(check) == "first second\n"
    with pytest.raises(BackendError) as gone:
        await backend.write_stdin(spawned.uuid, 1, api.ClosableStreamRepr(value="late"))
    assert gone.value.status == 410


async def test_kill_subprocess_and_closed_stdin_conflict(backend: Backend, busybox: str) -> None:
    spawned = await backend.spawn(api.InstanceSpawnRequest(
        command="sleep 30", image=busybox, shell=True, disposable=True, timeout=60))
    await wait_status(backend, spawned.uuid, {"EXECUTING"})
    await asyncio.sleep(0.2)
    spid = await backend.create_subprocess(spawned.uuid, api.ExecSpec(command="sleep 30", shell=True))
    with pytest.raises(Conflict):
        await backend.write_stdin(spawned.uuid, spid, api.ClosableStreamRepr(value="x"))
    await backend.kill_subprocess(spawned.uuid, spid, "TERM")
    for _ in range(100):
        sub = await backend.get_subprocess(spawned.uuid, spid)
        if sub.state is not None and sub.state.signal != -1:
            break
        await asyncio.sleep(0.05)
    assert sub.state is not None and sub.state.signal == 15 and sub.state.exit_code == -1
    await backend.kill_subprocess(spawned.uuid, 1)
    done = await wait_done(backend, spawned.uuid)
    assert done.status == "SUCCESS"
    assert result_of(done).state.signal == 9  # type: ignore[union-attr]


async def test_unknown_operation_is_404(backend: Backend) -> None:
    with pytest.raises(NotFound):
        await backend.get_operation("00000000-0000-4000-8000-000000000000")


async def test_whoami_reports_limits(backend: Backend) -> None:
    who = await backend.whoami()
    assert who.permissions["spawn"] and who.permissions["import"]
    assert who.limits["instance_max_timeout"] >= 60
    assert who.token_uuid


async def test_failed_import_masks_password_and_reports_error(backend: Backend) -> None:
    request = api.ImageImportRequest(
        registry=api.ImageRegistry(url="oci-layout:/nonexistent/layout:latest",
                                   credentials=api.RegistryCredentials(username="u", password="hunter2")),
        tag="never/imported:1")
    op = await backend.import_image(request)
    done = await wait_done(backend, op)
    assert done.kind == "image_import"
    assert done.status == "FAILED" and done.error
    assert done.image_uuid is None and done.result_image_uuid is None
    meta = done.import_metadata()
    assert meta is not None and meta.registry is not None and meta.registry.credentials is not None
    assert meta.registry.credentials.password == "<MASKED>"
    assert "hunter2" not in str(done)
    with pytest.raises(NotFound):
        await backend.resolve_tag("never/imported:1")
