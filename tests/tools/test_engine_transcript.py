"""The embedded-engine golden transcript (fixtures/transcripts/tools_engine.jsonl): every tool, resource,
resource template and prompt, and a completion, against `contree-mcp --backend local` with a fresh engine
home (busybox:latest seeded) and a workdir holding a small project and an OCI layout.

Re-record with tests/tools/record_transcripts.sh, which prepares the same directories with `prepare`
(`python -m tests.tools.test_engine_transcript DIR` prints the variables as NAME=VALUE lines).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from protocol.testing import transcript
from tests.service_util import stop_service
from tests.tools.conftest import require_engine_host, seed_busybox
from tests.tools.test_import_roots import write_layout

ROOT = Path(__file__).resolve().parents[2]
FILE = ROOT / "fixtures" / "transcripts" / "tools_engine.jsonl"
SURFACE = ROOT / "fixtures" / "transcripts" / "tools_surface.jsonl"


def prepare(base: Path) -> dict[str, str]:
    """An engine home seeded with busybox and a workdir with the files the transcript uses."""
    home, work = base / "engine", base / "work"
    seed_busybox(home)
    (work / "project" / "src").mkdir(parents=True)
    (work / "project" / "hello.txt").write_text("hello from the workdir\n")
    (work / "project" / "src" / "run.sh").write_text("echo script ran\n")
    (work / "upload.txt").write_text("uploaded content\n")
    (work / "out").mkdir()
    write_layout(work / "layout")
    return {"home": str(home), "workdir": str(work)}


async def test_engine_transcript_replays(tmp_path: Path) -> None:
    require_engine_host()
    variables = prepare(tmp_path)
    try:
        await transcript.replay_stdio(
            FILE,
            cwd=variables["workdir"],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            variables=variables,
            wait=60.0,
        )
    finally:
        stop_service(Path(variables["home"]))
    # The download step really wrote the file into the workdir.
    assert (Path(variables["workdir"]) / "out" / "greeting.txt").read_text() == "made by run\n"


def _results(path: Path) -> list[dict[str, Any]]:
    return [
        m["result"]
        for step in transcript.load(path).steps
        if step.kind == "expect"
        for m in step.value
        if isinstance(m.get("result"), dict)
    ]


def _sends(path: Path) -> list[dict[str, Any]]:
    return [s.value for s in transcript.load(path).steps if s.kind == "send"]


def test_engine_transcript_covers_the_whole_surface() -> None:
    """Every tool, resource, template and prompt the server lists (tools_surface.jsonl) is exercised."""
    listed: dict[str, set[str]] = {
        "tools": set(),
        "resources": set(),
        "resourceTemplates": set(),
        "prompts": set(),
    }
    for result in _results(SURFACE):
        for kind, names in listed.items():
            for item in result.get(kind, []):
                names.add(item.get("uriTemplate") or item.get("uri") or item["name"])
    sends = _sends(FILE)
    called = {m["params"]["name"] for m in sends if m.get("method") == "tools/call"}
    read = {m["params"]["uri"] for m in sends if m.get("method") == "resources/read"}
    prompted = {m["params"]["name"] for m in sends if m.get("method") == "prompts/get"}
    assert len(listed["tools"]) == 29 and called == listed["tools"]
    assert listed["resources"] <= read
    assert prompted == listed["prompts"] and len(prompted) == 11
    for template in listed["resourceTemplates"]:
        prefix = template.split("{", 1)[0]
        suffix = template.rsplit("}", 1)[1]
        assert any(u.startswith(prefix) and u.endswith(suffix) and u != prefix for u in read), template
    assert any(m.get("method") == "completion/complete" for m in sends)
    runs = [m["params"]["arguments"] for m in sends if m.get("params", {}).get("name") == "run"]
    assert {r.get("wait", True) for r in runs} == {True, False}
    # Successful answers, not only error paths: the run's own output is pinned verbatim.
    text = FILE.read_text()
    assert "hello from the workdir\\nscript ran\\nuploaded content\\n" in text
    assert '\\"exit_code\\": 3' in text


def test_normaliser_variables_masks_numbered_uuids_and_captures() -> None:
    a, b = "0f0e0d0c-0b0a-4009-8807-060504030201", "11111111-2222-4333-8444-555555555555"
    state = transcript.State(
        variables={"workdir": "/tmp/x/work"},
        mask=frozenset({"duration"}),
        numbered_uuids=True,
        capture=frozenset({"rsync"}),
    )
    transcript.note_send(
        {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "rsync"}}, state
    )
    synced = {
        "jsonrpc": "2.0",
        "id": 5,
        "result": {
            "content": [{"type": "text", "text": "7302119842"}],
            "structuredContent": {"result": 7302119842},
        },
    }
    assert transcript.normalise(synced, state)["result"] == {
        "content": [{"type": "text", "text": "<rsync-1>"}],
        "structuredContent": {"result": "<rsync-1>"},
    }
    body = {"uuid": a, "parent": b, "again": a, "duration": 0.25, "path": "/tmp/x/work/out"}
    message = {
        "jsonrpc": "2.0",
        "id": 6,
        "result": {
            "content": [{"type": "text", "text": json.dumps(body)}],
            "structuredContent": {**body, "results": {b: 1}},
        },
    }
    out = transcript.normalise(message, state)["result"]
    expected = {
        "uuid": "<uuid-1>",
        "parent": "<uuid-2>",
        "again": "<uuid-1>",
        "duration": "<masked>",
        "path": "{workdir}/out",
    }
    assert out["structuredContent"] == {**expected, "results": {"<uuid-2>": 1}}
    assert json.loads(out["content"][0]["text"]) == expected
    send = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"arguments": {"ids": ["<uuid-2>"], "state": "<rsync-1>", "dest": "{workdir}/f"}},
    }
    real = transcript.substitute(send, state)
    assert real["params"]["arguments"] == {"ids": [b], "state": 7302119842, "dest": "/tmp/x/work/f"}
    assert transcript.desubstitute(real, state) == send  # the recorder writes the placeholders back


if __name__ == "__main__":
    for name, value in prepare(Path(sys.argv[1])).items():
        print(f"{name}={value}")
