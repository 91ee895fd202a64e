"""Streamable HTTP request headers of 2026-07-28 (SEP-2243): what must mirror the body, and how to compare.

Pure functions: the transport collects the headers into `HttpHeaders`, the session checks them against the
decoded request and raises `HeaderMismatch` (-32020, HTTP 400) on any disagreement.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import msgspec

from protocol.errors import HeaderMismatch

PROTOCOL_VERSION = "mcp-protocol-version"
METHOD = "mcp-method"
NAME = "mcp-name"
PARAM_PREFIX = "mcp-param-"
_OWS = " \t"
_SENTINEL = re.compile(r"=\?base64\?(.*)\?=", re.DOTALL)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_MAX_SAFE = 2**53 - 1


class HttpHeaders(msgspec.Struct, frozen=True):
    """The headers of one POST that the stateless rules look at (names already matched case-insensitively)."""

    protocol_version: str | None = None
    method: str | None = None
    name: str | None = None
    params: dict[str, str] = msgspec.field(default_factory=dict)  # lower-case Mcp-Param-<name> suffix → value


class HeaderParam(msgspec.Struct, frozen=True):
    """A tool argument mirrored into `Mcp-Param-<header>`: where it sits in the arguments and its type."""

    header: str
    path: tuple[str, ...]
    type: str  # string | integer | boolean


def name_source(method: str) -> str | None:
    """The params field `Mcp-Name` mirrors for `method` (None: the method has no name header)."""
    if method in ("tools/call", "prompts/get"):
        return "name"
    if method == "resources/read":
        return "uri"
    if method in ("tasks/get", "tasks/update", "tasks/cancel"):
        return "taskId"
    return None


def decode_value(raw: str, what: str) -> str:
    """A header value with surrounding whitespace removed and the `=?base64?…?=` sentinel decoded."""
    value = raw.strip(_OWS)
    m = _SENTINEL.fullmatch(value)
    if m is None:
        if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
            raise HeaderMismatch(f"Header mismatch: {what} contains control characters")
        return value
    try:
        return base64.b64decode(m.group(1), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise HeaderMismatch(f"Header mismatch: {what} is not valid Base64") from None


def check_method(headers: HttpHeaders, method: str) -> None:
    if headers.method is None:
        raise HeaderMismatch("Header mismatch: the Mcp-Method header is required")
    if headers.method.strip(_OWS) != method:
        raise HeaderMismatch(
            f"Header mismatch: Mcp-Method header value {headers.method.strip(_OWS)[:64]!r} does not match "
            f"body value {method[:64]!r}"
        )


def check_name(headers: HttpHeaders, method: str, value: str | None) -> None:
    """Mcp-Name must be present and equal to the body's name/uri/taskId when the method has one."""
    if name_source(method) is None or value is None:
        return
    if headers.name is None:
        raise HeaderMismatch("Header mismatch: the Mcp-Name header is required for " + method)
    decoded = decode_value(headers.name, "Mcp-Name")
    if decoded != value:
        raise HeaderMismatch(
            f"Header mismatch: Mcp-Name header value {decoded[:64]!r} does not match "
            f"body value {value[:64]!r}"
        )


def check_params(headers: HttpHeaders, mirrored: tuple[HeaderParam, ...], arguments: dict[str, Any]) -> None:
    """Every `x-mcp-header` argument present in the body needs its header, with the same value."""
    for param in mirrored:
        value = _at(arguments, param.path)
        header = headers.params.get(param.header.lower())
        what = f"Mcp-Param-{param.header}"
        if value is None:
            if header is not None:
                raise HeaderMismatch(f"Header mismatch: {what} is set but the argument is absent")
            continue
        if header is None:
            raise HeaderMismatch(f"Header mismatch: the {what} header is required (the argument is set)")
        decoded = decode_value(header, what)
        if not _same(decoded, value, param.type):
            raise HeaderMismatch(f"Header mismatch: {what} header value does not match the argument")


def mirrored_params(schema: dict[str, Any]) -> tuple[HeaderParam, ...]:
    """The `x-mcp-header` annotations of an input schema, checked as the spec requires (ValueError if not):
    token names unique case-insensitively, primitive non-number types, reachable through `properties` only."""
    found: list[HeaderParam] = []
    _walk(schema, (), found, reachable=True)
    seen: set[str] = set()
    for param in found:
        key = param.header.lower()
        if key in seen:
            raise ValueError(f"x-mcp-header {param.header!r} is used twice")
        seen.add(key)
    return tuple(found)


def _walk(node: Any, path: tuple[str, ...], found: list[HeaderParam], *, reachable: bool) -> None:
    if isinstance(node, list):
        for item in node:
            _walk(item, path, found, reachable=False)
        return
    if not isinstance(node, dict):
        return
    header = node.get("x-mcp-header")
    if header is not None:
        if not reachable or not path:
            raise ValueError("x-mcp-header is only allowed on properties reachable through `properties`")
        if not isinstance(header, str) or not _TOKEN.fullmatch(header):
            raise ValueError(f"x-mcp-header {header!r} is not an HTTP header name token")
        kind = node.get("type")
        if kind not in ("string", "integer", "boolean"):
            raise ValueError(f"x-mcp-header {header!r} needs a string, integer or boolean property")
        found.append(HeaderParam(header, path, kind))
    for key, value in node.items():
        if key == "properties" and isinstance(value, dict):
            for name, sub in value.items():
                _walk(sub, (*path, name), found, reachable=reachable)
        elif key != "x-mcp-header":
            _walk(value, path, found, reachable=False)


def _at(arguments: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = arguments
    for step in path:
        if not isinstance(node, dict):
            return None
        node = node.get(step)
    return node


def _same(header: str, value: Any, kind: str) -> bool:
    if kind == "boolean" or type(value) is bool:
        return type(value) is bool and header == ("true" if value else "false")
    if kind == "integer" and type(value) in (int, float):
        try:
            number = float(header)
        except ValueError:
            return False
        return abs(number) <= _MAX_SAFE and number == value
    return isinstance(value, str) and header == value
