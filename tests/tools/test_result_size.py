"""Results sized for an agent's context, through the official SDK client on the embedded engine: every
tool's default result is at most 64 KiB (its structuredContent, which Claude Code and Codex hand the
model, and its text block alike), says how big the whole is and how to get the rest, and more can be
asked for explicitly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.tools.conftest import mcp_session
from tests.tools.test_sdk_tools import result

KIB64 = 64 * 1024


def sized(res: Any) -> Any:
    """The result's value after checking both of its forms against the budget."""
    assert not res.isError, res.content[0].text
    structured = len(json.dumps(res.structuredContent, ensure_ascii=False).encode())
    text = len(res.content[0].text.encode())
    assert structured <= KIB64 and text <= KIB64, (structured, text)
    return result(res)


async def test_default_results_fit_64_kib_and_say_how_to_get_more(engine_home: Path, workdir: Path) -> None:
    async with mcp_session(engine_home, workdir) as s:
        session: Any = s
        made = sized(
            await session.call_tool(
                "run",
                {
                    "command": "mkdir /data && seq 1 600000 > /data/big.txt && "
                    "head -c 4000000 /dev/urandom > /data/big.bin && "
                    "for i in $(seq 3000); do echo needle-$i; done > /data/needles.txt && "
                    "printf '\\001\\002\\003%.0s' $(seq 4000) > /data/controls.txt && "
                    "mkdir /data/many && cd /data/many && touch $(seq 1 5000) && wc -c /data/big.txt",
                    "image": "busybox:latest",
                    "disposable": False,
                    "timeout": 120,
                },
            )
        )
        image = made["result_image_uuid"]
        big = int(made["stdout"].split()[0])
        assert big > 4_000_000

        text = sized(await session.call_tool("read_file", {"image": image, "path": "/data/big.txt"}))
        assert text["truncated"] is True and text["bytes_size"] == big and text["encoding"] == "utf-8"
        shown = len(text["content"].encode())
        assert f"offset={shown}" in text["hint"]
        more = sized(
            await session.call_tool("read_file", {"image": image, "path": "/data/big.txt", "offset": shown})
        )
        expected = "".join(f"{i}\n" for i in range(1, 600001))
        assert text["content"] + more["content"] == expected[: shown + len(more["content"].encode())]
        asked = result(
            await session.call_tool(
                "read_file", {"image": image, "path": "/data/big.txt", "max_bytes": 200_000}
            )
        )
        assert len(asked["content"]) == 200_000  # explicitly more: up to --read-max-bytes
        binary = sized(await session.call_tool("read_file", {"image": image, "path": "/data/big.bin"}))
        assert (
            binary["encoding"] == "base64"
            and binary["truncated"] is True
            and binary["bytes_size"] == 4_000_000
        )
        sized(await session.call_tool("read_file", {"image": image, "path": "/data/controls.txt"}))

        listing = sized(await session.call_tool("list_files", {"image": "busybox:latest", "path": "/bin"}))
        assert listing["total"] == listing["count"] == len(listing["files"]) > 50
        many = sized(await session.call_tool("list_files", {"image": image, "path": "/data/many"}))
        assert many["total"] == 5000 and 0 < many["count"] < 5000  # a page, and how to get the next one
        assert many["next_cursor"] and many["hint"]

        found = sized(await session.call_tool("grep", {"image": image, "pattern": "needle", "path": "/data"}))
        assert found["truncated"] is True and 0 < len(found["matches"]) < 3000
        assert found["next_offset"] == len(found["matches"]) and "offset=" in found["hint"]
        page = sized(
            await session.call_tool(
                "grep", {"image": image, "pattern": "needle", "path": "/data", "offset": found["next_offset"]}
            )
        )
        numbers = [int(m["line_text"].split("-")[1]) for m in found["matches"] + page["matches"]]
        assert numbers == list(range(1, len(numbers) + 1))
        everything = result(
            await session.call_tool(
                "grep", {"image": image, "pattern": "needle", "path": "/data", "max_total": 5000}
            )
        )
        assert len(everything["matches"]) == 3000 and everything["truncated"] is False

        loud = sized(
            await session.call_tool(
                "run", {"command": "yes | head -c 52428800; seq 1 100000 >&2", "image": "busybox:latest"}
            )
        )
        assert loud["stdout_bytes"] == 52428800 and loud["stdout_tail"] and loud["stderr_tail"]
        noisy = sized(  # control characters take 6 bytes each in JSON: the result still fits
            await session.call_tool(
                "run",
                {"command": "cat /data/controls.txt; cat /data/controls.txt >&2", "image": image},
            )
        )
        assert noisy["stdout_truncated"] is True and "offset=" in noisy["hint"]
        ids = [
            result(await session.call_tool("run", {"command": "seq 1 5000", "image": image, "wait": False}))[
                "operation_id"
            ]
            for _ in range(12)
        ]
        waited = sized(await session.call_tool("wait_operations", {"operation_ids": ids, "timeout": 120}))
        assert sorted(waited["completed"]) == sorted(ids)
        for op_id in ids[:2]:
            sized(await session.call_tool("get_operation", {"operation_id": op_id}))
        sized(await session.call_tool("list_operations", {}))
        sized(await session.call_tool("list_images", {}))
        sized(await session.call_tool("get_image", {"image": image}))
        sized(await session.call_tool("whoami", {}))
        for section in ("workflow", "reference", "quickstart", "state", "async", "tagging", "errors"):
            sized(await session.call_tool("get_guide", {"section": section}))
