"""The conformance suite's 2026-07-28 fixtures (0.2.0-alpha.12, `--requirements 2026-07-28`), registered
`since="2026-07-28"` so the handshake-era listings (and their golden transcripts) stay as they were.

Input-required tools ask through `ctx.request` like any handler: the core turns each question into an
`input_required` result and hands the answers back on the retry. Task tools use the Tasks extension.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from protocol.content import TextContent
from protocol.errors import INTERNAL_ERROR, CallFailed
from protocol.messages import GetPromptResult, PromptMessage
from protocol.registry import Registry, RequestContext, ToolResult
from protocol.versions import V2026_07_28

SINCE = V2026_07_28


def _text(text: str, *, is_error: bool = False) -> ToolResult:
    return ToolResult(content=[TextContent(text)], is_error=is_error)


def _form(message: str, field: str, kind: str = "string") -> tuple[str, dict[str, Any]]:
    schema = {"type": "object", "properties": {field: {"type": kind}}, "required": [field]}
    return "elicitation/create", {"message": message, "requestedSchema": schema}


def _sample(text: str, max_tokens: int) -> tuple[str, dict[str, Any]]:
    message = {"role": "user", "content": {"type": "text", "text": text}}
    return "sampling/createMessage", {"messages": [message], "maxTokens": max_tokens}


def _field(answer: dict[str, Any], name: str) -> str:
    content = answer.get("content")
    value = content.get(name) if isinstance(content, dict) else None
    return str(value) if value is not None else "?"


def _sampled(answer: dict[str, Any]) -> str:
    content = answer.get("content")
    text = content.get("text") if isinstance(content, dict) else None
    return text if isinstance(text, str) else "no response"


class GreetParams(msgspec.Struct, kw_only=True):
    name: str = "World"


class ComputeParams(msgspec.Struct, kw_only=True):
    seconds: float = 1.0
    label: str = "job"


class DeleteParams(msgspec.Struct, kw_only=True):
    filename: str = "file.txt"


HEADER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "region": {
            "type": "string",
            "description": "Mirrored into Mcp-Param-Region",
            "x-mcp-header": "Region",
        },
        "query": {"type": "string", "description": "Not mirrored"},
    },
    "required": ["region"],
}


def register(r: Registry) -> None:
    _register_stateless(r)
    _register_input_required(r)
    _register_tasks(r)


def _register_stateless(r: Registry) -> None:
    @r.tool("test_missing_capability", description="Needs the client's sampling capability.", since=SINCE)
    async def missing_capability(ctx: RequestContext) -> ToolResult:
        answer = await ctx.request(*_sample("Say something", 20), key="sample")
        return _text(f"Success: {_sampled(answer)}")

    @r.tool(
        "test_streaming_elicitation",
        description="Reports progress, then asks the user (an input_required result, never a request).",
        since=SINCE,
    )
    async def streaming_elicitation(ctx: RequestContext) -> ToolResult:
        await ctx.progress(50, 100, "halfway")
        answer = await ctx.request(*_form("Anything to add?", "note"), key="note")
        return _text(f"Streaming complete: {_field(answer, 'note')}")

    @r.tool(
        "test_logging_tool", description="Logs at info; quiet unless the request set a logLevel.", since=SINCE
    )
    async def logging_tool(ctx: RequestContext) -> ToolResult:
        await ctx.log("info", "Diagnostic trace logging activated")
        return _text("Logging evaluated")

    @r.tool("test_trigger_tool_change", description="Announces a tools list change.", since=SINCE)
    async def trigger_tool_change(ctx: RequestContext) -> ToolResult:
        r.list_changed("tools")
        return _text("Mutation triggered")

    @r.tool("test_trigger_prompt_change", description="Announces a prompts list change.", since=SINCE)
    async def trigger_prompt_change(ctx: RequestContext) -> ToolResult:
        r.list_changed("prompts")
        return _text("Mutation triggered")

    @r.tool(
        "test_header_param",
        description="Echoes `region`, which clients mirror into the Mcp-Param-Region header.",
        input_schema=HEADER_SCHEMA,
        since=SINCE,
    )
    async def header_param(arguments: dict[str, Any], ctx: RequestContext) -> ToolResult:
        return _text(f"region={arguments.get('region')}")


def _register_input_required(r: Registry) -> None:
    @r.tool("test_input_required_result_elicitation", description="Asks the user's name.", since=SINCE)
    async def elicitation(ctx: RequestContext) -> ToolResult:
        answer = await ctx.request(*_form("What is your name?", "name"), key="user_name")
        return _text(f"Hello, {_field(answer, 'name')}!")

    @r.tool("test_input_required_result_sampling", description="Asks the client's LLM.", since=SINCE)
    async def sampling(ctx: RequestContext) -> ToolResult:
        answer = await ctx.request(*_sample("What is the capital of France?", 100), key="capital_question")
        return _text(f"Sampling result: {_sampled(answer)}")

    @r.tool("test_input_required_result_list_roots", description="Asks for the client's roots.", since=SINCE)
    async def list_roots(ctx: RequestContext) -> ToolResult:
        answer = await ctx.request("roots/list", {}, key="client_roots")
        roots = answer.get("roots")
        return _text(f"Found {len(roots) if isinstance(roots, list) else 0} root(s)")

    @r.tool(
        "test_input_required_result_request_state", description="Confirms through requestState.", since=SINCE
    )
    async def request_state(ctx: RequestContext) -> ToolResult:
        answer = await ctx.request(*_form("Please confirm", "ok", "boolean"), key="confirm")
        content = answer.get("content")
        ok = isinstance(content, dict) and content.get("ok") is True
        return _text("state-ok: requestState validated" if ok else "state-ok: not confirmed")

    @r.tool(
        "test_input_required_result_multiple_inputs", description="Asks three things at once.", since=SINCE
    )
    async def multiple_inputs(ctx: RequestContext) -> ToolResult:
        answers = await ctx.request_many(
            {
                "user_name": _form("What is your name?", "name"),
                "greeting": _sample("Generate a greeting", 50),
                "client_roots": ("roots/list", {}),
            }
        )
        roots = answers["client_roots"].get("roots")
        count = len(roots) if isinstance(roots, list) else 0
        return _text(
            f"Name: {_field(answers['user_name'], 'name')}; Greeting: {_sampled(answers['greeting'])}; "
            f"Roots: {count}"
        )

    @r.tool("test_input_required_result_multi_round", description="Asks two questions in turn.", since=SINCE)
    async def multi_round(ctx: RequestContext) -> ToolResult:
        first = await ctx.request(*_form("Step 1: What is your name?", "name"), key="step1")
        second = await ctx.request(*_form("Step 2: What is your favorite color?", "color"), key="step2")
        return _text(f"Multi-round complete for {_field(first, 'name')} who likes {_field(second, 'color')}")

    @r.tool(
        "test_input_required_result_tampered_state",
        description="Refuses a requestState that was changed on the way.",
        since=SINCE,
    )
    async def tampered_state(ctx: RequestContext) -> ToolResult:
        await ctx.request(*_form("Please confirm", "ok", "boolean"), key="confirm")
        return _text("integrity-ok: state verified")

    @r.tool(
        "test_input_required_result_capabilities",
        description="Asks only through the capabilities the request declared.",
        since=SINCE,
    )
    async def capabilities(ctx: RequestContext) -> ToolResult:
        caps = ctx.client_capabilities
        wanted: dict[str, tuple[str, dict[str, Any]]] = {}
        if "elicitation" in caps:
            wanted["elicit_input"] = _form("Elicitation input", "value")
        if "sampling" in caps:
            wanted["sample_input"] = _sample("Sample request", 50)
        if not wanted:
            return _text("No supported capabilities declared")
        answers = await ctx.request_many(wanted)
        return _text(f"capabilities-ok: received {','.join(sorted(answers))}")

    @r.prompt("test_input_required_result_prompt", description="A prompt that asks for context.", since=SINCE)
    async def prompt(ctx: RequestContext) -> GetPromptResult:
        answer = await ctx.request(
            *_form("What context should the prompt use?", "context"), key="user_context"
        )
        text = f"Prompt with context: {_field(answer, 'context')}"
        return GetPromptResult([PromptMessage("user", TextContent(text))])


def _register_tasks(r: Registry) -> None:
    @r.tool("greet", description="Greets synchronously (never a task).", since=SINCE)
    async def greet(params: GreetParams, ctx: RequestContext) -> ToolResult:
        return _text(f"Hello, {params.name}!")

    @r.tool(
        "slow_compute",
        description="Sleeps `seconds`, as a task when the client supports tasks (0: answers at once).",
        tasks="optional",
        since=SINCE,
    )
    async def slow_compute(params: ComputeParams, ctx: RequestContext) -> ToolResult:
        if params.seconds > 0:
            await ctx.run_as_task(f"computing {params.label}")
        await asyncio.sleep(params.seconds)
        return _text(f"computed {params.label} in {params.seconds:g} s")

    @r.tool(
        "failing_job", description="Fails as a tool (isError) after a second.", tasks="required", since=SINCE
    )
    async def failing_job(ctx: RequestContext) -> ToolResult:
        await ctx.run_as_task("failing soon")
        await asyncio.sleep(1)
        return _text("the job failed on purpose", is_error=True)

    @r.tool("protocol_error_job", description="Fails with a protocol error.", tasks="optional", since=SINCE)
    async def protocol_error_job(ctx: RequestContext) -> ToolResult:
        await ctx.run_as_task("about to break")
        await asyncio.sleep(0.3)
        raise CallFailed("simulated internal failure", code=INTERNAL_ERROR)

    @r.tool(
        "confirm_delete", description="Asks for confirmation inside its task.", tasks="optional", since=SINCE
    )
    async def confirm_delete(params: DeleteParams, ctx: RequestContext) -> ToolResult:
        await ctx.run_as_task(f"deleting {params.filename}")
        answer = await ctx.request(*_form(f"Delete {params.filename}?", "confirm", "boolean"), key="confirm")
        done = answer.get("action") == "accept"
        return _text(f"{params.filename} {'deleted' if done else 'kept'}")

    @r.tool(
        "multi_input",
        description="Asks two questions at once inside its task.",
        tasks="optional",
        since=SINCE,
    )
    async def multi_input(ctx: RequestContext) -> ToolResult:
        await ctx.run_as_task("waiting for two answers")
        answers = await ctx.request_many(
            {"first": _form("First name?", "name"), "second": _form("Confirm?", "confirm", "boolean")}
        )
        return _text(f"got {_field(answers['first'], 'name')} and {_field(answers['second'], 'confirm')}")

    @r.tool(
        "test_tool_with_task",
        description="Asks the user's name (input_required), then continues as a task.",
        tasks="required",
        since=SINCE,
    )
    async def tool_with_task(ctx: RequestContext) -> ToolResult:
        answer = await ctx.request(*_form("What is your name?", "name"), key="user_name")
        await ctx.run_as_task("greeting")
        await asyncio.sleep(0.2)
        return _text(f"Hello, {_field(answer, 'name')}!")
