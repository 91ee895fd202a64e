"""The registry contract (docs/contracts.md §1): schemas derived from msgspec types, results, templates."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import msgspec
import pytest

from protocol.errors import ResourceNotFound, ToolError
from protocol.registry import PromptArgument, Registry, RequestContext, compile_template
from tests.protocol.conftest import Harness, error_code


class Limits(msgspec.Struct, kw_only=True):
    cpu: int = 1


class RunParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    command: Annotated[str, msgspec.Meta(description="Shell command to run")]
    limits: Limits | None = None
    wait: bool = True


class RunResult(msgspec.Struct):
    exit_code: int
    stdout: str


class OperationRef(msgspec.Struct):
    operation_id: str


def _registry() -> Registry:
    r = Registry("t", "1")

    @r.tool("run", description="runs")
    async def run(params: RunParams, ctx: RequestContext) -> RunResult:
        return RunResult(0, params.command)

    @r.tool("maybe", description="union result")
    async def maybe(params: RunParams, ctx: RequestContext) -> RunResult | OperationRef:
        return OperationRef("op-1") if not params.wait else RunResult(0, "x")

    @r.tool("count", description="int result")
    async def count(ctx: RequestContext) -> int:
        return 42

    @r.tool("expected_failure", description="raises ToolError")
    async def expected_failure(ctx: RequestContext) -> int:
        raise ToolError("image not found")

    @r.tool("bug", description="raises")
    async def bug(ctx: RequestContext) -> int:
        raise KeyError("boom")

    @r.resource_template("contree://image/{image}/read/{path}", name="read", mime_type="text/plain")
    async def read(ctx: RequestContext, image: str, path: str) -> str:
        return f"{image}|{path}"

    @r.prompt("shell", description="p", arguments=[PromptArgument("command", "cmd", required=True)])
    async def shell(ctx: RequestContext, command: str) -> str:
        return f"run {command}"

    return r


async def _ready() -> Harness:
    h = Harness(_registry())
    await h.initialize()
    return h


async def _tools(h: Harness) -> dict[str, Any]:
    return {t["name"]: t for t in (await h.result("tools/list"))["tools"]}


async def test_input_schema_is_the_struct_schema_not_a_ref() -> None:
    tool = (await _tools(await _ready()))["run"]
    schema = tool["inputSchema"]
    assert schema["type"] == "object" and "$ref" not in schema
    assert schema["properties"]["command"] == {"type": "string", "description": "Shell command to run"}
    assert schema["required"] == ["command"]
    assert "Limits" in schema["$defs"]


async def test_struct_return_gives_its_own_output_schema() -> None:
    schema = (await _tools(await _ready()))["run"]["outputSchema"]
    assert schema["type"] == "object" and set(schema["properties"]) == {"exit_code", "stdout"}


async def test_union_return_is_wrapped_in_result() -> None:
    schema = (await _tools(await _ready()))["maybe"]["outputSchema"]
    assert schema["required"] == ["result"] and "anyOf" in schema["properties"]["result"]
    assert {"RunResult", "OperationRef"} <= set(schema["$defs"])


async def test_struct_result_is_structured_and_pretty_text() -> None:
    h = await _ready()
    result = await h.result("tools/call", {"name": "run", "arguments": {"command": "ls"}})
    assert result["structuredContent"] == {"exit_code": 0, "stdout": "ls"}
    assert result["content"] == [{"type": "text", "text": '{\n  "exit_code": 0,\n  "stdout": "ls"\n}'}]


async def test_wrapped_result_text_holds_the_unwrapped_value() -> None:
    h = await _ready()
    result = await h.result("tools/call", {"name": "maybe", "arguments": {"command": "x", "wait": False}})
    assert result["structuredContent"] == {"result": {"operation_id": "op-1"}}
    assert msgspec.json.decode(result["content"][0]["text"]) == {"operation_id": "op-1"}
    scalar = await h.result("tools/call", {"name": "count"})
    assert scalar["structuredContent"] == {"result": 42} and scalar["content"][0]["text"] == "42"


async def test_unknown_arguments_are_ignored() -> None:
    h = await _ready()
    result = await h.result("tools/call", {"name": "run", "arguments": {"command": "ls", "extra": 1}})
    assert "isError" not in result


async def test_missing_argument_is_an_error_result_with_prefix() -> None:
    h = await _ready()
    result = await h.result("tools/call", {"name": "run", "arguments": {}})
    assert result["isError"] is True
    assert result["content"][0]["text"].startswith("Error executing tool run: ")
    assert "command" in result["content"][0]["text"]


async def test_tool_error_message_reaches_the_model() -> None:
    h = await _ready()
    result = await h.result("tools/call", {"name": "expected_failure"})
    assert result == {
        "content": [{"type": "text", "text": "Error executing tool expected_failure: image not found"}],
        "isError": True,
    }


async def test_unexpected_exception_is_logged_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    h = await _ready()
    with caplog.at_level(logging.ERROR):
        result = await h.result("tools/call", {"name": "bug"})
    assert result["isError"] is True and result["content"][0]["text"] == "Error executing tool bug: 'boom'"
    assert any(r.exc_info for r in caplog.records)


async def test_template_path_variable_spans_slashes_and_is_percent_decoded() -> None:
    h = await _ready()
    result = await h.result("resources/read", {"uri": "contree://image/abc/read/etc/os%20release"})
    assert result["contents"][0]["text"] == "abc|etc/os release"


async def test_template_path_variable_may_be_empty() -> None:
    h = await _ready()
    result = await h.result("resources/read", {"uri": "contree://image/abc/read/"})
    assert result["contents"][0]["text"] == "abc|"


async def test_template_other_variables_match_one_segment() -> None:
    h = await _ready()
    assert error_code(await h.request("resources/read", {"uri": "contree://image/a/b/read/x"})) == -32002


def test_compile_template_only_last_path_spans() -> None:
    pattern, names = compile_template("x://{path}/and/{name}")
    assert names == ["path", "name"]
    assert pattern.fullmatch("x://a/b/and/c") is None
    assert pattern.fullmatch("x://a/and/c") is not None


async def test_prompt_returning_text_is_one_user_message() -> None:
    h = await _ready()
    result = await h.result("prompts/get", {"name": "shell", "arguments": {"command": "ls"}})
    assert result == {
        "messages": [{"role": "user", "content": {"type": "text", "text": "run ls"}}],
        "description": "p",
    }


def test_tool_names_are_validated() -> None:
    with pytest.raises(ValueError):
        Registry("t").tool("has space", description="x")
    with pytest.raises(ValueError):
        Registry("t").tool("x" * 129, description="x")


def test_duplicate_tool_is_rejected() -> None:
    r = Registry("t")

    async def f(ctx: RequestContext) -> int:
        return 1

    r.tool("a", description="x")(f)
    with pytest.raises(ValueError):
        r.tool("a", description="x")(f)


async def test_find_resource_raises_not_found() -> None:
    with pytest.raises(ResourceNotFound):
        _registry().find_resource("nothing://here")


async def test_types_local_to_the_registering_function_resolve() -> None:
    class LocalParams(msgspec.Struct, kw_only=True):
        n: int

    class LocalResult(msgspec.Struct):
        doubled: int

    r = Registry("t", "1")

    @r.tool("double", description="doubles")
    async def double(params: LocalParams, ctx: RequestContext) -> LocalResult:
        return LocalResult(params.n * 2)

    h = Harness(r)
    await h.initialize()
    result = await h.result("tools/call", {"name": "double", "arguments": {"n": 4}})
    assert result["structuredContent"] == {"doubled": 8}


async def test_context_parameter_is_found_by_its_annotation() -> None:
    r = Registry("t", "1")

    @r.tool("no_args", description="context under another name")
    async def no_args(context: RequestContext) -> str:
        return context.protocol_version

    h = Harness(r)
    await h.initialize("2025-06-18")
    tools = (await h.result("tools/list"))["tools"]
    assert tools[0]["inputSchema"] == {"type": "object", "additionalProperties": False}
    assert (await h.result("tools/call", {"name": "no_args"}))["structuredContent"] == {
        "result": "2025-06-18"
    }
