"""JSON-RPC error codes and the exceptions handlers raise to produce them."""

from __future__ import annotations

from typing import Any

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
RESOURCE_NOT_FOUND = -32002
REQUEST_TIMEOUT = -32001


class McpError(Exception):
    """An error that becomes a JSON-RPC error response (code, message, optional data)."""

    code = INTERNAL_ERROR

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


class InternalError(McpError):
    code = INTERNAL_ERROR


class ResourceNotFound(McpError):
    code = RESOURCE_NOT_FOUND

    def __init__(self, uri: str, message: str | None = None) -> None:
        super().__init__(message or f"Resource not found: {uri}", data={"uri": uri})
        self.uri = uri


class ToolError(Exception):
    """An expected tool failure: the model sees `Error executing tool <name>: <message>`, no traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ClientRequestError(McpError):
    """A server→client request failed: client error, timeout, or a capability the client lacks."""
