"""mcp==2.3.0 client check, run with `.validators/py2/bin/python` (not collected by pytest: no test_ prefix).

    py2_check.py [--mode auto|legacy|2026-07-28] [--expect VERSION] [--profile conformance|real] [--run]
                 stdio -- <server argv…>
    py2_check.py [...] http <url>

`mode="auto"` sends `server/discover` first and stays in the stateless era (2026-07-28) when the server
answers it, else falls back to `initialize`; a server that ignored the probe would cost every client 10 s,
so the connect time is a check of its own. Profiles: `conformance` (the fixture server: content, progress,
resources, prompts, and in the stateless era input-required results the client answers through its
elicitation callback) and `real` (contree-mcp itself; `--run` also runs a command on its engine and
expects progress carrying the command's live output). Prints `PASS <check>` / `FAIL <check>: why`, then
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
from mcp_types import ElicitResult

CONNECT_BUDGET = 3.0  # seconds; the discover fallback must not wait for a timeout
RUN = {"command": "for i in 1 2 3; do echo line-$i; sleep 0.4; done", "image": "busybox:latest"}


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


async def answer_elicitation(context: Any, params: Any) -> ElicitResult:
    """The user in the loop: names are 'Robin', colours 'teal', anything else 'yes'."""
    fields = params.requested_schema.get("properties", {}) if hasattr(params, "requested_schema") else {}
    content: dict[str, Any] = {}
    for name, schema in fields.items():
        if schema.get("type") == "boolean":
            content[name] = True
        else:
            content[name] = {"name": "Robin", "color": "teal"}.get(name, "yes")
    return ElicitResult(action="accept", content=content)


async def exercise(target: Any, args: argparse.Namespace, report: Report) -> None:
    started = time.perf_counter()
    client = Client(
        target,
        mode=args.mode,
        read_timeout_seconds=60,
        elicitation_callback=answer_elicitation,
    )  # type: ignore[arg-type]
    async with client:
        connected = time.perf_counter() - started
        print(f"connect_seconds={connected:.3f}", flush=True)
        report.check("connect is fast", connected < CONNECT_BUDGET, f"{connected:.2f} s")
        expect = args.expect
        stateless = expect == "2026-07-28"
        report.check(f"negotiated {expect}", client.protocol_version == expect, str(client.protocol_version))
        server = "contree-mcp" if args.profile == "real" else "contree-mcp-conformance"
        if args.mode in ("auto", "legacy"):
            info = client.server_info
            name = info.name if info is not None else None
        else:  # a pinned version skips discovery: ask for it
            raw = await client.session.send_discover(expect)
            name = raw.get("_meta", {}).get("io.modelcontextprotocol/serverInfo", {}).get("name")
        report.check("serverInfo", name == server, repr(name))
        if not stateless:  # ping is gone from the stateless era
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
        wanted = "run" if args.profile == "real" else "test_simple_text"
        report.check("tools/list", len(names) == len(set(names)) and wanted in names, repr(names))
        if args.profile == "real":
            await exercise_real(client, args, report)
        else:
            await exercise_conformance(client, stateless, report)


async def exercise_conformance(client: Client, stateless: bool, report: Report) -> None:
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
    if stateless:  # input_required results, answered through the elicitation callback and retried
        rounds = await client.call_tool("test_input_required_result_multi_round", {})
        text = getattr(rounds.content[0], "text", None)
        expected = "Multi-round complete for Robin who likes teal"
        report.check("input_required, two rounds", text == expected, repr(text))
        context = await client.get_prompt("test_input_required_result_prompt")
        said = getattr(context.messages[0].content, "text", None)
        report.check("input_required on prompts/get", said == "Prompt with context: yes", repr(said))


async def exercise_real(client: Client, args: argparse.Namespace, report: Report) -> None:
    guide = await client.call_tool("get_guide", {"section": "state"})
    text = getattr(guide.content[0], "text", "") or ""
    report.check("tools/call get_guide", not guide.is_error and "immutable" in text.lower(), text[:200])
    read = await client.read_resource("contree://guide/workflow")
    body = getattr(read.contents[0], "text", "") or ""
    report.check("resources/read guide", len(body) > 100, body[:200])
    prompts = await client.list_prompts()
    report.check("prompts/list", len(prompts.prompts) > 0, repr(prompts)[:200])
    if args.run:
        messages: list[str] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            messages.append(message or "")

        ran = await client.call_tool("run", RUN, progress_callback=on_progress)
        structured = ran.structured_content or {}
        result = structured.get("result", structured) if isinstance(structured, dict) else {}
        report.check("run", not ran.is_error and result.get("exit_code") == 0, repr(ran)[:400])
        report.check("run output", "line-3" in str(result.get("stdout")), repr(result)[:400])
        live = [m for m in messages if "line-1" in m]
        report.check("progress with live output", len(live) >= 1 and len(messages) >= 3, repr(messages))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="auto")
    parser.add_argument("--expect", default="2026-07-28", help="the version the client must settle on")
    parser.add_argument("--profile", choices=("conformance", "real"), default="conformance")
    parser.add_argument("--run", action="store_true", help="real profile: also run a command on the engine")
    parser.add_argument("transport", choices=("stdio", "http"))
    parser.add_argument("target", nargs="+")
    args = parser.parse_args(argv)
    if args.transport == "stdio":
        command, *rest = [a for a in args.target if a != "--"]
        target: Any = StdioServerParameters(command=command, args=rest)
    else:
        target = args.target[0]
    report = Report()
    try:
        asyncio.run(exercise(target, args, report))
    except Exception as exc:  # any client error is a failed run, reported, not a traceback
        report.check("session", False, f"{type(exc).__name__}: {exc}")
    print(f"{report.passed} passed, {report.failed} failed", flush=True)
    return 0 if report.failed == 0 and report.passed > 0 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
