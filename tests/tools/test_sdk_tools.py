"""Every tool and resource template through the official SDK client on the embedded engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

from mcp.types import CancelledNotification, CancelledNotificationParams, ClientNotification
from pydantic import AnyUrl

from tests.tools.conftest import mcp_session


def result(res: Any) -> Any:
    assert not res.isError, res.content[0].text
    data = res.structuredContent
    return data["result"] if set(data) == {"result"} else data


async def read(session: Any, uri: str) -> Any:
    return (await session.read_resource(AnyUrl(uri))).contents


async def test_images_files_and_inspection(engine_home: Path, workdir: Path) -> None:
    (workdir / "app").mkdir()
    (workdir / "app" / "main.sh").write_text("echo from-rsync\n")
    (workdir / "app" / "__pycache__").mkdir()
    (workdir / "app" / "__pycache__" / "x.pyc").write_text("junk")
    async with mcp_session(engine_home, workdir) as s:
        session: Any = s
        images = result(await session.call_tool("list_images", {"tagged": True}))["images"]
        busybox = next(i["uuid"] for i in images if i["tag"] == "busybox:latest")
        assert result(await session.call_tool("get_image", {"image": "busybox:latest"}))["uuid"] == busybox

        me = result(await session.call_tool("whoami", {}))
        assert me["backend"] == "local" and me["permissions"]["spawn"] is True and me["mcp_upgrade"] is None
        guide = result(await session.call_tool("get_guide", {"section": "state"}))
        assert guide["available_sections"][0] == "async" and "Lineage" in guide["content"]
        bad = await session.call_tool("get_guide", {"section": "nope"})
        assert bad.isError and "Available sections: async, errors" in bad.content[0].text
        token = result(await session.call_tool("registry_token_obtain", {"registry_url": "ghcr.io"}))
        assert (
            token["url"] == "https://github.com/settings/tokens?type=beta"
            and "STOP HERE" in token["agent_instruction"]
        )

        uploaded = result(await session.call_tool("upload", {"content": "echo from-upload\n"}))
        state_id = result(
            await session.call_tool("rsync", {"source": str(workdir / "app"), "destination": "/app"})
        )
        assert isinstance(state_id, int)
        made = result(
            await session.call_tool(
                "run",
                {
                    "command": "sh /app/main.sh; sh /opt/u.sh; ls /app; mkdir -p /data && echo payload > "
                    "/data/out.txt",
                    "image": "busybox:latest",
                    "disposable": False,
                    "directory_state_id": state_id,
                    "files": {"/opt/u.sh": uploaded["uuid"]},
                },
            )
        )
        assert made["exit_code"] == 0, made
        assert made["stdout"] == "from-rsync\nfrom-upload\nmain.sh\n"
        assert (
            made["filesystem_changed"] is True
            and made["result_image_uuid"]
            and made["result_image_uuid"] != busybox
        )
        child = made["result_image_uuid"]

        tagged = result(
            await session.call_tool("set_tag", {"image_uuid": child, "tag": "tests/data/busybox:1"})
        )
        assert tagged["tag"] == "tests/data/busybox:1"
        listing = result(
            await session.call_tool("list_files", {"image": "tag:tests/data/busybox:1", "path": "data"})
        )
        assert listing["path"] == "/data" and [f["name"] for f in listing["files"]] == ["out.txt"]
        assert listing["files"][0]["type"] == "file" and listing["files"][0]["mode"] == "0o100644"
        first = result(await session.call_tool("list_files", {"image": child, "path": "/etc", "limit": 2}))
        rest = result(
            await session.call_tool(
                "list_files", {"image": child, "path": "/etc", "cursor": first["next_cursor"]}
            )
        )
        assert first["count"] == 2 and rest["next_cursor"] is None
        assert len({f["name"] for f in first["files"] + rest["files"]}) == 2 + rest["count"]
        text = result(await session.call_tool("read_file", {"image": child, "path": "/data/out.txt"}))
        assert text["content"] == "payload\n" and text["encoding"] == "utf-8" and text["bytes_size"] == 8
        binfile = result(
            await session.call_tool("read_file", {"image": child, "path": "/bin/busybox", "max_bytes": 16})
        )
        assert binfile["encoding"] == "base64" and binfile["truncated"] is True
        found = result(
            await session.call_tool(
                "grep",
                {
                    "image": child,
                    "pattern": "PAYLOAD",
                    "path": "/data",
                    "case": "insensitive",
                    "glob": "*.txt",
                },
            )
        )
        assert [(m["path"], m["line_number"], m["line_text"]) for m in found["matches"]] == [
            ("/data/out.txt", 1, "payload\n")
        ]
        assert found["truncated"] is False and found["patterns"] == ["PAYLOAD"]
        nothing = result(
            await session.call_tool("grep", {"image": child, "pattern": "payload", "path": "/etc"})
        )
        assert nothing["matches"] == []
        saved = result(
            await session.call_tool(
                "download",
                {"image": child, "path": "/data/out.txt", "destination": str(workdir / "got" / "out.txt")},
            )
        )
        assert saved["size"] == 8 and (workdir / "got" / "out.txt").read_text() == "payload\n"
        outside = await session.call_tool(
            "download",
            {"image": child, "path": "/data/out.txt", "destination": "/tmp/contree-should-not-exist.txt"},
        )
        assert outside.isError and not Path("/tmp/contree-should-not-exist.txt").exists()  # noqa: ASYNC240

        # resource templates
        contents = await read(session, "contree://image/tag:tests%2Fdata%2Fbusybox:1/read/data/out.txt")
        assert contents[0].text == "payload\n"
        blob = await read(session, f"contree://image/{child}/read/bin/busybox")
        assert blob[0].mimeType == "application/octet-stream" and blob[0].blob
        ls = (await read(session, f"contree://image/{child}/ls/data"))[0].text
        assert ls.startswith("-rw-r--r--") and ls.endswith(" out.txt")
        root = (await read(session, f"contree://image/{child}/ls/"))[0].text
        assert " data" in root and " bin" in root
        lineage = json.loads(
            (await read(session, "contree://image/tag:tests%2Fdata%2Fbusybox:1/lineage"))[0].text
        )
        assert lineage["parent"] == busybox and lineage["ancestors"] == [busybox] and lineage["depth"] == 1
        assert lineage["is_known"] is True
        base = json.loads((await read(session, f"contree://image/{busybox}/lineage"))[0].text)
        assert child in base["children"] and base["root"] == busybox

        untag = result(await session.call_tool("set_tag", {"image_uuid": child, "tag": None}))
        assert untag["tag"] is None
        more = result(await session.call_tool("list_images", {"tag_prefix": "tests/"}))
        assert more["images"] == []


async def test_operations_progress_output_and_cancel(engine_home: Path, workdir: Path) -> None:
    async with mcp_session(engine_home, workdir) as s:
        session: Any = s
        messages: list[str] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            messages.append(message or "")

        res = await session.call_tool(
            "run",
            {
                "command": "for i in 1 2 3; do echo line-$i; sleep 0.3; done; head -c 20000 /dev/zero | "
                "tr '\\0' x",
                "image": "busybox:latest",
                "truncate_output_at": 100,
            },
            progress_callback=on_progress,
        )
        done = result(res)
        assert done["exit_code"] == 0 and done["stdout_truncated"] is True and len(done["stdout"]) == 100
        assert any("line-" in m for m in messages), messages
        # full output is never lost: the stream resource pages through all of it
        full = (await read(session, done["stdout_resource"]))[0].text
        assert full.startswith("line-1\nline-2\nline-3\n") and full.count("x") == 20000
        page = (await read(session, done["stdout_resource"] + "?offset=21&limit=10"))[0].text
        assert page == "x" * 10
        doc = json.loads((await read(session, f"contree://operations/instance/{done['uuid']}"))[0].text)
        assert doc["state"] == "SUCCESS" and doc["exit_code"] == 0 and doc["stdout_truncated"] is True

        started = [
            result(await session.call_tool("run", {"command": cmd, "image": "busybox:latest", "wait": False}))
            for cmd in ("echo a", "exit 3", "sleep 30")
        ]
        ids = [r["operation_id"] for r in started]
        waited = result(await session.call_tool("wait_operations", {"operation_ids": ids[:2], "timeout": 60}))
        assert sorted(waited["completed"]) == sorted(ids[:2]) and waited["timed_out"] is False
        assert (
            waited["results"][ids[1]]["exit_code"] == 3 and waited["results"][ids[1]]["status"] == "SUCCESS"
        )
        short = result(
            await session.call_tool("wait_operations", {"operation_ids": [ids[2]], "timeout": 0.5})
        )
        assert short["timed_out"] is True and short["pending"] == [ids[2]] and short["cancelled"] == []
        one = result(await session.call_tool("get_operation", {"operation_id": ids[0]}))
        assert one["stdout"] == "a\n" and one["kind"] == "instance"
        for _ in range(300):  # a loaded machine may still be starting the sandbox
            if (
                result(await session.call_tool("get_operation", {"operation_id": ids[2]}))["status"]
                == "EXECUTING"
            ):
                break
            await asyncio.sleep(0.1)
        listed = result(
            await session.call_tool("list_operations", {"status": "executing", "type": "instance"})
        )
        assert [o["uuid"] for o in listed["operations"]] == [ids[2]]
        cancel = result(await session.call_tool("cancel_operation", {"operation_id": ids[2]}))
        assert cancel["cancelled"] is True
        for _ in range(300):
            status = result(await session.call_tool("get_operation", {"operation_id": ids[2]}))["status"]
            if status == "CANCELLED":
                break
            await asyncio.sleep(0.1)
        assert status == "CANCELLED"
        again = result(await session.call_tool("cancel_operation", {"operation_id": ids[0]}))
        assert again == {"cancelled": False, "operation_id": ids[0], "status": "SUCCESS"}


async def test_cancelling_a_waiting_run_request_cancels_the_operation(
    engine_home: Path, workdir: Path
) -> None:
    async with mcp_session(engine_home, workdir) as s:
        session: Any = s
        request_id = session._request_id  # the id the SDK gives the next request
        call = asyncio.create_task(
            session.call_tool("run", {"command": "sleep 60", "image": "busybox:latest", "timeout": 120})
        )
        await asyncio.sleep(0.2)
        for _ in range(300):
            ops = result(await session.call_tool("list_operations", {"status": "EXECUTING"}))["operations"]
            if ops:
                break
            await asyncio.sleep(0.1)
        assert ops, "the run never started"
        # what a client does when the user aborts: notifications/cancelled for the waiting request
        await session.send_notification(
            ClientNotification(
                CancelledNotification(
                    params=CancelledNotificationParams(requestId=request_id, reason="user abort")
                )
            )
        )
        call.cancel()
        with contextlib.suppress(BaseException):
            await call
        for _ in range(300):
            status = result(await session.call_tool("get_operation", {"operation_id": ops[0]["uuid"]}))[
                "status"
            ]
            if status == "CANCELLED":
                break
            await asyncio.sleep(0.1)
        assert status == "CANCELLED"


async def test_subscribers_hear_when_a_detached_run_ends(engine_home: Path, workdir: Path) -> None:
    from mcp.types import ResourceUpdatedNotification, ServerNotification

    updated: list[str] = []
    heard = asyncio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, ServerNotification) and isinstance(message.root, ResourceUpdatedNotification):
            updated.append(str(message.root.params.uri))
            heard.set()

    async with mcp_session(engine_home, workdir, message_handler=on_message) as s:
        session: Any = s
        op = result(
            await session.call_tool("run", {"command": "sleep 2", "image": "busybox:latest", "wait": False})
        )
        uri = f"contree://operations/instance/{op['operation_id']}"
        await session.subscribe_resource(AnyUrl(uri))
        await asyncio.wait_for(heard.wait(), 30)
        assert updated == [uri]
        doc = json.loads((await read(session, uri))[0].text)
        assert doc["state"] == "SUCCESS" and doc["exit_code"] == 0


async def test_run_options(engine_home: Path, workdir: Path) -> None:
    async with mcp_session(engine_home, workdir) as s:
        session: Any = s

        async def run(**args: Any) -> Any:
            return result(await session.call_tool("run", {"image": "busybox:latest", **args}))

        env = await run(
            command="echo $GREETING; pwd; id -u", env={"GREETING": "hi-env"}, cwd="/tmp", uid=1000
        )
        assert env["stdout"] == "hi-env\n/tmp\n1000\n" and "hi-env" not in json.dumps(
            {k: v for k, v in env.items() if k != "stdout"}
        )
        piped = await run(command="cat; echo", stdin="from-stdin")
        assert piped["stdout"] == "from-stdin\n"
        direct = await run(command="/bin/echo", shell=False, args=["a b", "c"])
        assert direct["stdout"] == "a b c\n"
        slow = await run(command="sleep 30", timeout=1)
        assert slow["timed_out"] is True and slow["status"] == "SUCCESS"
        failed = await run(command="exit 7")
        assert failed["exit_code"] == 7 and failed["status"] == "SUCCESS"
        missing = await session.call_tool("run", {"image": "no-such:tag", "command": "true"})
        assert missing.isError and missing.content[0].text.startswith("Error executing tool run: ")
