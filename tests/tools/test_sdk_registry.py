"""registry_auth, import_image and the import resource through the SDK client, against a real
`docker-registry` (Debian package) with Basic auth on 127.0.0.1."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import AnyUrl

from tests.oci import harness, images
from tests.tools.conftest import mcp_session
from tests.tools.test_sdk_tools import result

USER, PASSWORD = "agent", "pat-s3cret"


@pytest.fixture
def basic_registry(tmp_path: Path) -> Iterator[harness.Registry]:
    work = tmp_path / "registry"
    work.mkdir()
    # push through an open registry sharing the storage, then serve it with Basic auth
    pusher = harness.start_registry(work / "open", work / "storage")
    try:
        harness.push_image(pusher.host, "tests/app", "1", images.multi_layer())
    finally:
        pusher.stop()
    harness.htpasswd(work / "htpasswd", USER, PASSWORD)
    reg = harness.start_registry(
        work, work / "storage", {"htpasswd": {"realm": "basic-realm", "path": str(work / "htpasswd")}}
    )
    try:
        yield reg
    finally:
        reg.stop()


async def test_registry_auth_and_import(
    engine_home: Path, workdir: Path, basic_registry: harness.Registry, tmp_path: Path
) -> None:
    host = basic_registry.host
    url = f"docker://{host}/tests/app:1"
    async with mcp_session(engine_home, workdir) as s:
        session: Any = s
        refused = await session.call_tool("import_image", {"registry_url": url})
        assert refused.isError and f"Not authenticated with '{host}'" in refused.content[0].text
        wrong = result(
            await session.call_tool(
                "registry_auth", {"registry_url": host, "username": USER, "token": "wrong"}
            )
        )
        assert wrong["status"] == "error" and "wrong" not in str(wrong)
        ok = result(
            await session.call_tool(
                "registry_auth", {"registry_url": host, "username": USER, "token": PASSWORD}
            )
        )
        assert ok == {
            "status": "success",
            "registry": host,
            "message": f"Authenticated with '{host}' as '{USER}' successfully.",
        }
        creds = engine_home / "mcp" / "registry-credentials.json"
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600

        imported = result(
            await session.call_tool("import_image", {"registry_url": url, "tag": "tests/app:1"})
        )
        assert imported["status"] == "SUCCESS", imported
        assert imported["kind"] == "image_import" and imported["result"]["tag"] == "tests/app:1"
        assert PASSWORD not in str(imported)
        files = result(await session.call_tool("list_files", {"image": "tests/app:1", "path": "/run"}))
        assert [(f["name"], f["type"]) for f in files["files"]] == [("fifo", "fifo")]
        text = await session.read_resource(AnyUrl(f"contree://operations/import/{imported['uuid']}"))
        body = text.contents[0].text
        assert body.startswith("STATE: SUCCESS\nRESULT_IMAGE: ") and f"REGISTRY_URL: {url}" in body
        wrong_kind = await session.call_tool("wait_operations", {"operation_ids": [imported["uuid"]]})
        assert result(wrong_kind)["results"][imported["uuid"]]["kind"] == "image_import"

        detached = result(await session.call_tool("import_image", {"registry_url": url, "wait": False}))
        waited = result(
            await session.call_tool(
                "wait_operations", {"operation_ids": [detached["operation_id"]], "timeout": 120}
            )
        )
        assert waited["completed"] == [detached["operation_id"]]
        # an unchanged remote image imports to the same image
        assert (
            waited["results"][detached["operation_id"]]["result_image_uuid"] == imported["result_image_uuid"]
        )
