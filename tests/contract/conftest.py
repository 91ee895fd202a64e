"""The `backend` fixture of the Backend contract suite.

Param "local" is a `LocalEngine` in `tmp_path`; "remote" = RemoteBackend → REST server (TCP, token) →
that engine; "service" = ServiceBackend → the home's unix socket → the engine service hosting a
LocalEngine of its own (what every MCP server uses). Every contract test runs against each. Each backend
starts with one image tagged `busybox:latest` (`busybox` fixture = its UUID).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from contree import api
from contree.backend import Backend
from contree.engine.local import LocalEngine
from contree.engine.storage.bootstrap import build_busybox_rootfs
from contree.engine.storage.store import ImageConfig
from tests import prereqs

BUSYBOX_TAG = "busybox:latest"


def require_engine_host() -> None:
    prereqs.require_engine_host("the contract suite runs the embedded engine and needs root")


@pytest.fixture(scope="session")
def busybox_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_engine_host()
    root = tmp_path_factory.mktemp("contract-busybox") / "rootfs"
    build_busybox_rootfs(root)
    return root


def seed_busybox(engine: LocalEngine, tree: Path) -> str:
    """Register a copy of the busybox tree as `busybox:latest` in the engine's store; returns its UUID."""
    store = engine.store
    assert store is not None
    stage = store.staging_dir("seed")
    layer = stage / "layer"
    shutil.copytree(tree, layer, symlinks=True)
    image = store.create_image_from_layer_dirs(
        [layer],
        config=ImageConfig(env=["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "IMAGE_VAR=from-image"]),
        tag=BUSYBOX_TAG,
    )
    shutil.rmtree(stage, ignore_errors=True)
    return image.uuid


async def local_engine(home: Path, tree: Path) -> LocalEngine:
    engine = LocalEngine(home)
    await engine.start()
    seed_busybox(engine, tree)
    return engine


@pytest.fixture(params=["local", "remote", "service"])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, busybox_tree: Path
) -> AsyncIterator[Backend]:
    if request.param == "service":
        async with hosted_service(tmp_path / "home", busybox_tree) as client:
            yield client
        return
    engine = await local_engine(tmp_path / "home", busybox_tree)
    try:
        if request.param == "remote":
            async with served(engine) as client:
                yield client
        else:
            yield engine
    finally:
        await engine.close()


@contextlib.asynccontextmanager
async def served(engine: LocalEngine) -> AsyncIterator[Backend]:
    """RemoteBackend → REST server (loopback, token auth) → `engine`."""
    from aiohttp.test_utils import TestServer

    from contree.client import RemoteBackend
    from contree.rest import build_app

    server = TestServer(build_app(engine, token="contract-token", keepalive=1.0), host="127.0.0.1")
    await server.start_server()
    client = RemoteBackend(str(server.make_url("")), token="contract-token", timeout=120, backoff=0.05)
    try:
        yield client
    finally:
        await client.close()
        await server.close()


@contextlib.asynccontextmanager
async def hosted_service(home: Path, tree: Path) -> AsyncIterator[Backend]:
    """ServiceBackend → `home/engine.sock` → EngineService (run in this event loop) → LocalEngine."""
    from contree.service.client import ServiceBackend
    from contree.service.server import EngineService

    service = EngineService(home, idle_exit=None, handle_signals=False)
    reports: list[tuple[str, str]] = []
    reported = asyncio.Event()

    def report(kind: str, message: str) -> None:
        reports.append((kind, message))
        reported.set()

    task = asyncio.create_task(service.serve(report))
    try:
        async with asyncio.timeout(60):
            await asyncio.wait([task, asyncio.ensure_future(reported.wait())], return_when="FIRST_COMPLETED")
        assert reports and reports[0][0] == "ready", (reports, task)
        assert service.engine.store is not None
        seed_busybox(service.engine, tree)
        client = ServiceBackend(home, client_name="contract")
        await client.connect()
        try:
            yield client
        finally:
            await client.close()
    finally:
        service.request_stop("now")
        await task


@pytest.fixture
async def busybox(backend: Backend) -> str:
    return await backend.resolve_tag(BUSYBOX_TAG)


async def wait_done(backend: Backend, op: str, limit: float = 60) -> api.OperationResponse:
    """Follow the event log to `completion`, then read the operation."""

    async def follow() -> None:
        async for event in backend.events(op, follow=True):
            if event.type == "completion":
                return

    await asyncio.wait_for(follow(), limit)
    resp = await backend.get_operation(op)
    assert resp.status in api.TERMINAL_STATUSES, resp
    return resp


async def run(backend: Backend, image: str, command: str, **fields: object) -> api.OperationResponse:
    fields.setdefault("shell", True)
    request = api.InstanceSpawnRequest(command=command, image=image, **fields)  # type: ignore[arg-type]
    spawned = await backend.spawn(request)
    return await wait_done(backend, spawned.uuid)


def result_of(resp: api.OperationResponse) -> api.InstanceResult:
    meta = resp.instance_metadata()
    assert meta is not None and isinstance(meta.result, api.InstanceResult), resp
    return meta.result


def stdout_of(resp: api.OperationResponse) -> str:
    out = result_of(resp).stdout
    assert out is not None
    return api.decode_stream(out).decode()


def stderr_of(resp: api.OperationResponse) -> str:
    err = result_of(resp).stderr
    assert err is not None
    return api.decode_stream(err).decode()
