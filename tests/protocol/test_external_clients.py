"""Clients we did not write, as subprocesses: mcp==2.3.0 (auto, stateless, legacy modes) and Inspector CLI v1.

Both run over stdio and Streamable HTTP (the Inspector also over legacy SSE) against the conformance
fixtures (`python -m protocol.testing.conformance`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.protocol.httpkit import REPO, conformance_server, inspector, node_env, validators

pytestmark = [pytest.mark.external, pytest.mark.slow]

STDIO_SERVER = [sys.executable, "-m", "protocol.testing.conformance", "--mode", "stdio", "--page-size", "5"]


def _py2() -> Path:
    python = validators() / "py2" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} is missing: run `make install-validators`")
    return python


def _run_py2(*args: str) -> str:
    proc = subprocess.run(
        [str(_py2()), str(REPO / "tests" / "protocol" / "py2_check.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "0 failed" in proc.stdout
    return proc.stdout


def _connect_seconds(output: str) -> float:
    line = next(x for x in output.splitlines() if x.startswith("connect_seconds="))
    return float(line.split("=", 1)[1])


def test_mcp2_auto_mode_over_stdio_settles_on_the_stateless_era_at_once() -> None:
    out = _run_py2("stdio", "--", *STDIO_SERVER)
    assert _connect_seconds(out) < 3.0  # an unanswered probe would take ≥ 10 s
    assert "PASS negotiated 2026-07-28" in out


def test_mcp2_auto_mode_over_http_settles_on_the_stateless_era_at_once() -> None:
    with conformance_server() as url:
        out = _run_py2("http", url)
    assert _connect_seconds(out) < 3.0
    assert "PASS negotiated 2026-07-28" in out


def test_mcp2_stateless_mode_over_stdio() -> None:
    _run_py2("--mode", "2026-07-28", "stdio", "--", *STDIO_SERVER)


def test_mcp2_stateless_mode_over_http() -> None:
    with conformance_server() as url:
        _run_py2("--mode", "2026-07-28", "http", url)


def test_mcp2_legacy_mode_over_stdio() -> None:
    _run_py2("--mode", "legacy", "--expect", "2025-11-25", "stdio", "--", *STDIO_SERVER)


def test_mcp2_legacy_mode_over_http() -> None:
    with conformance_server() as url:
        _run_py2("--mode", "legacy", "--expect", "2025-11-25", "http", url)


# ---------------------------------------------------------------- TypeScript SDK client


def run_ts_sdk(target: list[str], **env: str) -> str:
    """tests/protocol/ts_sdk_check.mjs with the pinned @modelcontextprotocol/sdk; asserts it passed."""
    sdk = validators() / "tssdk" / "node_modules" / "@modelcontextprotocol" / "sdk"
    if not (sdk / "package.json").exists():
        pytest.fail(f"{sdk} is missing: run `make install-validators`")
    proc = subprocess.run(
        ["node", str(REPO / "tests" / "protocol" / "ts_sdk_check.mjs"), *target],
        cwd=REPO,
        env={**node_env(), "SDK": str(sdk), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "0 failed" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    return proc.stdout


TS_FIXTURES = {
    "CALL": '{"name": "test_tool_with_progress", "progress": true}',
    "PROMPT": '{"name": "test_prompt_with_arguments", "arguments": {"arg1": "a", "arg2": "b"}}',
    "READ": "test://template/7/data",
}


def test_ts_sdk_over_stdio() -> None:
    run_ts_sdk(["stdio", "--", *STDIO_SERVER], **TS_FIXTURES)


def test_ts_sdk_over_streamable_http() -> None:
    with conformance_server() as url:
        out = run_ts_sdk(["http", url], **TS_FIXTURES)
    assert "PASS negotiated 2025-11-25" in out


# ---------------------------------------------------------------- Inspector CLI v1


def _inspect_everything(target: list[str]) -> None:
    tools = inspector(target, "--method", "tools/list")
    assert isinstance(tools, dict)
    assert "test_simple_text" in {t["name"] for t in tools["tools"]}
    called = inspector(target, "--method", "tools/call", "--tool-name", "test_simple_text")
    assert called == {"content": [{"type": "text", "text": "This is a simple text response for testing."}]}
    failed = inspector(target, "--method", "tools/call", "--tool-name", "test_error_handling")
    assert isinstance(failed, dict) and failed["isError"] is True  # exit 0 on isError: check the JSON
    read = inspector(target, "--method", "resources/read", "--uri", "test://static-text")
    assert isinstance(read, dict)
    assert read["contents"][0]["text"] == "This is the content of the static text resource."
    prompt = inspector(
        target,
        "--method",
        "prompts/get",
        "--prompt-name",
        "test_prompt_with_arguments",
        "--prompt-args",
        "arg1=x",
        "arg2=y",
    )
    assert isinstance(prompt, dict)
    assert prompt["messages"][0]["content"]["text"] == "Prompt with arguments: arg1='x', arg2='y'"
    level = inspector(target, "--method", "logging/setLevel", "--log-level", "debug")
    assert level == {}


def test_inspector_v1_over_stdio() -> None:
    _inspect_everything(STDIO_SERVER)


def test_inspector_v1_over_streamable_http() -> None:
    with conformance_server() as url:
        _inspect_everything([url])


def test_inspector_v1_over_legacy_sse() -> None:
    with conformance_server() as url:
        _inspect_everything([url.removesuffix("/mcp") + "/sse"])
