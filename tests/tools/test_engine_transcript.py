"""The embedded-engine golden transcript (fixtures/transcripts/tools_engine.jsonl): every tool, resource,
resource template and prompt, and a completion, against `contree-mcp --backend local` with a fresh engine
home (busybox:latest seeded) and a workdir holding a small project and an OCI layout.

Re-record with tests/tools/record_transcripts.sh, which prepares the same directories with `prepare`
(`python -m tests.tools.test_engine_transcript DIR` prints the variables as NAME=VALUE lines).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from protocol import transcript
from tests.tools.conftest import require_engine_host, seed_busybox
from tests.tools.test_import_roots import write_layout

ROOT = Path(__file__).resolve().parents[2]
FILE = ROOT / "fixtures" / "transcripts" / "tools_engine.jsonl"


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
    await transcript.replay_stdio(
        FILE,
        cwd=variables["workdir"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        variables=variables,
        wait=60.0,
    )
    # The download step really wrote the file into the workdir.
    assert (Path(variables["workdir"]) / "out" / "greeting.txt").read_text() == "made by run\n"


if __name__ == "__main__":
    for name, value in prepare(Path(sys.argv[1])).items():
        print(f"{name}={value}")
