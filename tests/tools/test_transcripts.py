"""The contree-mcp golden transcripts (fixtures/transcripts/tools_*.jsonl) replay byte-for-byte (after
normalisation) over stdio; re-record with `python -m protocol.testing.transcript record` when the surface
changes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from protocol.testing import transcript

ROOT = Path(__file__).resolve().parents[2]
# tools_engine*.jsonl need an engine home and a workdir: test_engine_transcript.py replays them.
FILES = sorted(p for p in (ROOT / "fixtures" / "transcripts").glob("tools_*.jsonl") if "engine" not in p.stem)


def test_tool_transcripts_exist() -> None:
    assert [p.name for p in FILES] == ["tools_calls.jsonl", "tools_surface.jsonl"]
    assert (ROOT / "fixtures" / "transcripts" / "tools_engine.jsonl").exists()


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
async def test_tool_transcript_replays(path: Path) -> None:
    await transcript.replay_stdio(path, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
