"""Golden transcripts replayed over stdio; the normaliser, the replayer failure path and the recorder."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from protocol.testing import transcript as t

ROOT = Path(__file__).resolve().parents[2]
# The protocol-surface transcripts (the conformance registry); tests/tools replays the tools_* ones.
TRANSCRIPTS = [
    p
    for p in sorted((ROOT / "fixtures" / "transcripts").glob("*.jsonl"))
    if "protocol.testing.conformance" in t.load(p).argv
]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_transcripts_exist() -> None:
    assert len(TRANSCRIPTS) >= 10


@pytest.mark.parametrize("path", TRANSCRIPTS, ids=[p.stem for p in TRANSCRIPTS])
async def test_replay_over_stdio(path: Path) -> None:
    await t.replay_stdio(path, cwd=ROOT, env=ENV)


def _write(tmp_path: Path, lines: list[dict[str, object]]) -> Path:
    path = tmp_path / "x.jsonl"
    path.write_text(t.dump(lines))
    return path


META = {
    "meta": {
        "description": "x",
        "argv": ["{python}", "-m", "protocol.testing.conformance", "--mode", "stdio"],
    }
}


async def test_replay_detects_a_wrong_expectation(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        [
            META,
            {"send": {"jsonrpc": "2.0", "id": 1, "method": "ping"}},
            {"expect": [{"jsonrpc": "2.0", "id": 2, "result": {}}]},
        ],
    )
    with pytest.raises(t.TranscriptMismatch, match="mismatch"):
        await t.replay_stdio(path, cwd=ROOT, env=ENV)


async def test_replay_detects_extra_output(tmp_path: Path) -> None:
    path = _write(tmp_path, [META, {"send": {"jsonrpc": "2.0", "id": 1, "method": "ping"}}])
    with pytest.raises(t.TranscriptMismatch, match="unexpected output"):
        await t.replay_stdio(path, cwd=ROOT, env=ENV)


def test_malformed_transcript_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"send": {}, "expect": []}\n')
    with pytest.raises(t.TranscriptError):
        t.load(path)


def test_normalise_replaces_volatile_values() -> None:
    state = t.State(literals={"sess-123": t.SESSION_ID})
    message = {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {
            "serverInfo": {"name": "x", "version": "0.6.0"},
            "nextCursor": "abc",
            "text": "op 6f1c7d2e-8a4b-4c1d-9e2f-0123456789ab at 2026-11-24T03:45:00.123Z in sess-123",
        },
    }
    t.observe(message, state)
    assert t.normalise(message, state)["result"] == {
        "serverInfo": {"name": "x", "version": "<version>"},
        "nextCursor": "<cursor>",
        "text": "op <uuid> at <timestamp> in <session-id>",
    }
    assert state.cursor == "abc"


def test_server_request_ids_are_normalised_and_substituted() -> None:
    state = t.State()
    ask = {"jsonrpc": "2.0", "id": 7, "method": "sampling/createMessage", "params": {}}
    t.observe(ask, state)
    assert t.normalise(ask, state)["id"] == "<server-id>"
    answer = {"jsonrpc": "2.0", "id": "<server-id>", "result": {}}
    assert t.substitute(answer, state)["id"] == 7
    assert t.desubstitute({"jsonrpc": "2.0", "id": 7, "result": {}}, state)["id"] == "<server-id>"


async def test_recorder_output_replays(tmp_path: Path) -> None:
    out = tmp_path / "rec.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "protocol.testing.transcript",
        "record",
        "--out",
        str(out),
        "--description",
        "rec",
        "--",
        "{python}",
        "-m",
        "protocol.testing.conformance",
        "--mode",
        "stdio",
        "--page-size",
        "2",
        cwd=ROOT,
        env=ENV,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    lines = [
        b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"r","version":"1"}}}',
        b'{"jsonrpc":"2.0","method":"notifications/initialized"}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}',
        b'{"jsonrpc":"2.0","id":2,"method":"tools/list","params":{"cursor":"<cursor>"}}',
        b"not json",
    ]
    answers = 0
    for line in lines:
        proc.stdin.write(line + b"\n")
        await proc.stdin.drain()
        if b'"id"' in line or line == b"not json":
            await asyncio.wait_for(proc.stdout.readline(), 10)  # the proxied answer
            answers += 1
    proc.stdin.close()
    await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == 0 and answers == 4
    recorded = t.load(out)
    assert recorded.argv[0] == "{python}"
    assert [s.kind for s in recorded.steps].count("expect") == 4
    assert {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {"cursor": "<cursor>"}} in [
        s.value for s in recorded.steps
    ]
    await t.replay_stdio(out, cwd=ROOT, env=ENV)
