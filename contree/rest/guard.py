"""What a web page may not make the REST API do (issue 17 item 4).

A browser lets any page send requests to 127.0.0.1: "simple" ones (GET, or POST with a text/plain, form
or multipart body) go out without asking the server first, and DNS rebinding makes a page's own name
resolve to the loopback address. So, before auth and routing:

* `Host` must name this server (loopback names, the listen address, or `allowed_hosts`): a rebound
  name is refused;
* an `Origin` (and `Sec-Fetch-Site: cross-site`, which browsers send even where they omit Origin) must
  be loopback, same-origin or in `allowed_origins`;
* a request with a body must declare a media type a page cannot send without a CORS preflight
  (`application/json`, `application/octet-stream`); we never answer preflights, so a browser never sends
  the real request.

The MCP HTTP transport has the same Host/Origin rules in `protocol/`; `contree/` may not import
`protocol/` (nor the reverse), and the rules are a few lines, so they are restated here rather than moved
into a fourth package.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from yarl import URL

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Respond = Callable[[int, str], web.StreamResponse]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Bodies a page can send cross-origin without a preflight (the Fetch standard's CORS-safelisted types).
SIMPLE_MEDIA_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def is_loopback(name: str) -> bool:
    name = name.strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_wildcard(name: str) -> bool:
    return name in ("", "0.0.0.0", "::", "[::]")


def split_host(host: str) -> tuple[str, str | None]:
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


class RequestGuard:
    """Host, Origin and media-type checks for a server listening on `listen`."""

    def __init__(
        self,
        listen: str = "127.0.0.1",
        allowed_hosts: Iterable[str] = (),
        allowed_origins: Iterable[str] = (),
    ) -> None:
        hosts = {h.strip().lower() for h in allowed_hosts if h.strip()}
        if not hosts and not is_loopback(listen):
            # beyond loopback the token guards the server; a specific address is its own name
            hosts.add("*" if is_wildcard(listen) else listen.strip("[]").lower())
        self._hosts = hosts
        self._origins = {o.strip().rstrip("/").lower() for o in allowed_origins if o.strip()}

    def host_allowed(self, host: str | None) -> bool:
        if not host:
            return False
        if "*" in self._hosts:
            return True
        name, port = split_host(host)
        return (
            is_loopback(name) or name in self._hosts or (port is not None and f"{name}:{port}" in self._hosts)
        )

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if "*" in self._origins or origin in self._origins:
            return True
        try:
            url = URL(origin)
        except ValueError:
            return False
        if url.scheme not in ("http", "https") or not url.host:
            return False  # includes "null": sandboxed frames, file: pages, redirects
        if is_loopback(url.host):
            return True
        return host is not None and (url.raw_authority or "").lower() == host.strip().lower()

    def refusal(self, request: web.Request) -> tuple[int, str] | None:
        """(status, message) when the request must not reach the API, else None."""
        host = request.headers.get("Host")
        if not self.host_allowed(host):
            return 403, "Host header not allowed"
        origin = request.headers.get("Origin")
        if origin is not None:
            if not self.origin_allowed(origin, host):
                return 403, "Origin not allowed"
        elif request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
            return 403, "cross-site requests are not allowed"
        if request.method in BODY_METHODS:
            media_type = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
            if not media_type or media_type in SIMPLE_MEDIA_TYPES:
                return 415, (
                    f"Content-Type {media_type or '(none)'} is not accepted: send application/json "
                    "(application/octet-stream for POST /v1/files)"
                )
        return None

    def middleware(self, respond: Respond) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
        @web.middleware
        async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
            refused = self.refusal(request)
            if refused is not None:
                return respond(*refused)
            return await handler(request)

        return guard
