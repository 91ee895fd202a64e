"""The per-request envelope of 2026-07-28: `_meta` keys in, `resultType`/caching/serverInfo out.

A stateless request carries its protocol version, client capabilities, identity and log level in
`params._meta`; every result says what kind of result it is (`resultType`), cacheable ones say for how long
and for whom (`ttlMs`, `cacheScope`), and each names the server in its own `_meta`.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from protocol.messages import encode, with_fields

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
