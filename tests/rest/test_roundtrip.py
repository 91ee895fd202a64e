"""RemoteBackend → REST server → FakeBackend: every Backend method survives the trip unchanged."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import AsyncIterator

import pytest

from contree import api
from contree.backend import Backend, FileQuery, GrepQuery, ImageQuery, OperationQuery
from contree.client import RemoteBackend
from contree.errors import BadRequest, Conflict, NotFound, Unprocessable
from tests.fake_backend import FakeBackend


def test_both_implement_the_protocol(client: RemoteBackend, fake: FakeBackend) -> None:
    assert isinstance(client, Backend)
    assert isinstance(fake, Backend)


async def test_images_and_tags(client: RemoteBackend, fake: FakeBackend) -> None:
    images = await client.list_images(ImageQuery())
    assert images == await fake.list_images(ImageQuery())
    assert await client.resolve_tag("busybox:latest") == fake.busybox
    assert await client.resolve_tag("tag:busybox:latest") == fake.busybox
    assert (await client.get_image(fake.busybox)).tag == "busybox:latest"
    other = fake.add_image(None, {})
    moved = await client.set_tag(other, "busybox:latest")
    assert moved.uuid == other and moved.tag == "busybox:latest"
    assert (await client.get_image(fake.busybox)).tag is None
    tagged = await client.list_images(ImageQuery(tagged=True))
    assert [i.uuid for i in tagged] == [other]
    assert await client.list_images(ImageQuery(tag="nomatch")) == []
    await client.delete_tag(other)
    assert (await client.get_image(other)).tag is None
    with pytest.raises(NotFound, match="tag not found"):
        await client.resolve_tag("busybox:latest")
    with pytest.raises(NotFound):
        await client.get_image("11111111-2222-3333-4444-555555555555")
    with pytest.raises(NotFound):
        await client.get_image("../images")


async def test_paging_and_time_filters(client: RemoteBackend, fake: FakeBackend) -> None:
    for n in range(5):
        fake.add_image(f"img{n}", {})
    page = await client.list_images(ImageQuery(limit=2, offset=1))
    assert len(page) == 2
    assert page == (await fake.list_images(ImageQuery()))[1:3]
    assert len(await client.list_images(ImageQuery(since="1h"))) == 6
    assert await client.list_images(ImageQuery(until="2000-01-01T00:00:00Z")) == []
    with pytest.raises(BadRequest, match="since"):
        await client.list_images(ImageQuery(since="yesterday"))
    with pytest.raises(BadRequest, match="limit"):
        await client.list_images(ImageQuery(limit=0))


async def test_import(client: RemoteBackend, fake: FakeBackend) -> None:
    request = api.ImageImportRequest(
        registry=api.ImageRegistry(
            url="docker://docker.io/busybox:latest",
            credentials=api.RegistryCredentials(username="u", password="secret"),
        ),
        tag="bb:1",
    )
    op = await client.import_image(request)
    record = await client.get_operation(op)
    assert record.kind == "image_import" and record.status == "SUCCESS"
    meta = record.import_metadata()
    assert meta is not None and meta.registry is not None and meta.registry.credentials is not None
    assert meta.registry.credentials.password == "<MASKED>"
    assert record.result is not None and await client.resolve_tag("bb:1") == record.result.image
    with pytest.raises(BadRequest, match="unsupported registry"):
        await client.import_image(api.ImageImportRequest(registry=api.ImageRegistry(url="ftp://x")))


async def test_files(client: RemoteBackend, fake: FakeBackend) -> None:
    content = b"hello\x00world" * 1000
    uploaded = await client.upload_file(content)
    sha = hashlib.sha256(content).hexdigest()
    assert uploaded.sha256 == sha and uploaded.size == len(content)
    assert fake.blobs[sha] == content

    async def chunks() -> AsyncIterator[bytes]:
        yield b"stream"
        yield b"ed"

    streamed = await client.upload_file(chunks())
    assert fake.blobs[streamed.sha256] == b"streamed"
    record = await client.get_file(sha)
    assert record.uuid == uploaded.uuid
    assert len(await client.list_files(FileQuery())) == 2
    with pytest.raises(NotFound):
        await client.get_file("0" * 64)
    with pytest.raises(NotFound):
        await client.get_file("not-a-digest")


async def test_spawn_and_operation(client: RemoteBackend, fake: FakeBackend) -> None:
    request = api.InstanceSpawnRequest(
        command="echo hi", image="tag:busybox:latest", shell=True, env={"A": "1"}
    )
    spawned = await client.spawn(request)
    assert spawned.image == fake.busybox and spawned.command == "echo hi" and spawned.result is None
    events = [e async for e in client.events(spawned.uuid, follow=True)]
    assert events[-1].type == "completion"
    record = await client.get_operation(spawned.uuid)
    assert record.status == "SUCCESS"
    meta = record.instance_metadata()
    assert meta is not None and isinstance(meta.result, api.InstanceResult)
    assert meta.result.stdout is not None and api.decode_stream(meta.result.stdout) == b"echo hi\n"
    summaries = await client.list_operations(OperationQuery(status="SUCCESS", kind="instance"))
    assert [s.uuid for s in summaries] == [spawned.uuid]
    with pytest.raises(Conflict):
        await client.cancel_operation(spawned.uuid)
    with pytest.raises(NotFound):
        await client.get_operation("11111111-2222-3333-4444-555555555555")


async def test_cancel_and_subprocesses(client: RemoteBackend, fake: FakeBackend) -> None:
    fake.hold.clear()
    spawned = await client.spawn(api.InstanceSpawnRequest(command="sleep", image=fake.busybox))
    spid = await client.create_subprocess(spawned.uuid, api.ExecSpec(command="ls", args=["-l"]))
    assert spid == 2
    result = await client.get_subprocess(spawned.uuid, spid)
    assert result.state is not None and result.state.pid == 12
    await client.kill_subprocess(spawned.uuid, spid, "TERM")
    await client.write_stdin(
        spawned.uuid, 1, api.ClosableStreamRepr(value="aGk=", encoding="base64", close=False)
    )
    assert fake.stdin[(spawned.uuid, 1)] == b"hi"
    await client.cancel_operation(spawned.uuid)
    assert (await client.get_operation(spawned.uuid)).status == "CANCELLED"
    with pytest.raises(Conflict):
        await client.create_subprocess(spawned.uuid, api.ExecSpec(command="ls"))
    with pytest.raises(NotFound):
        await client.get_subprocess(spawned.uuid, 9)
    fake.hold.set()


async def test_inspect(client: RemoteBackend, fake: FakeBackend) -> None:
    image = fake.add_image(None, {"/big": bytes(range(256)) * 4000, "/d": None, "/d/x.txt": b"needle here\n"})
    listing = await client.list_directory(image, "/")
    assert [i.path for i in listing.files] == ["big", "d"]
    assert (await client.list_directory_text(image, "/d")).startswith("total")
    data = b"".join([c async for c in client.download(image, "/big")])
    assert data == bytes(range(256)) * 4000
    await client.check_file(image, "/big")
    with pytest.raises(Unprocessable):
        await client.check_file(image, "/d")
    with pytest.raises(NotFound):
        await client.check_file(image, "/missing")
    with pytest.raises(Unprocessable, match="not a regular file"):
        _ = [c async for c in client.download(image, "/d")]
    tar_bytes = b"".join([c async for c in client.archive(image, "/d")])
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        assert tar.getnames() == ["x.txt"]
    await client.check_archive(image, "/d")
    with pytest.raises(NotFound):
        await client.check_archive(image, "/nope")
    found = await client.grep(image, GrepQuery(pattern=["needle"], path=["/d", "/"], glob=["*.txt"]))
    assert [(m.path, m.line_number) for m in found.matches] == [("/d/x.txt", 1)]
    assert found.path == "/d"


async def test_whoami_and_close(client: RemoteBackend) -> None:
    who = await client.whoami()
    assert who.permissions["spawn"] is True and who.limits["instance_max_timeout"] == 3600
    await client.close()
    await client.close()  # idempotent


async def test_malformed_ids_fail_on_iteration_without_a_request(client: RemoteBackend) -> None:
    stream = client.download("../images", "/etc/hosts")  # nothing sent yet
    with pytest.raises(NotFound, match="not a UUID"):
        await anext(stream)
    events = client.events("not-an-operation")
    with pytest.raises(NotFound, match="not a UUID"):
        await anext(events)
    with pytest.raises(NotFound):
        await client.get_operation("../whoami")


async def test_large_upload_streams_past_the_json_body_cap(client: RemoteBackend, fake: FakeBackend) -> None:
    size = 300 << 20  # above build_app's 256 MiB JSON cap: uploads stream instead

    async def chunks() -> AsyncIterator[bytes]:
        block = b"z" * (4 << 20)
        for _ in range(size // len(block)):
            yield block

    uploaded = await client.upload_file(chunks())
    assert uploaded.size == size and len(fake.blobs[uploaded.sha256]) == size
