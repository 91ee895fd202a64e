"""The server works with the newer official SDK too: mcp==2.3.0 from the validators' venv."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from tests.tools.conftest import server_command

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.external
async def test_mcp_2_client_drives_the_server(engine_home: Path, workdir: Path) -> None:
    python = Path(os.environ.get("VALIDATORS") or ROOT / ".validators") / "py2" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} missing: run `make install-validators` (mcp==2.3.0 client)")
    proc = await asyncio.create_subprocess_exec(
        str(python),
        str(Path(__file__).with_name("py2_client.py")),
        *server_command(),
        "--backend",
        "local",
        "--home",
        str(engine_home),
        cwd=str(workdir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert len(summary["tools"]) == 29 and summary["tools"][0] == "list_images"
    assert summary == {**summary, "guide": "state", "run": "py2\n", "prompts": 11}
