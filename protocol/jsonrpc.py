"""JSON-RPC 2.0 framing: a frame's bytes → typed messages, typed params, and the errors either may earn.

Messages are decoded into a loose envelope first so that every malformation gets its own precise error;
params are decoded straight into the method's Struct, and a bad field is named in the handshake era's
wording (clients and golden transcripts rely on it).
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from protocol.errors import INVALID_REQUEST, PARSE_ERROR, InvalidParams, McpError
from protocol.messages import (
    CompleteParams,
    Envelope,
    GetPromptParams,
    Invalid,
    Message,
    Notification,
    Params,
    Request,
    Response,
    encode_error,
)
from protocol.types import Reply, RequestId

_frame_decoder = msgspec.json.Decoder(Envelope | list[msgspec.Raw])
_message_decoder = msgspec.json.Decoder(Envelope)
_meta_decoder = msgspec.json.Decoder(Params)
_Struct = TypeVar("_Struct", bound=msgspec.Struct)
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}

# Friendly names for params fields that fail to decode (the wording of the handshake era's messages).
FIELD_HINTS = {
    "name": "must be a string",
    "uri": "must be a string",
    "protocolVersion": "must be a string",
    "arguments": "must be an object",
    "taskId": "must be a string",
    "inputResponses": "must map keys to objects",
    "requestState": "must be a string",
    "notifications": "must be an object",
}


def decode_frame(data: bytes | str) -> Envelope | list[msgspec.Raw] | Reply:
    """One transport frame: a message, a batch's raw elements, or the error answering the whole frame."""
    try:
        return _frame_decoder.decode(data)
    except msgspec.ValidationError:  # neither an object nor an array, or not JSON at all
        try:
            msgspec.json.decode(data)
        except (msgspec.DecodeError, RecursionError, ValueError):
            return frame_error(PARSE_ERROR, "Parse error")
        return frame_error(INVALID_REQUEST, "Invalid Request: expected a JSON object")
    except (msgspec.DecodeError, RecursionError, ValueError):
        return frame_error(PARSE_ERROR, "Parse error")


def decode_meta(raw: msgspec.Raw | None) -> dict[str, Any] | None:
    """A request's `params._meta` (None when absent or not an object: the typed params then say so)."""
    if raw is None:
        return None
    try:
        return _meta_decoder.decode(raw).meta
    except msgspec.ValidationError:
        return None


def valid_id(value: Any) -> bool:
    t = type(value)
    return t is str or t is int


def _is_object(raw: msgspec.Raw) -> bool:
    return bytes(memoryview(raw)[:1]) == b"{"


def classify(env: Envelope) -> Message:
    """One decoded JSON object → Request / Notification / Response / Invalid (with its error reply)."""
    unset = msgspec.UNSET
    has_id = env.id is not unset
    rid = env.id if has_id else None
    reply_id = rid if has_id and valid_id(rid) else None
    if env.jsonrpc != "2.0":
        return Invalid(encode_error(reply_id, INVALID_REQUEST, 'Invalid Request: "jsonrpc" must be "2.0"'))
    if env.method is not unset:
        method = env.method
        if type(method) is not str:
            return Invalid(
                encode_error(reply_id, INVALID_REQUEST, 'Invalid Request: "method" must be a string')
            )
        params = env.params
        if params is not unset and not _is_object(params):
            if not has_id:
                return Invalid(None)
            return Invalid(
                encode_error(reply_id, INVALID_REQUEST, 'Invalid Request: "params" must be an object')
            )
        raw = None if params is unset else params
        if not has_id:
            return Notification(method, raw)
        if reply_id is None:
            return Invalid(
                encode_error(None, INVALID_REQUEST, 'Invalid Request: "id" must be a string or an integer')
            )
        return Request(reply_id, method, raw)
    if has_id and (env.result is not unset or env.error is not unset):
        has_result, has_error = env.result is not unset, env.error is not unset
        if reply_id is None or has_result == has_error or (has_error and type(env.error) is not dict):
            return Invalid(None)  # a malformed response is never answered
        return Response(reply_id, env.result if has_result else None, env.error if has_error else None)
    return Invalid(encode_error(reply_id, INVALID_REQUEST, 'Invalid Request: missing "method"'))


def classify_raw(raw: msgspec.Raw) -> Message:
    try:
        return classify(_message_decoder.decode(raw))
    except msgspec.ValidationError:
        return Invalid(encode_error(None, INVALID_REQUEST, "Invalid Request: expected a JSON object"))


def decode_params(raw: msgspec.Raw | None, kind: type[_Struct]) -> _Struct:
    """Typed params from the request bytes; a bad field is -32602 naming it."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(b"{}" if raw is None else raw)
    except msgspec.ValidationError as exc:
        raise InvalidParams(params_message(str(exc), kind)) from None


def params_message(detail: str, kind: type[Any]) -> str:
    """The handshake era's wording for a bad field (clients and golden transcripts rely on it)."""
    path = ""
    if "- at `$." in detail:
        path = detail.split("- at `$.", 1)[1].split("`", 1)[0]
    if "missing required field `" in detail:
        missing = detail.split("missing required field `", 1)[1].split("`", 1)[0]
        path = f"{path}.{missing}" if path else missing
    field = path.split(".", 1)[0].split("[", 1)[0]
    if kind is CompleteParams:
        if path == "argument.value":
            return 'Invalid params: "argument.value" must be a string'
        if path in ("argument.name", "ref.type", "ref.name", "ref.uri"):
            return "Invalid params: ref and argument name are required"
        if field in ("ref", "argument"):
            return 'Invalid params: "ref" and "argument" must be objects'
    if kind is GetPromptParams and field == "arguments":
        return 'Invalid params: "arguments" must map names to strings'
    hint = FIELD_HINTS.get(field)
    if hint:
        return f'Invalid params: "{field}" {hint}'
    return f"Invalid params: {detail}"


def frame_error(code: int, message: str) -> Reply:
    """An error about the whole frame (id unknown): HTTP answers it with 400."""
    return Reply(None, encode_error(None, code, message), 400)


def error_reply(rid: RequestId, exc: McpError, *, status: int = 200) -> Reply:
    return Reply(rid, encode_error(rid, exc.code, exc.message, exc.data), status)
