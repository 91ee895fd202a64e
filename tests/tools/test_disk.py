"""delete_image and whoami's disk_usage through the official SDK client on the embedded engine, and
what they say on the Contree cloud (which has no image deletion)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.tools.conftest import mcp_session
from tests.tools.fakes import FakeBackend, call, make_registry
from tests.tools.test_sdk_tools import result


def error_of(res: Any) -> str:
    assert res.isError, res.structuredContent
    return str(res.content[0].text)


async def test_delete_image_frees_disk_and_refuses_what_must_stay(engine_home: Path, workdir: Path) -> None:
    async with mcp_session(engine_home, workdir) as s:
        session: Any = s

        async def made(image: str, command: str) -> str:
            done = result(
                await session.call_tool("run", {"command": command, "image": image, "disposable": False})
            )
            assert done["exit_code"] == 0, done
            return str(done["result_image_uuid"])

        payload = "head -c 2000000 /dev/urandom > /payload"
        parent = await made("busybox:latest", payload)
        child = await made(parent, "echo child > /child")
        leaf = await made("busybox:latest", payload)
        busy = await made("busybox:latest", "echo busy > /busy")
        usage = result(await session.call_tool("whoami", {}))["disk_usage"]
        assert usage["images"] == 5 and usage["tagged_images"] == 1
        assert usage["reclaimable_images"] == 4 and usage["reclaimable_bytes"] >= 4_000_000
        assert usage["total_bytes"] >= usage["layer_bytes"] >= 4_000_000

        tagged = error_of(await session.call_tool("delete_image", {"image": "busybox:latest"}))
        assert "tagged 'busybox:latest'" in tagged and "remove the tag first" in tagged
        assert "parent of 1 other image" in error_of(
            await session.call_tool("delete_image", {"image": parent})
        )
        running = result(
            await session.call_tool("run", {"command": "sleep 30", "image": busy, "wait": False})
        )["operation_id"]
        for _ in range(200):
            status = result(await session.call_tool("get_operation", {"operation_id": running}))["status"]
            if status == "EXECUTING":
                break
            await asyncio.sleep(0.05)
        assert "in use" in error_of(await session.call_tool("delete_image", {"image": busy}))
        await session.call_tool("cancel_operation", {"operation_id": running})

        gone = result(await session.call_tool("delete_image", {"image": leaf}))
        assert gone["uuid"] == leaf and gone["deleted"] is True and gone["freed_bytes"] >= 2_000_000
        missing = await session.call_tool("get_image", {"image": leaf})
        assert missing.isError and "not found" in missing.content[0].text
        after = result(await session.call_tool("whoami", {}))["disk_usage"]
        assert after["layer_bytes"] == usage["layer_bytes"] - gone["freed_bytes"]
        assert after["images"] == 4
        # children first, then the parent: lineage stays whole
        result(await session.call_tool("delete_image", {"image": child}))
        assert result(await session.call_tool("delete_image", {"image": parent}))["deleted"] is True
        tools = {t.name for t in (await session.list_tools()).tools}
        assert "delete_image" in tools and len(tools) == 29


async def test_on_the_cloud_delete_image_says_how_images_go_away(tmp_path: Path) -> None:
    backend = FakeBackend()
    image = backend.add_image(None)
    reg, state = make_registry(backend, tmp_path)
    out = await call(reg, "delete_image", {"image": image})
    assert out["isError"] and 'set_tag(image_uuid=<uuid>, tag="")' in out["content"][0]["text"]
    me = (await call(reg, "whoami", {}))["structuredContent"]
    assert me["disk_usage"] is None
    await state.close()
