"""The official MCP conformance suite against our real protocol stack in fixture mode (MCP-PROTOCOL.md §10.2).

0.1.16 must pass every server scenario (active and pending) with an empty baseline; 0.2.0-alpha.12 is run
with `--requirements 2025-11-25` and `--requirements 2026-07-28` (every scored scenario, and the Tasks
extension and pending ones it runs unscored), and every check must pass there too. The one exception is
the suite's own placeholder for task status notifications, which it skips itself (its harness is not
written yet).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.protocol.httpkit import REAL_SERVER, conformance_server, http_server, node_env, validators

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


# Checks the suite itself reports as SKIPPED whatever the server does.
SKIPPED_BY_THE_SUITE = {"tasks-status-notifications"}


def _run(package: str, url: str, out: Path, *args: str, strict: bool = True) -> list[dict[str, object]]:
    """Run the suite; every check, tagged with its scenario directory. `strict`: all must pass."""
    proc = subprocess.run(
        ["node", str(_suite(package)), "server", "--url", url, "-o", str(out), *args],
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    checks = [
        {**c, "scenario": f.parent.name}
        for f in sorted(out.glob("*/checks.json"))
        for c in json.loads(f.read_text())
    ]
    if strict:
        bad = [
            f"{c['id']}: {c['status']} {c.get('errorMessage') or ''}"
            for c in checks
            if c["status"] not in ("SUCCESS", "INFO")
            and not (c["status"] == "SKIPPED" and c["id"] in SKIPPED_BY_THE_SUITE)
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


def test_conformance_alpha_2026_07_28_passes_every_scenario(tmp_path: Path) -> None:
    with conformance_server() as url:
        checks = _run("confa", url, tmp_path, "--requirements", "2026-07-28")
    dirs = _dirs(tmp_path)
    for scenario in (
        "server-stateless",
        "caching",
        "sep-2164-resource-not-found",
        "input-required-result-multi-round",
        "input-required-result-tampered-state",
        "http-header-validation",
        "http-custom-header-server-validation",
        "tasks-lifecycle",
        "tasks-mrtr-input",
        "tasks-mrtr-composition",
        "dns-rebinding-protection",
    ):
        assert any(scenario in d for d in dirs), scenario
    assert sum(c["status"] == "SUCCESS" for c in checks) >= 190


def _dirs(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.is_dir()]


# What the real server (no conformance fixtures) must pass of the 2026-07-28 set: every scenario that does
# not call a fixture tool, resource or prompt by name.
REAL_SERVER_SCENARIOS = (
    "server-stateless",
    "tools-list",
    "server-sse-multiple-streams",
    "resources-list",
    "sep-2164-resource-not-found",
    "prompts-list",
    "dns-rebinding-protection",
    "caching",
    "input-required-result-unsupported-methods",
    "input-required-result-validate-input",
    "http-header-validation",
)
# server-stateless checks that drive fixture tools (test_missing_capability, test_streaming_elicitation,
# test_logging_tool, test_trigger_*): "not testable" against a server without them.
NEEDS_FIXTURES = {
    "sep-2575-server-rejects-undeclared-capability",
    "sep-2575-missing-capability-http-400",
    "sep-2575-http-server-no-independent-requests-on-stream",
    "sep-2575-server-no-log-without-loglevel",
    "sep-2575-server-sends-prompts-list-changed-on-subscription",
    "sep-2575-server-sends-tools-list-changed-on-subscription",
}


def test_the_real_server_passes_the_2026_07_28_scenarios_that_apply_to_it(tmp_path: Path) -> None:
    with http_server(REAL_SERVER) as url:
        checks = _run("confa", url, tmp_path, "--requirements", "2026-07-28", strict=False)
    applying = [
        c
        for c in checks
        if str(c["scenario"]).startswith(tuple(f"server-{s}-" for s in REAL_SERVER_SCENARIOS))
    ]
    ran = {
        s
        for s in REAL_SERVER_SCENARIOS
        if any(str(c["scenario"]).startswith(f"server-{s}-") for c in applying)
    }
    assert ran == set(REAL_SERVER_SCENARIOS)
    bad = [
        f"{c['scenario']} {c['id']}: {c['status']} {c.get('errorMessage') or ''}"
        for c in applying
        if c["status"] not in ("SUCCESS", "INFO") and c["id"] not in NEEDS_FIXTURES
    ]
    assert not bad, "\n".join(bad)
    wire = [c for c in checks if c["id"] == "wire-schema-valid" and c["status"] != "SUCCESS"]
    assert not wire, wire  # whatever the scenario, every message we sent is schema-valid
