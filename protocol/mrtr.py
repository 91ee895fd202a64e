"""Multi round-trip requests (2026-07-28, SEP-2322): the integrity-protected `requestState` of an
input_required result.

A stateless server cannot remember what it asked, so the state travels with the client: the answers given
so far, bound to the principal, the method, the target (tool/prompt name or resource URI) and a digest of
the arguments, with an expiry, under an HMAC. A retry with a tampered, expired or foreign state is refused
with -32602; a valid one gives the handler every earlier answer, so a handler that asks its questions in
the same order simply runs again and gets further each round.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Any

import msgspec

from protocol.errors import InvalidParams
from protocol.messages import CallToolParams, GetPromptParams, HandlerParams, ReadResourceParams

STATE_TTL = 3600.0  # seconds a requestState stays valid
MAX_STATE = 256 * 1024  # characters; a state is echoed on every retry, so it stays bounded
_MAC_BYTES = 16


class _State(msgspec.Struct, array_like=True, frozen=True):
    method: str
    target: str
    arguments: str  # digest
    principal: str | None
    expires: float
    answers: dict[str, dict[str, Any]]


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_State).decode


def binding(params: HandlerParams) -> tuple[str, str]:
    """What a state is bound to besides method and principal: the target (tool/prompt name, resource URI)
    and a digest of the arguments."""
    if type(params) is CallToolParams or type(params) is GetPromptParams:
        return params.name, arguments_digest(params.arguments)
    if type(params) is ReadResourceParams:
        return params.uri, arguments_digest(None)
    return "", arguments_digest(None)


def arguments_digest(arguments: Any) -> str:
    """A digest of the request's salient parameters (key order does not matter)."""
    return hashlib.sha256(msgspec.json.encode(arguments, order="sorted")).hexdigest()[:32]


def seal(
    secret: bytes,
    *,
    method: str,
    target: str,
    arguments: str,
    principal: str | None,
    now: float,
    answers: dict[str, dict[str, Any]],
) -> str:
    payload = _encode(_State(method, target, arguments, principal, now + STATE_TTL, answers))
    mac = hmac.new(secret, payload, hashlib.sha256).digest()[:_MAC_BYTES]
    return base64.urlsafe_b64encode(mac + payload).decode().rstrip("=")


def open_state(
    secret: bytes,
    state: str,
    *,
    method: str,
    target: str,
    arguments: str,
    principal: str | None,
    now: float,
) -> dict[str, dict[str, Any]]:
    """The answers sealed in `state`, if it is intact, unexpired and was issued for this very request."""
    refused = InvalidParams("Invalid params: requestState failed verification")
    if len(state) > MAX_STATE:
        raise refused
    try:
        raw = base64.urlsafe_b64decode(state + "=" * (-len(state) % 4))
    except (binascii.Error, ValueError):
        raise refused from None
    mac, payload = raw[:_MAC_BYTES], raw[_MAC_BYTES:]
    if not hmac.compare_digest(mac, hmac.new(secret, payload, hashlib.sha256).digest()[:_MAC_BYTES]):
        raise refused
    try:
        sealed = _decode(payload)
    except msgspec.DecodeError:
        raise refused from None
    if sealed.expires < now:
        raise InvalidParams("Invalid params: requestState has expired; call again without it")
    if (sealed.method, sealed.target, sealed.arguments, sealed.principal) != (
        method,
        target,
        arguments,
        principal,
    ):
        raise refused
    return sealed.answers
