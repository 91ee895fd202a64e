"""JSON-RPC 2.0 envelopes and MCP shapes as msgspec Structs: inbound request params, outbound results.

Inbound params are frozen Structs decoded straight from the request bytes (a bad field names itself);
outbound shapes share their settings through two bases instead of repeating them.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from protocol.content import Content, ResourceContents
from protocol.types import RequestId

__all__ = ["RequestId"]

# ---------------------------------------------------------------- bases


class Wire(msgspec.Struct, rename="camel", omit_defaults=True):
    """Outbound shapes: camelCase names, unset optional fields left out."""


class Params(msgspec.Struct, rename="camel", kw_only=True):
    """Inbound request params: camelCase names, unknown fields ignored (clients add their own). Decoded
    once per request and never changed afterwards."""

    meta: dict[str, Any] | None = msgspec.field(default=None, name="_meta")


# ---------------------------------------------------------------- inbound (parsed by the session)


class Envelope(msgspec.Struct):
    """One JSON-RPC message as it arrived: values kept loose so the session can name what is wrong."""

    jsonrpc: Any = msgspec.UNSET
    id: Any = msgspec.UNSET
    method: Any = msgspec.UNSET
    params: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    result: Any = msgspec.UNSET
    error: Any = msgspec.UNSET


class Request(msgspec.Struct, frozen=True):
    id: RequestId
    method: str
    params: msgspec.Raw | None = None


class Notification(msgspec.Struct, frozen=True):
    method: str
    params: msgspec.Raw | None = None


class Response(msgspec.Struct, frozen=True):
    """A client's answer to a server→client request."""

    id: RequestId
    result: Any = None
    error: dict[str, Any] | None = None


class Invalid(msgspec.Struct, frozen=True):
    """A frame element that is not a valid message; `reply` is the error to send (None: say nothing)."""

    reply: bytes | None


Message = Request | Notification | Response | Invalid


class InitializeParams(Params):
    protocol_version: str
    capabilities: Any = None  # a non-object is tolerated as "no capabilities"
    client_info: Any = None


class CursorParams(Params):
    cursor: Any = None  # the catalog says what is wrong with a bad one


class SetLevelParams(Params):
    level: Any = None


class UriParams(Params):
    """resources/read, resources/subscribe, resources/unsubscribe."""

    uri: str


class CallToolParams(Params):
    name: str
    arguments: dict[str, Any] | None = None
    # 2026-07-28 multi round-trip: the answers to an input_required result, and its echoed state.
    input_responses: dict[str, dict[str, Any]] | None = None
    request_state: str | None = None
    task: Any = None  # a 2025-11-25 task hint: tolerated, never decisive


class GetPromptParams(Params):
    name: str
    arguments: dict[str, str] | None = None
    input_responses: dict[str, dict[str, Any]] | None = None
    request_state: str | None = None


class ReadResourceParams(UriParams):
    input_responses: dict[str, dict[str, Any]] | None = None
    request_state: str | None = None


class CompletionRef(msgspec.Struct):
    type: str
    name: str | None = None
    uri: str | None = None


class CompletionArgument(msgspec.Struct):
    name: str
    value: str = ""


class CompleteParams(Params):
    ref: CompletionRef
    argument: CompletionArgument
    context: Any = None  # {arguments: {name: value}}; anything else is ignored

    def context_arguments(self) -> dict[str, str]:
        context = self.context
        raw = context.get("arguments") if type(context) is dict else None
        return {k: v for k, v in raw.items() if type(v) is str} if type(raw) is dict else {}


class CancelledParams(Params):
    request_id: Any = None
    reason: Any = None


class TaskParams(Params):
    task_id: str


class TaskUpdateParams(TaskParams):
    input_responses: dict[str, dict[str, Any]]


class ListenFilter(msgspec.Struct, rename="camel", kw_only=True):
    tools_list_changed: bool = False
    prompts_list_changed: bool = False
    resources_list_changed: bool = False
    resource_subscriptions: list[str] = msgspec.field(default_factory=list)
    task_ids: list[str] = msgspec.field(default_factory=list)


class ListenParams(Params):
    notifications: ListenFilter = msgspec.field(default_factory=ListenFilter)


HandlerParams = CallToolParams | ReadResourceParams | GetPromptParams | CompleteParams

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


def encode_raw_result(id: RequestId, result: bytes) -> bytes:
    """A response around an already encoded result object (cached listings, spliced modern fields)."""
    return b'{"jsonrpc":"2.0","id":%s,"result":%s}' % (encode(id), result)


def encode_error(id: RequestId | None, code: int, message: str, data: Any = None) -> bytes:
    return encode(_ErrorEnvelope("2.0", id, ErrorObject(code, message, data)))


def encode_request(id: RequestId, method: str, params: Any = None) -> bytes:
    return encode(_RequestEnvelope("2.0", id, method, params))


def encode_notification(method: str, params: Any = None) -> bytes:
    return encode(_NotificationEnvelope("2.0", method, params))


def with_fields(prefix: bytes, body: bytes) -> bytes:
    """`body` (an encoded object) with the encoded members `prefix` (`"a":1,"b":2`) added in front."""
    if body == b"{}":
        return b"{" + prefix + b"}"
    return b"{" + prefix + b"," + body[1:]


# ---------------------------------------------------------------- MCP shapes


class Icon(Wire):
    src: str
    mime_type: str | None = None
    sizes: list[str] | None = None


class Implementation(Wire):
    name: str
    version: str
    title: str | None = None
    description: str | None = None
    website_url: str | None = None
    icons: list[Icon] | None = None


class InitializeResult(Wire):
    protocol_version: str
    capabilities: dict[str, Any]
    server_info: Implementation
    instructions: str | None = None


class DiscoverResult(Wire):
    supported_versions: list[str]
    capabilities: dict[str, Any]
    instructions: str | None = None


class ToolAnnotationsWire(Wire):
    title: str | None = None
    read_only_hint: bool | None = None
    destructive_hint: bool | None = None
    idempotent_hint: bool | None = None
    open_world_hint: bool | None = None


class ToolWire(Wire):
    name: str
    title: str | None = None
    description: str | None = None
    input_schema: dict[str, Any] = msgspec.field(default_factory=dict)
    output_schema: dict[str, Any] | None = None
    annotations: ToolAnnotationsWire | None = None
    icons: list[Icon] | None = None
    execution: dict[str, Any] | None = None


class ListToolsResult(Wire):
    tools: list[ToolWire]
    next_cursor: str | None = None


class CallToolResult(Wire):
    content: list[Content]
    structured_content: Any = None
    is_error: bool = False


class ResourceWire(Wire):
    uri: str
    name: str
    title: str | None = None
    description: str | None = None
    mime_type: str | None = None
    size: int | None = None
    icons: list[Icon] | None = None


class ResourceTemplateWire(Wire):
    uri_template: str
    name: str
    title: str | None = None
    description: str | None = None
    mime_type: str | None = None
    icons: list[Icon] | None = None


class ListResourcesResult(Wire):
    resources: list[ResourceWire]
    next_cursor: str | None = None


class ListResourceTemplatesResult(Wire):
    resource_templates: list[ResourceTemplateWire]
    next_cursor: str | None = None


class ReadResourceResult(msgspec.Struct):
    contents: list[ResourceContents]


class PromptArgumentWire(Wire):
    name: str
    title: str | None = None
    description: str | None = None
    required: bool = False


class PromptWire(Wire):
    name: str
    title: str | None = None
    description: str | None = None
    arguments: list[PromptArgumentWire] | None = None
    icons: list[Icon] | None = None


class ListPromptsResult(Wire):
    prompts: list[PromptWire]
    next_cursor: str | None = None


class PromptMessage(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: Content


class GetPromptResult(msgspec.Struct, omit_defaults=True):
    messages: list[PromptMessage]
    description: str | None = None


class Completion(Wire):
    values: list[str]
    total: int | None = None
    has_more: bool | None = None


class CompleteResult(msgspec.Struct):
    completion: Completion


class ProgressParams(Wire):
    progress_token: RequestId
    progress: float
    total: float | None = None
    message: str | None = None


class LogParams(msgspec.Struct, omit_defaults=True):
    level: str
    data: Any
    logger: str | None = None


class InputRequest(msgspec.Struct):
    """One entry of a 2026-07-28 `inputRequests` map: the server→client request the client must answer."""

    method: str
    params: dict[str, Any]


class InputRequiredResult(Wire):
    result_type: str  # "input_required"
    input_requests: dict[str, InputRequest] | None = None
    request_state: str | None = None


EMPTY: dict[str, Any] = {}
