"""The fixture tools, resources and prompts the official MCP conformance suite calls (MCP-PROTOCOL.md §10.2):
those of the handshake era here, those of 2026-07-28 in `stateless_fixtures`.

`python -m protocol.testing.conformance --mode stdio|http --http-listen 127.0.0.1 --http-port N` serves them;
`contree-mcp --conformance` calls `main`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import struct
import zlib
from typing import Any

import msgspec

from protocol.content import AudioContent, EmbeddedResource, ImageContent, ResourceContents, TextContent
from protocol.errors import ToolError
from protocol.messages import GetPromptResult, PromptMessage
from protocol.registry import PromptArgument, Registry, RequestContext, ToolResult
from protocol.testing import stateless_fixtures


def _png_1x1_red() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    pixels = zlib.compress(b"\x00\xff\x00\x00")  # filter byte + one red pixel
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _wav_silence(samples: int = 800, rate: int = 8000) -> bytes:
    data = b"\x80" * samples  # 8-bit unsigned PCM silence
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate, 1, 8)
    body = (
        b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


PNG = _png_1x1_red()
WAV = _wav_silence()

JSON_SCHEMA_2020_12: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {
        "address": {
            "$anchor": "addressDef",
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        }
    },
    "properties": {
        "name": {"type": "string"},
        "address": {"$ref": "#/$defs/address"},
        "contactMethod": {"type": "string", "enum": ["phone", "email"]},
        "phone": {"type": "string"},
        "email": {"type": "string"},
    },
    "allOf": [{"anyOf": [{"required": ["phone"]}, {"required": ["email"]}]}],
    "if": {"properties": {"contactMethod": {"const": "phone"}}, "required": ["contactMethod"]},
    "then": {"required": ["phone"]},
    "else": {"required": ["email"]},
    "additionalProperties": False,
}


class SamplingParams(msgspec.Struct, kw_only=True):
    prompt: str


class ElicitationParams(msgspec.Struct, kw_only=True):
    message: str


def _text(text: str, *, is_error: bool = False) -> ToolResult:
    return ToolResult(content=[TextContent(text)], is_error=is_error)


def installed_version() -> str:
    """The contree-mcp version, for the fixtures' serverInfo (the protocol core takes it as given)."""
    try:
        return importlib.metadata.version("contree-mcp")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+source"


def build_registry(version: str | None = None) -> Registry:
    r = Registry(
        "contree-mcp-conformance",
        version or installed_version(),
        title="contree-mcp conformance fixtures",
        description="The official MCP conformance suite's fixtures on contree-mcp's protocol stack.",
        instructions="Conformance fixtures: tools, resources and prompts named test_*.",
    )

    @r.tool("test_simple_text", description="Returns a simple text response.")
    async def simple_text(ctx: RequestContext) -> ToolResult:
        return _text("This is a simple text response for testing.")

    @r.tool("test_image_content", description="Returns one PNG image.")
    async def image_content(ctx: RequestContext) -> ToolResult:
        return ToolResult(content=[ImageContent.from_bytes(PNG, "image/png")])

    @r.tool("test_audio_content", description="Returns one WAV audio clip.")
    async def audio_content(ctx: RequestContext) -> ToolResult:
        return ToolResult(content=[AudioContent.from_bytes(WAV, "audio/wav")])

    @r.tool("test_embedded_resource", description="Returns one embedded text resource.")
    async def embedded_resource(ctx: RequestContext) -> ToolResult:
        resource = ResourceContents(
            "test://embedded-resource", "text/plain", text="This is an embedded resource content."
        )
        return ToolResult(content=[EmbeddedResource(resource)])

    @r.tool("test_multiple_content_types", description="Returns text, an image and an embedded resource.")
    async def multiple_content_types(ctx: RequestContext) -> ToolResult:
        resource = ResourceContents(
            "test://mixed-content-resource", "application/json", text='{"test":"data","value":123}'
        )
        return ToolResult(
            content=[
                TextContent("Multiple content types test:"),
                ImageContent.from_bytes(PNG, "image/png"),
                EmbeddedResource(resource),
            ]
        )

    @r.tool("test_tool_with_logging", description="Sends three info log notifications while it runs.")
    async def tool_with_logging(ctx: RequestContext) -> ToolResult:
        await ctx.log("info", "Tool execution started")
        await asyncio.sleep(0.05)
        await ctx.log("info", "Tool processing data")
        await asyncio.sleep(0.05)
        await ctx.log("info", "Tool execution completed")
        return _text("Tool with logging executed successfully")

    @r.tool("test_tool_with_progress", description="Reports progress 0, 50 and 100 of 100.")
    async def tool_with_progress(ctx: RequestContext) -> ToolResult:
        for step in (0, 50, 100):
            if step:
                await asyncio.sleep(0.05)
            await ctx.progress(step, 100, f"Completed step {step} of 100")
        return _text("Tool with progress executed successfully")

    @r.tool("test_error_handling", description="Always fails (isError result).")
    async def error_handling(ctx: RequestContext) -> ToolResult:
        return _text("This tool intentionally returns an error for testing", is_error=True)

    @r.tool("test_reconnection", description="Closes its SSE stream mid-call, then answers (SEP-1699).")
    async def reconnection(ctx: RequestContext) -> ToolResult:
        await asyncio.sleep(0.05)
        closed = await ctx.close_stream(retry_ms=100)
        await asyncio.sleep(0.3 if closed else 0)
        return _text("Reconnection test completed" + ("" if closed else " (stream not closable)"))

    @r.tool(
        "test_sampling", description="Asks the client's LLM (sampling/createMessage) and echoes the answer."
    )
    async def sampling(params: SamplingParams, ctx: RequestContext) -> ToolResult:
        answer = await ctx.request(
            "sampling/createMessage",
            {
                "messages": [{"role": "user", "content": {"type": "text", "text": params.prompt}}],
                "maxTokens": 100,
            },
        )
        content = answer.get("content")
        text = content.get("text") if isinstance(content, dict) else None
        if not isinstance(text, str):
            raise ToolError("the sampling answer has no text content")
        return _text(f"LLM response: {text}")

    @r.tool("test_elicitation", description="Asks the user (elicitation/create) for a username and email.")
    async def elicitation(params: ElicitationParams, ctx: RequestContext) -> ToolResult:
        answer = await ctx.request(
            "elicitation/create",
            {
                "message": params.message,
                "requestedSchema": {
                    "type": "object",
                    "properties": {
                        "username": {"type": "string", "description": "User's response"},
                        "email": {"type": "string", "description": "User's email address"},
                    },
                    "required": ["username", "email"],
                },
            },
        )
        return _text(f"User response: action={answer.get('action')}, content={_json(answer.get('content'))}")

    @r.tool(
        "test_elicitation_sep1034_defaults",
        description="Elicitation with a default for every primitive type.",
    )
    async def elicitation_defaults(ctx: RequestContext) -> ToolResult:
        schema = {
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "User name", "default": "John Doe"},
                "age": {"type": "integer", "description": "User age", "default": 30},
                "score": {"type": "number", "description": "User score", "default": 95.5},
                "status": {
                    "type": "string",
                    "description": "User status",
                    "enum": ["active", "inactive", "pending"],
                    "default": "active",
                },
                "verified": {"type": "boolean", "description": "Verification status", "default": True},
            },
            "required": [],
        }
        answer = await ctx.request(
            "elicitation/create", {"message": "Please review your profile", "requestedSchema": schema}
        )
        return _text(
            f"Elicitation completed: action={answer.get('action')}, content={_json(answer.get('content'))}"
        )

    @r.tool("test_elicitation_sep1330_enums", description="Elicitation with the five enum schema shapes.")
    async def elicitation_enums(ctx: RequestContext) -> ToolResult:
        schema = {
            "type": "object",
            "properties": {
                "untitledSingle": {"type": "string", "enum": ["option1", "option2", "option3"]},
                "titledSingle": {
                    "type": "string",
                    "oneOf": [
                        {"const": "value1", "title": "First Option"},
                        {"const": "value2", "title": "Second Option"},
                        {"const": "value3", "title": "Third Option"},
                    ],
                },
                "legacyEnum": {
                    "type": "string",
                    "enum": ["opt1", "opt2", "opt3"],
                    "enumNames": ["Option One", "Option Two", "Option Three"],
                },
                "untitledMulti": {
                    "type": "array",
                    "items": {"type": "string", "enum": ["option1", "option2", "option3"]},
                },
                "titledMulti": {
                    "type": "array",
                    "items": {
                        "anyOf": [
                            {"const": "value1", "title": "First Choice"},
                            {"const": "value2", "title": "Second Choice"},
                            {"const": "value3", "title": "Third Choice"},
                        ]
                    },
                },
            },
            "required": [],
        }
        answer = await ctx.request(
            "elicitation/create", {"message": "Choose your options", "requestedSchema": schema}
        )
        return _text(
            f"Elicitation completed: action={answer.get('action')}, content={_json(answer.get('content'))}"
        )

    @r.tool(
        "json_schema_2020_12_tool",
        description="Tool with JSON Schema 2020-12 features",
        input_schema=JSON_SCHEMA_2020_12,
    )
    async def json_schema_tool(arguments: dict[str, Any], ctx: RequestContext) -> ToolResult:
        return _text("ok")

    @r.resource(
        "test://static-text",
        name="static-text",
        description="A static text resource.",
        mime_type="text/plain",
    )
    async def static_text(ctx: RequestContext) -> str:
        return "This is the content of the static text resource."

    @r.resource(
        "test://static-binary",
        name="static-binary",
        description="A static PNG resource.",
        mime_type="image/png",
    )
    async def static_binary(ctx: RequestContext) -> bytes:
        return PNG

    @r.resource(
        "test://watched-resource",
        name="watched-resource",
        description="A resource clients can subscribe to.",
        mime_type="text/plain",
    )
    async def watched(ctx: RequestContext) -> str:
        return "Watched resource content."

    @r.resource_template(
        "test://template/{id}/data",
        name="template-data",
        description="JSON data for an id.",
        mime_type="application/json",
    )
    async def template_data(ctx: RequestContext, id: str) -> str:
        return _json({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})

    @r.prompt("test_simple_prompt", description="A simple prompt without arguments.")
    async def simple_prompt(ctx: RequestContext) -> str:
        return "This is a simple prompt for testing."

    @r.prompt(
        "test_prompt_with_arguments",
        description="A prompt with two required arguments.",
        arguments=[
            PromptArgument("arg1", "First test argument", required=True),
            PromptArgument("arg2", "Second test argument", required=True),
        ],
    )
    async def prompt_with_arguments(ctx: RequestContext, arg1: str, arg2: str) -> str:
        return f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"

    @r.prompt(
        "test_prompt_with_embedded_resource",
        description="A prompt embedding a resource.",
        arguments=[PromptArgument("resourceUri", "URI of the resource to embed", required=True)],
    )
    async def prompt_with_resource(ctx: RequestContext, resourceUri: str) -> GetPromptResult:
        resource = ResourceContents(resourceUri, "text/plain", text="Embedded resource content for testing.")
        return GetPromptResult(
            [
                PromptMessage("user", EmbeddedResource(resource)),
                PromptMessage("user", TextContent("Please process the embedded resource above.")),
            ]
        )

    @r.prompt("test_prompt_with_image", description="A prompt with an image.")
    async def prompt_with_image(ctx: RequestContext) -> GetPromptResult:
        return GetPromptResult(
            [
                PromptMessage("user", ImageContent.from_bytes(PNG, "image/png")),
                PromptMessage("user", TextContent("Please analyze the image above.")),
            ]
        )

    @r.completion("ref/prompt", "test_prompt_with_arguments", "arg1")
    async def complete_arg1(ctx: RequestContext, value: str, context_args: dict[str, str]) -> list[str]:
        return [v for v in ("paris", "park", "party", "pasta") if v.startswith(value)]

    @r.completion("ref/resource", "test://template/{id}/data", "id")
    async def complete_id(ctx: RequestContext, value: str, context_args: dict[str, str]) -> list[str]:
        return [v for v in ("1", "12", "123") if v.startswith(value)]

    stateless_fixtures.register(r)
    return r


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protocol.testing.conformance", description=__doc__)
    parser.add_argument("--mode", choices=("stdio", "http"), default="stdio")
    parser.add_argument("--http-listen", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=3000)
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--server-version", default=None, help="serverInfo.version (default: installed)")
    args = parser.parse_args(argv)

    from protocol.server import Server

    server = Server(build_registry(args.server_version), page_size=args.page_size)
    if args.mode == "stdio":
        from protocol.stdio import run_stdio

        return run_stdio(server)
    return _serve_http(server, args.http_listen, args.http_port)


def _serve_http(server: Any, listen: str, port: int) -> int:
    from protocol.http_app import run_http
    from protocol.http_guard import HttpSettings

    return run_http(server, HttpSettings(listen=listen, port=port))


if __name__ == "__main__":
    raise SystemExit(main())
