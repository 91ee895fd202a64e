"""The per-request envelope of 2026-07-28: `_meta` keys in, `resultType`/caching/serverInfo out.

A stateless request carries its protocol version, client capabilities, identity and log level in
`params._meta`; every result says what kind of result it is (`resultType`), cacheable ones say for how long
and for whom (`ttlMs`, `cacheScope`), and each names the server in its own `_meta`.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from protocol import headers as http_headers
from protocol import versions
from protocol.errors import (
    INVALID_PARAMS,
    HeaderMismatch,
    InvalidMeta,
    InvalidParams,
    McpError,
    MethodNotFound,
    ResourceNotFound,
    UnsupportedVersion,
)
from protocol.events import Client
from protocol.headers import HttpHeaders
from protocol.messages import encode, with_fields
from protocol.tasks import EXTENSION as TASKS_EXTENSION

PROTOCOL_VERSION_KEY = "io.modelcontextprotocol/protocolVersion"
CLIENT_CAPABILITIES_KEY = "io.modelcontextprotocol/clientCapabilities"
CLIENT_INFO_KEY = "io.modelcontextprotocol/clientInfo"
LOG_LEVEL_KEY = "io.modelcontextprotocol/logLevel"
SERVER_INFO_KEY = "io.modelcontextprotocol/serverInfo"
SUBSCRIPTION_ID_KEY = "io.modelcontextprotocol/subscriptionId"
# Either key makes a request a stateless one (a request missing the other is then malformed: -32602).
MODERN_KEYS = (PROTOCOL_VERSION_KEY, CLIENT_CAPABILITIES_KEY)


class CacheHint(msgspec.Struct, frozen=True):
    """How long a result stays fresh (ms) and who may share a cached copy (SEP-2549)."""

    ttl_ms: int = 0
    scope: Literal["public", "private"] = "private"


NO_CACHE = CacheHint()


def is_modern_meta(meta: Any) -> bool:
    return type(meta) is dict and (PROTOCOL_VERSION_KEY in meta or CLIENT_CAPABILITIES_KEY in meta)


class ResultEnvelope:
    """Pre-encoded members every stateless result starts with (built once per server)."""

    def __init__(self, server_info: Any) -> None:
        self.meta: dict[str, Any] = {SERVER_INFO_KEY: msgspec.to_builtins(server_info)}
        self.meta_member = b'"_meta":' + encode(self.meta)
        self.complete = b'"resultType":"complete",' + self.meta_member
        self.task = b'"resultType":"task",' + self.meta_member
        self._cached: dict[CacheHint, bytes] = {}

    def cacheable(self, hint: CacheHint) -> bytes:
        prefix = self._cached.get(hint)
        if prefix is None:
            prefix = self._cached[hint] = self.complete + b',"ttlMs":%d,"cacheScope":"%s"' % (
                max(hint.ttl_ms, 0),
                hint.scope.encode(),
            )
        return prefix

    def wrap(self, body: bytes, hint: CacheHint | None = None) -> bytes:
        """`body` (an encoded result object) as a complete stateless result."""
        return with_fields(self.complete if hint is None else self.cacheable(hint), body)


def request_envelope(
    method: str, meta: dict[str, Any] | None, headers: HttpHeaders | None
) -> tuple[str, Client]:
    """A stateless request's own version and client, checked in the order that decides which error wins:
    the version header's presence (-32020), the `_meta` fields (-32602), header against body (-32020), the
    version itself (-32022), the log level (-32602)."""
    if headers is not None and headers.protocol_version is None:
        raise HeaderMismatch("Header mismatch: the MCP-Protocol-Version header is required")
    version = meta.get(PROTOCOL_VERSION_KEY) if type(meta) is dict else None
    caps = meta.get(CLIENT_CAPABILITIES_KEY) if type(meta) is dict else None
    if type(version) is not str or type(caps) is not dict:
        raise InvalidMeta(
            f'Invalid params: "_meta" must carry "{PROTOCOL_VERSION_KEY}" (a string) and '
            f'"{CLIENT_CAPABILITIES_KEY}" (an object)'
        )
    assert meta is not None
    if headers is not None:
        header = (headers.protocol_version or "").strip()
        if header != version:
            raise HeaderMismatch(
                f"Header mismatch: MCP-Protocol-Version header value {header[:64]!r} does not match "
                f"_meta value {version[:64]!r}"
            )
        http_headers.check_method(headers, method)
    if version not in versions.MODERN:
        raise UnsupportedVersion(version, list(versions.ADVERTISED))
    info = meta.get(CLIENT_INFO_KEY)
    level = meta.get(LOG_LEVEL_KEY)
    threshold = None
    if level is not None:
        if type(level) is not str or level not in versions.LEVELS:
            raise McpError(
                f"Invalid params: unknown log level {level!r}",
                code=INVALID_PARAMS,
                data={"levels": list(versions.LEVELS)},
            )
        threshold = versions.LEVELS[level]
    return version, Client(caps, info if type(info) is dict else {}, threshold)


def not_found(method: str) -> MethodNotFound:
    exc = MethodNotFound(f"Method not found: {method}")
    exc.status = 404  # the stateless HTTP binding's answer for unknown methods
    return exc


def for_modern(exc: McpError) -> McpError:
    """2026-07-28 answers a missing resource with -32602 (-32002 must not be emitted)."""
    if isinstance(exc, ResourceNotFound):
        return InvalidParams(exc.message, data=exc.data)
    return exc


def has_tasks(client: Client) -> bool:
    extensions = client.capabilities.get("extensions")
    return type(extensions) is dict and TASKS_EXTENSION in extensions


def wire_input(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The stateless form of a server→client request: URL elicitation lost `elicitationId` in 2026-07-28
    (the retry itself says the interaction finished)."""
    if method == "elicitation/create" and "elicitationId" in params:
        return {k: v for k, v in params.items() if k != "elicitationId"}
    return params
