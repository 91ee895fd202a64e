"""The official MCP conformance suite against our real protocol stack in fixture mode (MCP-PROTOCOL.md §10.2).

0.1.16 must pass every server scenario (active and pending) with an empty baseline; the 0.2.0 alpha is run
with `--requirements 2025-11-25` and, at the time of writing, passes every check too (82/82), so its
baseline is empty as well.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.protocol.httpkit import conformance_server, node_env, validators

pytestmark = [pytest.mark.external, pytest.mark.slow]


def _suite(package: str) -> Path:
    entry = (
        validators()
        / package
        / "node_modules"
        / "@modelcontextprotocol"
        / "conformance"
        / "dist"
        / "index.js"
    )
    if not entry.exists():
        pytest.fail(f"{entry} is missing: run `make install-validators`")
    return entry


def _run(package: str, url: str, out: Path, *args: str) -> list[dict[str, object]]:
    proc = subprocess.run(
        ["node", str(_suite(package)), "server", "--url", url, "-o", str(out), *args],
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    checks = [c for f in sorted(out.glob("*/checks.json")) for c in json.loads(f.read_text())]
    bad = [
        f"{c['id']}: {c['status']} {c.get('errorMessage') or ''}"
        for c in checks
        if c["status"] not in ("SUCCESS", "INFO")
    ]
    summary = proc.stdout[proc.stdout.find("=== SUMMARY") :]
    assert proc.returncode == 0 and not bad, "\n".join(bad) + "\n" + summary + proc.stderr[-3000:]
    return checks


def test_conformance_0_1_16_every_server_scenario_passes(tmp_path: Path) -> None:
    with conformance_server() as url:
        _run("conf", url, tmp_path, "--suite", "all")
    dirs = _dirs(tmp_path)
    assert len(dirs) >= 32, dirs
    # The scenarios that exercise this transport's own features really ran.
    for scenario in (
        "dns-rebinding-protection",
        "server-sse-multiple-streams",
        "server-sse-polling",
        "tools-call-with-progress",
        "tools-call-sampling",
    ):
        assert any(scenario in d for d in dirs), scenario


def test_conformance_alpha_2025_11_25_passes(tmp_path: Path) -> None:
    with conformance_server() as url:
        _run("confa", url, tmp_path, "--requirements", "2025-11-25")
    dirs = _dirs(tmp_path)
    for scenario in ("server-session-lifecycle", "server-sse-polling", "json-schema-2020-12"):
        assert any(scenario in d for d in dirs), scenario


def _dirs(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.is_dir()]
