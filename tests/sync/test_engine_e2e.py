"""End to end on the embedded engine through the MCP SDK client: rsync a tree, run with its
directory_state_id, check contents and modes in the sandbox; a one-byte edit re-syncs as one chunk."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from mcp.types import LoggingMessageNotification, ServerNotification

from contree.sync.chunker import MAX_CHUNK
from tests.sync.helpers import pseudo_random, tree
from tests.tools.conftest import mcp_session


def result(res: Any) -> Any:
    assert not res.isError, res.content[0].text
    data = res.structuredContent
    return data["result"] if set(data) == {"result"} else data


async def test_rsync_then_run_sees_the_files(engine_home: Path, workdir: Path) -> None:
    big = bytearray(pseudo_random(3 << 20, 7))
    src = workdir / "proj"
    tree(src, {"big.bin": bytes(big), "tool.sh": "echo tool-ran\n", "pkg/mod.py": "X = 1\n",
               "pkg/__pycache__/mod.pyc": "junk", "empty": b""})
    os.chmod(src / "tool.sh", 0o755)
    reports: list[dict[str, Any]] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, ServerNotification) and isinstance(message.root, LoggingMessageNotification):
            if message.root.params.logger == "contree.rsync":
                reports.append(message.root.params.data)

    async with mcp_session(engine_home, workdir, message_handler=on_message) as s:
        session: Any = s
        await session.set_logging_level("info")
        first = result(await session.call_tool("rsync", {"source": str(src), "destination": "/w"}))
        assert isinstance(first, int) and 0 < first < 2**53
        script = (
            "cd /w && sha256sum big.bin && ./tool.sh && cat pkg/mod.py && ls -l tool.sh empty"
            " && test ! -e pkg/__pycache__ && echo pruned"
        )
        out = result(await session.call_tool(
            "run", {"command": script, "image": "busybox:latest", "directory_state_id": first}
        ))
        stdout = out["stdout"]
        assert out["exit_code"] == 0, (out["stdout"], out["stderr"])
        assert hashlib.sha256(big).hexdigest() + "  big.bin" in stdout
        assert "tool-ran" in stdout and "X = 1" in stdout and "pruned" in stdout
        assert "-rwxr-xr-x" in stdout and " 0 " in stdout.split("empty")[0].splitlines()[-1]

        same = result(await session.call_tool("rsync", {"source": str(src), "destination": "/w"}))
        assert same == first
        big[1_500_000] ^= 1
        (src / "big.bin").write_bytes(bytes(big))
        second = result(await session.call_tool("rsync", {"source": str(src), "destination": "/w"}))
        assert second != first
        args = {"command": "sha256sum /w/big.bin", "image": "busybox:latest", "directory_state_id": second}
        out = result(await session.call_tool("run", args))
        assert out["stdout"].startswith(hashlib.sha256(big).hexdigest())

    assert len(reports) == 3, reports
    cold, warm, edited = reports
    assert cold["files_scanned"] == 4 and cold["files_uploaded"] == 4
    assert warm["files_changed"] == 0 and warm["bytes_sent"] == 0
    assert edited["files_changed"] == 1 and 0 < edited["bytes_sent"] <= MAX_CHUNK
    assert edited["directory_state_id"] == second
