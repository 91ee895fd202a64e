"""mcp==2.3.0 client check, run with `.validators/py2/bin/python` (not collected by pytest: no test_ prefix).

    py2_check.py [--mode auto|legacy|2026-07-28] [--expect VERSION] stdio -- <server argv…>
    py2_check.py [--mode auto|legacy|2026-07-28] [--expect VERSION] http <url>

`mode="auto"` sends `server/discover` first and stays in the stateless era (2026-07-28) when the server
answers it, else falls back to `initialize`; a server that ignored the probe would cost every client 10 s,
so the connect time is a check of its own. Prints `PASS <check>` / `FAIL <check>: why`, then
`connect_seconds=<s>` and `N passed, N failed`; exits 0 only if everything passed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from mcp import StdioServerParameters
from mcp.client import Client

CONNECT_BUDGET = 3.0  # seconds; the discover fallback must not wait for a timeout


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, ok: bool, why: str = "") -> None:
        if ok:
            self.passed += 1
            print(f"PASS {name}", flush=True)
        else:
            self.failed += 1
            print(f"FAIL {name}: {why}", flush=True)


async def exercise(target: Any, mode: str, expect: str, report: Report) -> None:
    started = time.perf_counter()
    async with Client(target, mode=mode, read_timeout_seconds=20) as client:  # type: ignore[arg-type]
        connected = time.perf_counter() - started
        print(f"connect_seconds={connected:.3f}", flush=True)
        report.check("connect is fast", connected < CONNECT_BUDGET, f"{connected:.2f} s")
        report.check(f"negotiated {expect}", client.protocol_version == expect, str(client.protocol_version))
        if mode in ("auto", "legacy"):
            info = client.server_info
            name = info.name if info is not None else None
        else:  # a pinned version skips discovery: ask for it
            raw = await client.session.send_discover(expect)
            name = raw.get("_meta", {}).get("io.modelcontextprotocol/serverInfo", {}).get("name")
        report.check("serverInfo", name == "contree-mcp-conformance", repr(name))
        if expect != "2026-07-28":  # ping is gone from the stateless era
            await client.send_ping()
            report.check("ping", True)
        names: list[str] = []
        cursor: str | None = None
        while True:
            page = await client.list_tools(cursor=cursor)
            names += [t.name for t in page.tools]
            cursor = page.next_cursor
            if cursor is None:
                break
        report.check("tools/list", "test_simple_text" in names and len(names) == len(set(names)), repr(names))
        result = await client.call_tool("test_simple_text", {})
        text = getattr(result.content[0], "text", None)
        report.check("tools/call", text == "This is a simple text response for testing.", repr(result))
        progress: list[float] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append(value)

        await client.call_tool("test_tool_with_progress", {}, progress_callback=on_progress)
        report.check("progress", progress == [0, 50, 100], repr(progress))
        read = await client.read_resource("test://static-text")
        body = getattr(read.contents[0], "text", None)
        report.check("resources/read", body == "This is the content of the static text resource.", repr(read))
        prompt = await client.get_prompt("test_simple_prompt")
        report.check("prompts/get", len(prompt.messages) == 1, repr(prompt))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="auto")
    parser.add_argument("--expect", default="2026-07-28", help="the version the client must settle on")
    parser.add_argument("transport", choices=("stdio", "http"))
    parser.add_argument("target", nargs="+")
    args = parser.parse_args(argv)
    if args.transport == "stdio":
        command, *rest = args.target
        target: Any = StdioServerParameters(command=command, args=rest)
    else:
        target = args.target[0]
    report = Report()
    try:
        asyncio.run(exercise(target, args.mode, args.expect, report))
    except Exception as exc:  # any client error is a failed run, reported, not a traceback
        report.check("session", False, f"{type(exc).__name__}: {exc}")
    print(f"{report.passed} passed, {report.failed} failed", flush=True)
    return 0 if report.failed == 0 and report.passed > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
