"""JSON-RPC 2.0 envelopes (inbound, parsed; outbound, encoded) and MCP result shapes as msgspec Structs."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from protocol.content import Content, ResourceContents

RequestId = int | str

# ---------------------------------------------------------------- inbound (produced by the session parser)


class Request(msgspec.Struct):
    id: RequestId
    method: str
    params: dict[str, Any] | None = None


class Notification(msgspec.Struct):
    method: str
    params: dict[str, Any] | None = None


class Response(msgspec.Struct):
    """A client's answer to a server→client request."""

    id: RequestId
    result: Any = None
    error: dict[str, Any] | None = None


class Invalid(msgspec.Struct):
    """A frame element that is not a valid message; `reply` is the error to send (None: say nothing)."""

    reply: bytes | None


Message = Request | Notification | Response | Invalid

# ---------------------------------------------------------------- outbound envelopes


class ErrorObject(msgspec.Struct, omit_defaults=True):
    code: int
    message: str
    data: Any = None


class _ResultEnvelope(msgspec.Struct):
    jsonrpc: str
    id: RequestId
    result: Any


class _ErrorEnvelope(msgspec.Struct):
    jsonrpc: str
    id: RequestId | None
    error: ErrorObject


class _RequestEnvelope(msgspec.Struct, omit_defaults=True):
    jsonrpc: str
    id: RequestId
    method: str
    params: Any = None


class _NotificationEnvelope(msgspec.Struct, omit_defaults=True):
    jsonrpc: str
    method: str
    params: Any = None


_encoder = msgspec.json.Encoder()
encode = _encoder.encode


def encode_result(id: RequestId, result: Any) -> bytes:
    return encode(_ResultEnvelope("2.0", id, result))


def encode_error(id: RequestId | None, code: int, message: str, data: Any = None) -> bytes:
    return encode(_ErrorEnvelope("2.0", id, ErrorObject(code, message, data)))


def encode_request(id: RequestId, method: str, params: Any = None) -> bytes:
    return encode(_RequestEnvelope("2.0", id, method, params))


def encode_notification(method: str, params: Any = None) -> bytes:
    return encode(_NotificationEnvelope("2.0", method, params))


# ---------------------------------------------------------------- MCP shapes


class Icon(msgspec.Struct, rename="camel", omit_defaults=True):
    src: str
    mime_type: str | None = None
    sizes: list[str] | None = None


class Implementation(msgspec.Struct, rename="camel", omit_defaults=True):
    name: str
    version: str
    title: str | None = None
    description: str | None = None
    website_url: str | None = None
    icons: list[Icon] | None = None


class InitializeResult(msgspec.Struct, rename="camel", omit_defaults=True):
    protocol_version: str
    capabilities: dict[str, Any]
    server_info: Implementation
    instructions: str | None = None


class ToolAnnotationsWire(msgspec.Struct, omit_defaults=True):
    title: str | None = None
    readOnlyHint: bool | None = None
    destructiveHint: bool | None = None
    idempotentHint: bool | None = None
    openWorldHint: bool | None = None


class ToolWire(msgspec.Struct, rename="camel", omit_defaults=True):
    name: str
    title: str | None = None
    description: str | None = None
    input_schema: dict[str, Any] = msgspec.field(default_factory=dict)
    output_schema: dict[str, Any] | None = None
    annotations: ToolAnnotationsWire | None = None
    icons: list[Icon] | None = None
    execution: dict[str, Any] | None = None


class ListToolsResult(msgspec.Struct, rename="camel", omit_defaults=True):
    tools: list[ToolWire]
    next_cursor: str | None = None


class CallToolResult(msgspec.Struct, rename="camel", omit_defaults=True):
    content: list[Content]
    structured_content: Any = None
    is_error: bool = False


class ResourceWire(msgspec.Struct, rename="camel", omit_defaults=True):
    uri: str
    name: str
    title: str | None = None
    description: str | None = None
    mime_type: str | None = None
    size: int | None = None
    icons: list[Icon] | None = None


class ResourceTemplateWire(msgspec.Struct, rename="camel", omit_defaults=True):
    uri_template: str
    name: str
    title: str | None = None
    description: str | None = None
    mime_type: str | None = None
    icons: list[Icon] | None = None


class ListResourcesResult(msgspec.Struct, rename="camel", omit_defaults=True):
    resources: list[ResourceWire]
    next_cursor: str | None = None


class ListResourceTemplatesResult(msgspec.Struct, rename="camel", omit_defaults=True):
    resource_templates: list[ResourceTemplateWire]
    next_cursor: str | None = None


class ReadResourceResult(msgspec.Struct):
    contents: list[ResourceContents]


class PromptArgumentWire(msgspec.Struct, omit_defaults=True):
    name: str
    title: str | None = None
    description: str | None = None
    required: bool = False


class PromptWire(msgspec.Struct, omit_defaults=True):
    name: str
    title: str | None = None
    description: str | None = None
    arguments: list[PromptArgumentWire] | None = None
    icons: list[Icon] | None = None


class ListPromptsResult(msgspec.Struct, rename="camel", omit_defaults=True):
    prompts: list[PromptWire]
    next_cursor: str | None = None


class PromptMessage(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: Content


class GetPromptResult(msgspec.Struct, omit_defaults=True):
    messages: list[PromptMessage]
    description: str | None = None


class Completion(msgspec.Struct, rename="camel", omit_defaults=True):
    values: list[str]
    total: int | None = None
    has_more: bool | None = None


class CompleteResult(msgspec.Struct):
    completion: Completion


class ProgressParams(msgspec.Struct, rename="camel", omit_defaults=True):
    progress_token: RequestId
    progress: float
    total: float | None = None
    message: str | None = None


class LogParams(msgspec.Struct, omit_defaults=True):
    level: str
    data: Any
    logger: str | None = None


EMPTY: dict[str, Any] = {}
