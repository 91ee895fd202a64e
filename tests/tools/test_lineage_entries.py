"""Lineage entries say what made each image — its operation, command and time — so branches of one
image can be told apart: from the engine's own records, and from the edges recorded for a cloud."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import AnyUrl

from tests.tools.conftest import mcp_session
from tests.tools.fakes import FakeBackend, FakeContext, call, make_registry
from tests.tools.test_sdk_tools import result


async def test_branches_of_an_image_are_told_apart_on_the_engine(engine_home: Path, workdir: Path) -> None:
    async with mcp_session(engine_home, workdir) as s:
        session: Any = s

        async def step(image: str, command: str) -> tuple[str, str]:
            done = result(
                await session.call_tool("run", {"command": command, "image": image, "disposable": False})
            )
            return done["result_image_uuid"], done["uuid"]

        base, base_op = await step("busybox:latest", "echo base > /base")
        left, left_op = await step(base, "echo left > /branch")
        right, right_op = await step(base, "echo right > /branch")
        view = json.loads(
            (await session.read_resource(AnyUrl(f"contree://image/{base}/lineage"))).contents[0].text
        )
        assert sorted(view["children"]) == sorted([left, right])
        entries = view["entries"]
        assert entries[left]["command"] == "echo left > /branch" and entries[left]["operation_id"] == left_op
        assert (
            entries[right]["command"] == "echo right > /branch" and entries[right]["operation_id"] == right_op
        )
        assert entries[left]["created_at"] <= entries[right]["created_at"]
        assert view["data"]["command"] == "echo base > /base" and view["data"]["operation_id"] == base_op
        root = view["ancestors"][-1]
        assert entries[root]["tag"] == "busybox:latest" and "command" not in entries[root]


async def test_recorded_lineage_keeps_command_time_and_operation(tmp_path: Path) -> None:
    backend = FakeBackend()
    reg, state = make_registry(backend, tmp_path)
    a = backend.busybox
    b, c = backend.add_image(None), backend.add_image(None)
    for child, command in ((b, "make left"), (c, "make right " + "x" * 300)):
        op = backend.add_op(
            "SUCCESS",
            image_uuid=a,
            result_image_uuid=child,
            metadata={"command": command, "env": {"TOKEN": "secret-value"}},
        )
        await call(reg, "get_operation", {"operation_id": op})
    contents = await reg.read_resource(f"contree://image/{a}/lineage", FakeContext())  # type: ignore[arg-type]
    view = json.loads(contents[0].text or "")
    assert view["children"] == [b, c]
    assert view["entries"][b]["command"] == "make left" and view["entries"][b]["operation_id"]
    assert len(view["entries"][c]["command"]) == 200 and view["entries"][c]["command"].endswith("…")
    assert view["entries"][b]["created_at"].endswith("+00:00")
    assert "secret-value" not in contents[0].text
    child_view = json.loads(
        (await reg.read_resource(f"contree://image/{b}/lineage", FakeContext()))[0].text  # type: ignore[arg-type]
        or ""
    )
    assert child_view["data"]["command"] == "make left" and child_view["parent"] == a
    await state.close()
