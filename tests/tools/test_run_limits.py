"""Sandbox limits through the MCP surface: the engine's flags, whoami, `run`'s per-run limits, its
`limits` and `oom_killed` output (issue 17 item 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.tools.conftest import mcp_session
from tests.tools.test_sdk_tools import result

MIB = 1 << 20


async def test_run_reports_its_limits_and_an_oom_kill(engine_home: Path, workdir: Path) -> None:
    flags = ("--sandbox-memory", "64M", "--sandbox-max-memory", "256M", "--sandbox-pids", "100")
    async with mcp_session(engine_home, workdir, *flags) as s:
        session: Any = s
        limits = result(await session.call_tool("whoami", {}))["limits"]
        assert limits["instance_memory_bytes"] == 64 * MIB
        assert limits["instance_max_memory_bytes"] == 256 * MIB
        assert limits["instance_pids"] == 100

        hog = "head -c 200m /dev/zero | tail > /dev/null; echo rc=$?"
        killed = result(await session.call_tool("run", {"command": hog, "image": "busybox:latest"}))
        assert killed["oom_killed"] is True and killed["stdout"] == "rc=137\n"
        assert killed["limits"]["memory_bytes"] == 64 * MIB and killed["limits"]["pids"] == 100

        raised = result(await session.call_tool(
            "run", {"command": hog, "image": "busybox:latest", "memory_bytes": 256 * MIB, "pids": 200}))
        assert raised["oom_killed"] is False and raised["stdout"] == "rc=0\n", raised
        assert raised["limits"]["memory_bytes"] == 256 * MIB and raised["limits"]["pids"] == 200

        refused = await session.call_tool(
            "run", {"command": "true", "image": "busybox:latest", "memory_bytes": 512 * MIB})
        assert refused.isError
        assert "instance_max_memory_bytes" in refused.content[0].text
