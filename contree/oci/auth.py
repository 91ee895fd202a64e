"""Registry auth: `WWW-Authenticate` challenges, Basic headers and bearer tokens (cached per scope)."""

from __future__ import annotations

import base64
import ipaddress
import re
import time
from urllib.parse import urlsplit

import msgspec

from contree.errors import BadRequest

_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


class InsecureTransport(BadRequest):
    """Credentials would travel in clear text (plain HTTP to a non-loopback host)."""


class Credentials(msgspec.Struct, frozen=True, kw_only=True):
    username: str
    password: str

    def __repr__(self) -> str:  # never leak the secret through logs or tracebacks
        return f"Credentials(username={self.username!r}, password=<MASKED>)"

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


class Challenge(msgspec.Struct, frozen=True, kw_only=True):
    scheme: str  # "basic" | "bearer" (lower case)
    params: dict[str, str] = {}

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


class TokenResponse(msgspec.Struct, kw_only=True):
    token: str | None = None
    access_token: str | None = None
    expires_in: int | None = None


def parse_challenge(header: str) -> Challenge | None:
    """Parse one `WWW-Authenticate` value (registries send a single challenge)."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
        for m in _PARAM.finditer(rest)
    }
    params = {k: v.replace('\\"', '"') for k, v in params.items()}
    return Challenge(scheme=scheme.lower(), params=params)


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback addresses (with or without a port)."""
    name = host
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def url_is_safe_for_secrets(url: str) -> bool:
    """Credentials travel only over HTTPS, or to a loopback host."""
    parts = urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and is_loopback_host(parts.netloc))


class TokenCache:
    """Bearer tokens per (registry, scope, identity) until shortly before they expire."""

    MARGIN = 10.0

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str, str], tuple[str, float]] = {}

    def get(self, registry: str, scope: str, identity: str) -> str | None:
        hit = self._tokens.get((registry, scope, identity))
        if hit is None:
            return None
        token, expiry = hit
        if time.monotonic() >= expiry:
            self._tokens.pop((registry, scope, identity), None)
            return None
        return token

    def put(self, registry: str, scope: str, identity: str, token: str, expires_in: int | None) -> None:
        # The distribution spec says 60 s when the server does not say.
        lifetime = max(float(expires_in or 60) - self.MARGIN, 1.0)
        self._tokens[(registry, scope, identity)] = (token, time.monotonic() + lifetime)

    def drop(self, registry: str, scope: str, identity: str) -> None:
        self._tokens.pop((registry, scope, identity), None)
