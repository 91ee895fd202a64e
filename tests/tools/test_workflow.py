"""The agent workflow, end to end through the SDK client on the embedded engine: list images → install
something with disposable=false → tag it → branch three parallel runs → wait_operations → read a produced
file via the resource → roll back to the parent image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import AnyUrl

from tests.tools.conftest import mcp_session
from tests.tools.test_sdk_tools import result


async def test_agent_workflow(engine_home: Path, workdir: Path) -> None:
    async with mcp_session(engine_home, workdir) as s:
        session: Any = s
        images = result(await session.call_tool("list_images", {"tag_prefix": "busybox"}))["images"]
        base = images[0]["uuid"]

        # "install" a tool: a script on PATH plus its config, kept as a new image
        install = result(
            await session.call_tool(
                "run",
                {
                    "command": "mkdir -p /etc/greeter && "
                    "printf '#!/bin/sh\\necho \"hello $1 from $(cat /etc/greeter/name)\"\\n' "
                    "> /usr/bin/greet && chmod +x /usr/bin/greet && echo v1 > /etc/greeter/name",
                    "image": base,
                    "disposable": False,
                },
            )
        )
        assert install["exit_code"] == 0 and install["filesystem_changed"] is True
        installed = install["result_image_uuid"]
        tagged = result(
            await session.call_tool(
                "set_tag", {"image_uuid": installed, "tag": "tests/greeter/busybox:latest"}
            )
        )
        assert tagged["uuid"] == installed

        # branch: three runs from the same tagged image, in parallel
        ops = [
            result(
                await session.call_tool(
                    "run",
                    {
                        "command": f"greet branch-{i} > /result.txt && echo {i} >> /result.txt",
                        "image": "tag:tests/greeter/busybox:latest",
                        "disposable": False,
                        "wait": False,
                    },
                )
            )["operation_id"]
            for i in range(3)
        ]
        waited = result(
            await session.call_tool("wait_operations", {"operation_ids": ops, "mode": "all", "timeout": 120})
        )
        assert sorted(waited["completed"]) == sorted(ops) and not waited["pending"] and not waited["errors"]
        branches = [waited["results"][op]["result_image_uuid"] for op in ops]
        for op in ops:
            assert waited["results"][op]["exit_code"] == 0, waited["results"][op]["stderr"]
        assert len(set(branches)) == 3

        # read what each branch produced through the resource, without starting anything
        for i, image in enumerate(branches):
            got = (await session.read_resource(AnyUrl(f"contree://image/{image}/read/result.txt"))).contents
            assert got[0].text == f"hello branch-{i} from v1\n{i}\n"
        lineage = json.loads(
            (await session.read_resource(AnyUrl(f"contree://image/{installed}/lineage"))).contents[0].text
        )
        assert sorted(lineage["children"]) == sorted(branches) and lineage["parent"] == base

        # roll back: the parent image is untouched and still usable
        back = result(
            await session.call_tool(
                "run",
                {
                    "command": "test -e /usr/bin/greet && echo present || echo absent; cat /result.txt",
                    "image": base,
                },
            )
        )
        assert back["stdout"] == "absent\n" and back["exit_code"] != 0
        again = result(await session.call_tool("run", {"command": "greet again", "image": installed}))
        assert again["stdout"] == "hello again from v1\n"
