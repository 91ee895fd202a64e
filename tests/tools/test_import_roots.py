"""import_image reads local image sources (oci:, oci-archive:, docker-archive:) only inside the allowed roots
(COMPAT §15 item 7's rule applied to images): the tool refuses first, and the engine the CLI opens checks
again when it opens the source."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from contree import api
from tests.oci.harness import Entry, build_image
from tests.service_util import stop_service
from tests.tools.conftest import mcp_session, require_engine_host
from tests.tools.fakes import FakeBackend, call, make_registry


def write_layout(path: Path) -> None:
    """A one-layer OCI image layout directory (uncompressed layer, no external tool needed)."""
    image = build_image([[Entry("hello.txt", data=b"hi from a layout\n")]], compression="none")
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for digest, data in {**image.blobs, image.manifest_digest: image.manifest}.items():
        (blobs / digest.split(":", 1)[1]).write_bytes(data)
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": image.manifest_digest,
                "size": len(image.manifest),
            }
        ],
    }
    (path / "index.json").write_text(json.dumps(index))


def text_of(out: dict[str, Any]) -> str:
    return str(out["content"][0]["text"])


async def test_a_symlink_out_of_the_roots_is_refused(tmp_path: Path) -> None:
    backend = FakeBackend()
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.tar").write_bytes(b"not yours")
    (root / "innocent.tar").symlink_to(outside / "secret.tar")
    reg, state = make_registry(backend, tmp_path, roots=[root])
    out = await call(reg, "import_image", {"registry_url": f"oci-archive:{root / 'innocent.tar'}"})
    assert out["isError"] and "is outside the allowed roots" in text_of(out)
    assert "--allowed-root" in text_of(out) and backend.imports == []
    await state.close()


async def test_an_out_of_root_archive_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    backend = FakeBackend()
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "other.tar").write_bytes(b"x")
    reg, state = make_registry(backend, tmp_path, roots=[root])
    out = await call(reg, "import_image", {"registry_url": f"docker-archive:{tmp_path / 'other.tar'}"})
    assert text_of(out).endswith(
        f"image source {tmp_path / 'other.tar'} is outside the allowed roots ({root}); "
        "start the server with --allowed-root to allow it"
    )
    assert backend.imports == []
    await state.close()


@pytest.mark.slow
async def test_the_engine_refuses_sources_outside_its_import_roots(tmp_path: Path) -> None:
    """What a symlink swapped in after the tool's check would meet: the engine's own check."""
    require_engine_host()
    from contree.engine.local import LocalEngine

    root = tmp_path / "root"
    write_layout(tmp_path / "outside-layout")
    root.mkdir()
    os.symlink(tmp_path / "outside-layout", root / "layout")
    engine = LocalEngine(tmp_path / "engine", import_roots=(str(root),))
    await engine.start()
    try:
        request = api.ImageImportRequest(registry=api.ImageRegistry(url=f"oci:{root / 'layout'}"))
        op_id = await engine.import_image(request)
        op = await poll_terminal(engine, op_id)
        assert op.status == "FAILED" and "outside the directories allowed" in (op.error or "")
    finally:
        await engine.close()


async def poll_terminal(engine: Any, op_id: str) -> api.OperationResponse:
    for _ in range(600):
        op = await engine.get_operation(op_id)
        if op.status in ("SUCCESS", "FAILED", "CANCELLED"):
            return op
        await asyncio.sleep(0.1)
    pytest.fail(f"import {op_id} did not finish in 60 s")


@pytest.mark.slow
async def test_an_in_root_layout_imports_through_the_server(tmp_path: Path, workdir: Path) -> None:
    require_engine_host()
    write_layout(workdir / "layout")
    try:
        async with mcp_session(tmp_path / "engine", workdir) as session:
            result = await session.call_tool(  # type: ignore[attr-defined]
                "import_image", {"registry_url": f"oci:{workdir / 'layout'}", "tag": "from-layout:v1"}
            )
            out = result.structuredContent["result"]
            assert not result.isError and out["status"] == "SUCCESS", out
            assert out["result"]["tag"] == "from-layout:v1"
            read = await session.call_tool(  # type: ignore[attr-defined]
                "read_file", {"image": "from-layout:v1", "path": "/hello.txt"}
            )
            assert not read.isError and "hi from a layout" in read.content[0].text
    finally:
        stop_service(tmp_path / "engine")
