"""Every JSON-RPC error code the server emits (one meaning each) and the exceptions that carry them.

Codes of the JSON-RPC 2.0 spec, two grandfathered implementation codes the SDK servers share with us
(-32000, -32001: the MCP spec keeps that sub-range for codes allocated before 2026-07-28), the legacy
resource-not-found code and the 2026-07-28 codes from the range the MCP spec reserves (-32020…-32022).
"""

from __future__ import annotations

from typing import Any

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# The transport refused the message before any processing (a Host/Origin/token/Accept/Content-Type/session
# check, or a limit such as too many requests in flight): nothing ran, and the message says why.
REQUEST_REJECTED = -32000
# The Mcp-Session-Id names no live session (Streamable HTTP ≤ 2025-11-25: the client re-initializes).
SESSION_NOT_FOUND = -32001
# Up to 2025-11-25 only; 2026-07-28 answers a missing resource with INVALID_PARAMS.
RESOURCE_NOT_FOUND = -32002
# 2026-07-28 (HTTP status 400 on Streamable HTTP).
HEADER_MISMATCH = -32020
MISSING_CLIENT_CAPABILITY = -32021
UNSUPPORTED_PROTOCOL_VERSION = -32022


class McpError(Exception):
    """An error that becomes a JSON-RPC error response (code, message, optional data).

    `status` is the HTTP status the Streamable HTTP binding answers with when the error is the whole
    answer to a stateless (2026-07-28) request; everything else is answered with 200."""

    code = INTERNAL_ERROR
    status = 200

    def __init__(self, message: str, *, code: int | None = None, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.data = data


class InvalidRequest(McpError):
    code = INVALID_REQUEST


class MethodNotFound(McpError):
    code = METHOD_NOT_FOUND


class InvalidParams(McpError):
    code = INVALID_PARAMS


class InvalidMeta(InvalidParams):
    """A 2026-07-28 request without its required `_meta` fields (malformed: HTTP 400)."""

    status = 400


class ResourceNotFound(McpError):
    """-32002 up to 2025-11-25; the core turns it into INVALID_PARAMS for 2026-07-28 requests."""

    code = RESOURCE_NOT_FOUND

    def __init__(self, uri: str, message: str | None = None) -> None:
        super().__init__(message or f"Resource not found: {uri}", data={"uri": uri})
        self.uri = uri


class CallFailed(McpError):
    """A handler failure that must reach the client as a JSON-RPC error rather than as an `isError` tool
    result (a protocol-level fault: a missing client capability, a broken server)."""


class HeaderMismatch(McpError):
    code = HEADER_MISMATCH
    status = 400


class MissingClientCapability(CallFailed):
    """The request needs a client capability its `_meta` did not declare (2026-07-28)."""

    code = MISSING_CLIENT_CAPABILITY
    status = 400

    def __init__(self, required: dict[str, Any], message: str | None = None) -> None:
        names = ", ".join(_capability_names(required))
        super().__init__(
            message or f"Missing required client capability: {names}", data={"requiredCapabilities": required}
        )


class UnsupportedVersion(McpError):
    code = UNSUPPORTED_PROTOCOL_VERSION
    status = 400

    def __init__(self, requested: Any, supported: list[str]) -> None:
        shown = requested if isinstance(requested, str) else repr(requested)
        super().__init__(
            f"Unsupported protocol version: {shown[:64]}",
            data={"supported": supported, "requested": requested},
        )


class ToolError(Exception):
    """An expected tool failure: the model sees `Error executing tool <name>: <message>`, no traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ClientRequestError(McpError):
    """A server→client request failed: the client answered with an error, did not answer in time, lacks
    the capability, or the session closed. Handlers see it; it never reaches the wire with this code."""


class InputRequired(BaseException):
    """Raised by `RequestContext.request` in a stateless (2026-07-28) call that needs answers the client
    has not given yet: the call ends with an `input_required` result and is retried with the answers.

    A BaseException because it must unwind through handlers' `except Exception` blocks untouched, like
    `asyncio.CancelledError`."""

    def __init__(self, requests: dict[str, tuple[str, dict[str, Any]]]) -> None:
        super().__init__(", ".join(requests))
        self.requests = requests  # key → (method, params)


def _capability_names(required: dict[str, Any]) -> list[str]:
    names = [k for k in required if k != "extensions"]
    extensions = required.get("extensions")
    if isinstance(extensions, dict):
        names.extend(extensions)
    return names
