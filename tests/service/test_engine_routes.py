"""What the service adds to the REST API for its MCP clients: each client's allowed roots checked by the
engine when it opens a local image source, the engine's lineage, and the sync chunk store."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from contree import api
from contree.errors import BadRequest
from tests.service.conftest import service_client, wait_status
from tests.tools.test_import_roots import write_layout


async def test_each_client_s_roots_bound_its_local_imports(engine_home: Path, tmp_path: Path) -> None:
    """Two clients of one service with different allowed roots: the engine re-checks the roots of the
    client that asked when it opens the source (a symlink swapped in after the tool's check)."""
    root = tmp_path / "root"
    root.mkdir()
    write_layout(tmp_path / "outside-layout")
    os.symlink(tmp_path / "outside-layout", root / "layout")
    request = api.ImageImportRequest(registry=api.ImageRegistry(url=f"oci:{root / 'layout'}"))
    async with (
        service_client(engine_home, "narrow", import_roots=[str(root)]) as narrow,
        service_client(engine_home, "wide", import_roots=[str(tmp_path)]) as wide,
    ):
        refused = await wait_status(narrow, await narrow.import_image(request), {"SUCCESS", "FAILED"})
        assert refused.status == "FAILED" and "outside the directories allowed" in (refused.error or "")
        imported = await wait_status(wide, await wide.import_image(request), {"SUCCESS", "FAILED"})
        assert imported.status == "SUCCESS", imported
        with pytest.raises(BadRequest, match="absolute"):
            relative = type(narrow)(engine_home, import_roots=["relative/dir"])
            try:
                await relative.connect()
                await relative.import_image(request)
            finally:
                await relative.close()


async def test_lineage_and_chunks_through_the_socket(engine_home: Path) -> None:
    import xxhash

    async with service_client(engine_home) as client:
        busybox = await client.resolve_tag("busybox:latest")
        spawned = await client.spawn(
            api.InstanceSpawnRequest(command="touch /x", image=busybox, shell=True, disposable=False)
        )
        done = await wait_status(client, spawned.uuid, {"SUCCESS", "FAILED"})
        child = done.result_image_uuid
        assert child is not None
        lineage = await client.image_lineage(child)
        assert lineage.parent is not None and lineage.parent.uuid == busybox
        assert lineage.depth == 1 and lineage.root.uuid == busybox

        store = client.chunk_store
        a, b = b"a" * 70_000, b"b" * 50_000
        da, db = xxhash.xxh3_128_hexdigest(a), xxhash.xxh3_128_hexdigest(b)
        assert await store.missing_chunks([da, db]) == {da, db}
        await store.put_chunks([(da, a)])
        assert await store.missing_chunks([da, db]) == {db}
        with pytest.raises(BadRequest, match="hashes to"):
            await store.put_chunks([(db, a)])  # content must match its digest
        await store.put_chunks([(db, b)])
        whole = await store.assemble([da, db, da])
        assert whole.size == 190_000
        [small] = await store.put_files([b"tiny"])
        assert small.size == 4
        unknown = "00000000-0000-4000-8000-000000000000"
        assert await store.missing_files([whole.uuid, small.uuid, unknown]) == {unknown}
        got = await client.get_file(whole.sha256)
        assert got.uuid == whole.uuid


async def test_a_run_followed_through_the_socket_ends_with_its_record(engine_home: Path) -> None:
    """The service's event stream ends with the operation's record (`follow_to_end`), so following a run
    to its end takes no request after `completion`; the record is the one a GET returns."""
    from contree.backend import RecordFollower
    from tools.waiting import follow_until_terminal

    async with service_client(engine_home) as client:
        assert isinstance(client, RecordFollower)
        request = api.InstanceSpawnRequest(command="echo hi", image="tag:busybox:latest", shell=True)
        spawned = await client.spawn(request)
        seen = [e async for e in client.follow_to_end(spawned.uuid)]
        assert [getattr(e, "type", None) for e in seen[-2:]] == ["completion", None]
        record = seen[-1]
        assert isinstance(record, api.OperationResponse) and record.status == "SUCCESS"
        assert record == await client.get_operation(spawned.uuid)

        gets = []
        real_get = client.get_operation

        async def counted(operation_id: str, *, inflight: bool = False) -> api.OperationResponse:
            gets.append(operation_id)
            return await real_get(operation_id, inflight=inflight)

        client.get_operation = counted  # type: ignore[method-assign]
        again = await client.spawn(request)
        loop = asyncio.get_running_loop()
        seen_types: list[str] = []

        async def on_event(event: api.OperationEvent) -> None:
            seen_types.append(event.type)

        done = await follow_until_terminal(client, again.uuid, loop.time() + 60, on_event)
        assert done.status == "SUCCESS" and done.uuid == again.uuid and gets == []
        assert seen_types[-1] == "completion" and "stdout" in seen_types
        assert (done.metadata or {}).get("result", {}).get("stdout", {}).get("value") == "hi\n"
