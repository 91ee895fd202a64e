"""Who may talk to the HTTP transports, and how they listen: settings, and the Host/Origin/bearer checks.

Shared by Streamable HTTP (`protocol.http`) and legacy HTTP+SSE (`protocol.sse_legacy`). Each check stands
on its own (DNS rebinding: a bad Host and a bad Origin are each refused, not only together).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web
from yarl import URL

from protocol.errors import REQUEST_REJECTED
from protocol.messages import encode_error

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


class HttpConfigError(ValueError):
    """The settings would expose the server unsafely (e.g. beyond loopback without a token)."""


@dataclass(kw_only=True)
class HttpSettings:
    """How the HTTP transports listen and whom they answer."""

    listen: str = "127.0.0.1"
    port: int = 9452
    # Bearer token; mandatory when `listen` is not a loopback address.
    auth_token: str | None = None
    # More tokens, each mapped to the principal name its sessions are bound to.
    auth_tokens: Mapping[str, str] = field(default_factory=dict)
    # Host header names (`name` or `name:port`, `*` = any) accepted besides the loopback names. Empty: the
    # listen address when it is a specific one, any name when it is a wildcard (the token guards it).
    allowed_hosts: tuple[str, ...] = ()
    # Origins (`scheme://host[:port]`, `*` = any) accepted besides loopback and same-origin ones.
    allowed_origins: tuple[str, ...] = ()
    # Never answer a POST with SSE; notifications of a call then travel on the GET stream.
    json_response: bool = False
    # A call still running after this many seconds is switched to an SSE stream (priming event, keepalives).
    sse_after: float = 1.0
    # SEP-1699 polling: close a POST stream after this many seconds (the client resumes with GET).
    poll_after: float | None = None
    retry_ms: int = 1000
    keepalive: float = 15.0
    # A client that stops reading must not stall the session's work (or other sessions' notifications).
    write_timeout: float = 10.0
    replay_events: int = 512  # per stream
    replay_bytes: int = 8 * 1024 * 1024  # per stream; the newest event is always kept
    streams_per_session: int = 32  # finished POST streams kept for resumption
    max_sessions: int = 1000
    session_idle_timeout: float = 3600.0
    max_body: int = 64 * 1024 * 1024
    legacy_sse: bool = True

    def is_loopback(self) -> bool:
        return _is_loopback_name(self.listen)

    def tokens(self) -> dict[str, str]:
        """token → principal."""
        tokens = dict(self.auth_tokens)
        if self.auth_token:
            digest = hashlib.sha256(self.auth_token.encode()).hexdigest()[:16]
            tokens[self.auth_token] = f"token:{digest}"
        return tokens

    def validate(self) -> None:
        if not self.is_loopback() and not self.tokens():
            raise HttpConfigError(
                f"refusing to listen on {self.listen} without a bearer token: "
                "beyond loopback one is mandatory"
            )
        if any(not token for token in self.tokens()):
            raise HttpConfigError("an empty bearer token is not a token")


def _is_loopback_name(name: str) -> bool:
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_wildcard(name: str) -> bool:
    return name in ("", "0.0.0.0", "::", "[::]")


def _split_host(host: str) -> tuple[str, str | None]:
    """`name[:port]` / `[v6][:port]` → (lower-case name without brackets, port)."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return host, None
        rest = host[end + 1 :]
        return host[1:end], rest[1:] if rest.startswith(":") else None
    name, sep, port = host.rpartition(":")
    if not sep or ":" in name:
        return host, None
    return name, port


# ---------------------------------------------------------------- the guard (DNS rebinding, auth)


class Guard:
    """Host, Origin and bearer-token checks shared by every MCP route; each is checked on its own."""

    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        self._tokens = [(token.encode(), principal) for token, principal in settings.tokens().items()]
        hosts = {h.lower() for h in settings.allowed_hosts}
        if not hosts and not settings.is_loopback():
            hosts.add("*" if _is_wildcard(settings.listen) else settings.listen.lower())
        self._hosts = hosts
        self._origins = {o.rstrip("/").lower() for o in settings.allowed_origins}
        # (Host, Origin) → which check failed (None: both pass). Clients repeat the same two headers on
        # every request, so each pair is judged once; the table is bounded.
        self._verdicts: dict[tuple[str | None, str | None], str | None] = {}

    def host_allowed(self, host: str | None) -> bool:
        if not host:
            return False
        if "*" in self._hosts:
            return True
        name, port = _split_host(host)
        if name in LOOPBACK_NAMES or _is_loopback_name(name):
            return True
        return name in self._hosts or (port is not None and f"{name}:{port}" in self._hosts)

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if "*" in self._origins or origin in self._origins:
            return True
        try:
            url = URL(origin)
        except ValueError:
            return False
        if url.scheme not in ("http", "https") or not url.host:
            return False
        if _is_loopback_name(url.host):
            return True
        # Same origin: a page served by this very host (the docs site) may call it.
        return host is not None and url.raw_authority.lower() == host.strip().lower()

    def principal(self, authorization: str | None) -> tuple[bool, str | None]:
        """(authorized, principal). Every token is compared, in constant time each."""
        if not self._tokens:
            return True, None
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return False, None
        candidate = presented.strip().encode()
        found: str | None = None
        for token, principal in self._tokens:
            if hmac.compare_digest(candidate, token):
                found = principal
        return found is not None, found

    def _verdict(self, host: str | None, origin: str | None) -> str | None:
        key = (host, origin)
        if key in self._verdicts:
            return self._verdicts[key]
        verdict = None
        if not self.host_allowed(host):
            verdict = "Forbidden: Host header not allowed"
        elif origin is not None and not self.origin_allowed(origin, host):
            verdict = "Forbidden: Origin not allowed"
        if len(self._verdicts) >= 1024:
            self._verdicts.clear()
        self._verdicts[key] = verdict
        return verdict

    def check(self, request: web.Request) -> web.Response | str | None:
        """An error response, or the principal (None without auth)."""
        headers = request.headers
        refused = self._verdict(headers.get("Host"), headers.get("Origin"))
        if refused is not None:
            return error_response(403, REQUEST_REJECTED, refused)
        ok, principal = self.principal(headers.get("Authorization"))
        if not ok:
            given = "Authorization" in request.headers
            challenge = 'Bearer error="invalid_token"' if given else "Bearer"
            return error_response(
                401, REQUEST_REJECTED, "Unauthorized", headers={"WWW-Authenticate": challenge}
            )
        return principal


def error_response(
    status: int, code: int, message: str, *, headers: Mapping[str, str] | None = None
) -> web.Response:
    """An HTTP error carrying an id-less JSON-RPC error (never HTML)."""
    return web.Response(
        status=status,
        body=encode_error(None, code, message),
        content_type="application/json",
        headers=headers,
    )


_accepted: dict[tuple[str, str], bool] = {}


def accepts(accept: str, wanted: str) -> bool:
    """Whether an Accept header admits `wanted` (memoised: clients send the same header every time)."""
    key = (accept, wanted)
    known = _accepted.get(key)
    if known is None:
        if len(_accepted) >= 1024:
            _accepted.clear()
        known = _accepted[key] = _accepts(accept, wanted)
    return known


def _accepts(accept: str, wanted: str) -> bool:
    major = wanted.split("/", 1)[0]
    for item in accept.split(","):
        media = item.split(";", 1)[0].strip().lower()
        if media in (wanted, f"{major}/*", "*/*"):
            return True
    return False
