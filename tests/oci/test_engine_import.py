"""End to end on the embedded engine: an image pushed to a loopback registry is imported as an operation,
runs with its env and workdir applied, and its files are readable through inspect."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from contree import api
from contree.engine.local import LocalEngine
from contree.engine.storage.bootstrap import build_busybox_rootfs
from tests.oci import harness
from tests.oci.harness import Entry, Registry

pytestmark = pytest.mark.engine


async def wait_done(engine: LocalEngine, op: str, limit: float) -> api.OperationResponse:
    async def follow() -> None:
        async for event in engine.events(op, follow=True):
            if event.type == "completion":
                return

    await asyncio.wait_for(follow(), limit)
    return await engine.get_operation(op)


async def run(engine: LocalEngine, image: str, command: str) -> api.OperationResponse:
    spawned = await engine.spawn(
        api.InstanceSpawnRequest(command=command, image=image, shell=True, disposable=True)
    )
    return await wait_done(engine, spawned.uuid, 60)


def stdout_of(resp: api.OperationResponse) -> str:
    meta = resp.instance_metadata()
    assert meta is not None and isinstance(meta.result, api.InstanceResult), resp
    assert meta.result.stdout is not None
    return api.decode_stream(meta.result.stdout).decode()


def _require_engine_host() -> None:
    if os.geteuid() != 0:
        pytest.fail("importing into the embedded engine needs root")
    if shutil.which("crun") is None:
        pytest.fail("crun not found: install the Debian package crun")
    if not Path("/bin/busybox").is_file():
        pytest.fail("/bin/busybox not found: install the Debian package busybox-static")


def _tar_of(root: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for entry in sorted(root.rglob("*")):
            tf.add(entry, arcname=str(entry.relative_to(root)), recursive=False)
    return buf.getvalue()


@pytest.fixture(scope="module")
def app_image(open_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    _require_engine_host()
    rootfs = tmp_path_factory.mktemp("bb") / "rootfs"
    build_busybox_rootfs(rootfs)
    base = _tar_of(rootfs)
    app = [
        Entry("srv", "dir", mode=0o755),
        Entry("srv/app", "dir", mode=0o755),
        Entry("srv/app/hello.txt", data=b"hello from the layer\n"),
        Entry("bin/.wh.vi"),
    ]
    image = harness.build_image(
        [base, app],
        config={
            "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hi from config"],
            "WorkingDir": "/srv/app",
            "Cmd": ["/bin/sh"],
        },
    )
    harness.push_image(open_registry.host, "e2e/app", "v1", image)
    return f"docker://{open_registry.host}/e2e/app:v1"


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[LocalEngine]:
    eng = LocalEngine(tmp_path / "home")
    await eng.start()
    try:
        yield eng
    finally:
        await eng.close()


async def test_imported_image_runs_with_env_and_workdir(engine: LocalEngine, app_image: str) -> None:
    op = await engine.import_image(
        api.ImageImportRequest(registry=api.ImageRegistry(url=app_image), tag="e2e/app:v1")
    )
    done = await wait_done(engine, op, limit=120)
    assert done.status == "SUCCESS", done
    image = await engine.resolve_tag("e2e/app:v1")
    assert done.result_image_uuid == image

    resp = await run(engine, image, 'echo "$GREETING"; pwd; cat hello.txt; test -e /bin/vi || echo vi-gone')
    assert resp.status == "SUCCESS"
    assert stdout_of(resp) == "hi from config\n/srv/app\nhello from the layer\nvi-gone\n"

    listing = await engine.list_directory(image, "/srv/app")
    assert [f.path.rsplit("/", 1)[-1] for f in listing.files] == ["hello.txt"]
    data = b"".join([chunk async for chunk in engine.download(image, "/srv/app/hello.txt")])
    assert data == b"hello from the layer\n"

    again = await wait_done(
        engine,
        await engine.import_image(api.ImageImportRequest(registry=api.ImageRegistry(url=app_image))),
        limit=60,
    )
    assert again.status == "SUCCESS" and again.result_image_uuid == image


async def test_failed_import_is_a_failed_operation(engine: LocalEngine, open_registry: Registry) -> None:
    op = await engine.import_image(
        api.ImageImportRequest(registry=api.ImageRegistry(url=f"{open_registry.host}/e2e/missing:v1"))
    )
    done = await wait_done(engine, op, limit=60)
    assert done.status == "FAILED"
    assert "not found" in (done.error or "")
