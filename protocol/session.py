"""The sans-IO MCP session: bytes in → parsed frame; request → reply bytes; no asyncio, no I/O.

Transports and `protocol.server` own concurrency; everything here is plain state and rules, so each
rule is unit-testable by feeding bytes and reading bytes (the h11 model).
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from typing import Any

import msgspec

from protocol import versions
from protocol.catalog import Catalog
from protocol.context import LEVELS
from protocol.errors import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    InvalidParams,
    McpError,
)
from protocol.messages import (
    Implementation,
    InitializeResult,
    Invalid,
    Message,
    Notification,
    Request,
    RequestId,
    Response,
    encode,
    encode_error,
)
from protocol.registry import Registry

_decode = msgspec.json.Decoder().decode

# Methods answered at once from session state (no handler task needed).
SYNC_METHODS = frozenset(
    {
        "ping",
        "initialize",
        "logging/setLevel",
        "tools/list",
        "resources/list",
        "resources/templates/list",
        "prompts/list",
        "resources/subscribe",
        "resources/unsubscribe",
    }
)
# Methods that run registry handlers (awaitable, cancellable).
ASYNC_METHODS = frozenset({"tools/call", "resources/read", "prompts/get", "completion/complete"})
MAX_INFLIGHT = 1024
MAX_SUBSCRIPTIONS = 1024
TOO_MANY_REQUESTS = -32000  # implementation-defined range
_LIST_KINDS = {
    "tools/list": "tools",
    "resources/list": "resources",
    "resources/templates/list": "resources/templates",
    "prompts/list": "prompts",
}


@lru_cache(maxsize=1)
def package_version(dist: str = "contree-mcp") -> str:
    """The installed version, read from the dist-info METADATA without importing importlib.metadata
    (which costs tens of milliseconds of start-up)."""
    prefix = dist.replace("-", "_") + "-"
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.startswith(prefix) and name.endswith(".dist-info"):
                try:
                    with open(os.path.join(entry, name, "METADATA"), encoding="utf-8") as f:
                        for line in f:
                            if line.startswith("Version:"):
                                return line.split(":", 1)[1].strip()
                except OSError:
                    continue
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


class Frame:
    """One transport frame (one JSON value), decoded and classified."""

    __slots__ = ("batch", "error_reply", "has_async", "has_requests", "is_initialize", "messages")

    def __init__(
        self,
        messages: list[Message],
        *,
        batch: bool = False,
        error_reply: bytes | None = None,
    ) -> None:
        self.messages = messages
        self.batch = batch
        self.error_reply = error_reply
        # has_requests: an answer will follow (HTTP answers 202 otherwise).
        # has_async: a handler task will run (stdio dispatches such frames concurrently).
        has_requests = error_reply is not None
        has_async = False
        for m in messages:
            t = type(m)
            if t is Request:
                has_requests = True
                if m.method in ASYNC_METHODS:  # type: ignore[union-attr]
                    has_async = True
            elif t is Invalid and m.reply is not None:  # type: ignore[union-attr]
                has_requests = True
        self.has_requests = has_requests
        self.has_async = has_async
        self.is_initialize = not batch and len(messages) == 1 and _is_initialize(messages[0])


def _is_initialize(m: Message) -> bool:
    return type(m) is Request and m.method == "initialize"


def _valid_id(value: Any) -> bool:
    t = type(value)
    return t is str or t is int


def classify(value: Any) -> Message:
    """One decoded JSON value → Request / Notification / Response / Invalid (with its error reply)."""
    if type(value) is not dict:
        return Invalid(encode_error(None, INVALID_REQUEST, "Invalid Request: expected a JSON object"))
    has_id = "id" in value
    rid = value.get("id")
    reply_id = rid if has_id and _valid_id(rid) else None
    if value.get("jsonrpc") != "2.0":
        return Invalid(encode_error(reply_id, INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"'))
    if "method" in value:
        method = value["method"]
        if type(method) is not str:
            return Invalid(
                encode_error(reply_id, INVALID_REQUEST, 'Invalid Request: "method" must be a string')
            )
        params = value.get("params")
        if "params" in value and type(params) is not dict:
            if not has_id:
                return Invalid(None)
            return Invalid(
                encode_error(reply_id, INVALID_REQUEST, 'Invalid Request: "params" must be an object')
            )
        if not has_id:
            return Notification(method, params)
        if reply_id is None:
            return Invalid(
                encode_error(None, INVALID_REQUEST, 'Invalid Request: "id" must be a string or an integer')
            )
        return Request(reply_id, method, params)
    if has_id and ("result" in value or "error" in value):
        error = value.get("error")
        if (
            reply_id is None
            or ("result" in value) == ("error" in value)
            or ("error" in value and type(error) is not dict)
        ):
            return Invalid(None)  # a malformed response is never answered
        return Response(reply_id, value.get("result"), error)
    return Invalid(encode_error(reply_id, INVALID_REQUEST, 'Invalid Request: missing "method"'))


class Session:
    """Per-connection protocol state: negotiation, capabilities, log level, subscriptions, in-flight ids."""

    def __init__(self, registry: Registry, catalog: Catalog) -> None:
        self.registry = registry
        self.catalog = catalog
        self.protocol_version: str | None = None
        self.client_capabilities: dict[str, Any] = {}
        self.client_info: dict[str, Any] = {}
        self.initialized = False  # notifications/initialized received
        self.log_level: int | None = None
        self.subscriptions: set[str] = set()
        self.inflight: dict[RequestId, Any] = {}
        self.max_inflight = MAX_INFLIGHT

    # ------------------------------------------------------------ framing

    def parse(self, data: bytes | str) -> Frame:
        try:
            value = _decode(data)
        except (msgspec.DecodeError, RecursionError, ValueError):
            return Frame([], error_reply=encode_error(None, PARSE_ERROR, "Parse error"))
        if type(value) is not list:
            m = classify(value)
            return Frame([m], error_reply=m.reply if type(m) is Invalid else None)
        if not value:
            return Frame(
                [],
                batch=True,
                error_reply=encode_error(None, INVALID_REQUEST, "Invalid Request: empty batch"),
            )
        if not versions.allows_batches(self.protocol_version):
            return Frame(
                [],
                batch=True,
                error_reply=encode_error(
                    None,
                    INVALID_REQUEST,
                    f"Invalid Request: batches are not allowed in {self.protocol_version}",
                ),
            )
        messages = [classify(v) for v in value]
        if any(_is_initialize(m) for m in messages):
            return Frame(
                [],
                batch=True,
                error_reply=encode_error(None, INVALID_REQUEST, "Invalid Request: initialize in a batch"),
            )
        return Frame(messages, batch=True)

    # ------------------------------------------------------------ requests

    def precheck(self, req: Request) -> bytes | None:
        """The error to answer instead of running `req` (unknown method, not initialized, duplicate id)."""
        method = req.method
        if method not in SYNC_METHODS and method not in ASYNC_METHODS:
            return encode_error(req.id, METHOD_NOT_FOUND, f"Method not found: {method}")
        if self.protocol_version is None and method != "initialize" and method != "ping":
            return encode_error(req.id, INVALID_REQUEST, "Invalid Request: the session is not initialized")
        if req.id in self.inflight:
            return encode_error(
                req.id, INVALID_REQUEST, f"Invalid Request: id {req.id!r} is already in flight"
            )
        if len(self.inflight) >= self.max_inflight and method in ASYNC_METHODS:
            # Per-session memory stays bounded (MCP-PROTOCOL.md §7); the client may retry later.
            return encode_error(req.id, TOO_MANY_REQUESTS, "Too many requests in flight; retry later")
        return None

    def handle_sync(self, req: Request) -> bytes:
        """Answer a SYNC_METHODS request (after precheck)."""
        rid = encode(req.id)
        method = req.method
        try:
            if method == "ping":
                return b'{"jsonrpc":"2.0","id":%s,"result":{}}' % rid
            params = req.params or {}
            if method == "initialize":
                result = self.initialize(params)
            else:
                version = self.protocol_version or versions.LATEST
                kind = _LIST_KINDS.get(method)
                if kind is not None:
                    result = self.catalog.page(kind, version, params.get("cursor"))
                elif method == "logging/setLevel":
                    self.set_level(params.get("level"))
                    result = b"{}"
                elif method == "resources/subscribe":
                    uri = self._uri(params)
                    self.registry.find_resource(uri)  # ResourceNotFound (-32002) for URIs nobody serves
                    if uri not in self.subscriptions and len(self.subscriptions) >= MAX_SUBSCRIPTIONS:
                        raise InvalidParams("Too many subscriptions in this session")
                    self.subscriptions.add(uri)
                    result = b"{}"
                else:  # resources/unsubscribe: always succeeds for a well-formed URI
                    self.subscriptions.discard(self._uri(params))
                    result = b"{}"
        except McpError as exc:
            return encode_error(req.id, exc.code, exc.message, exc.data)
        return b'{"jsonrpc":"2.0","id":%s,"result":%s}' % (rid, result)

    def initialize(self, params: dict[str, Any]) -> bytes:
        if self.protocol_version is not None:
            raise McpError("Invalid Request: already initialized", code=INVALID_REQUEST)
        requested = params.get("protocolVersion")
        if type(requested) is not str:
            raise InvalidParams('Invalid params: "protocolVersion" must be a string')
        version = versions.negotiate(requested)
        caps = params.get("capabilities")
        info = params.get("clientInfo")
        self.client_capabilities = caps if type(caps) is dict else {}
        self.client_info = info if type(info) is dict else {}
        self.protocol_version = version
        return encode(self.initialize_result(version))

    def initialize_result(self, version: str) -> InitializeResult:
        r = self.registry
        changes = r.announce_list_changes
        capabilities: dict[str, Any] = {
            "tools": {"listChanged": changes},
            "resources": {"subscribe": True, "listChanged": changes},
            "prompts": {"listChanged": changes},
            "logging": {},
        }
        if versions.has_annotations(version):
            capabilities["completions"] = {}
        newest = versions.has_icons(version)
        info = Implementation(
            name=r.name,
            version=r.version or package_version(),
            title=r.title if versions.has_structured(version) else None,
            description=r.description if newest else None,
            website_url=r.website_url if newest else None,
        )
        return InitializeResult(version, capabilities, info, r.instructions)

    def set_level(self, level: Any) -> None:
        if type(level) is not str or level not in LEVELS:
            raise McpError(
                f"Invalid params: unknown log level {level!r}",
                code=INVALID_PARAMS,
                data={"levels": list(LEVELS)},
            )
        self.log_level = LEVELS[level]

    def _uri(self, params: dict[str, Any]) -> str:
        uri = params.get("uri")
        if type(uri) is not str:
            raise InvalidParams('Invalid params: "uri" must be a string')
        return uri

    # ------------------------------------------------------------ notifications

    def notification(self, n: Notification) -> RequestId | None:
        """Apply a client notification; returns the request id to cancel for notifications/cancelled."""
        if n.method == "notifications/initialized":
            self.initialized = True
        elif n.method == "notifications/cancelled":
            rid = (n.params or {}).get("requestId")
            if _valid_id(rid):
                return rid
        return None

    # ------------------------------------------------------------ helpers for handlers and contexts

    def log_enabled(self, level: str) -> bool:
        threshold = self.log_level
        return threshold is not None and LEVELS.get(level, 7) >= threshold

    def has_progress_message(self) -> bool:
        return versions.has_annotations(self.protocol_version or versions.LATEST)
