"""Golden transcripts: the file format and the normalisation both sides go through (no I/O but `load`).

Format (fixtures/transcripts/README.md): one JSON object per line, one of
  {"meta": {"description": str, "argv": [str, ...], "mask": [str, ...]}}   first line; "{python}" in argv =
                                  this interpreter; "{NAME}" = a per-run variable (e.g. {home}, {workdir})
                                  that the replayer supplies; "mask" names volatile fields (see below)
  {"send": <message>}             a client frame (object or batch array)
  {"send_raw": "<text>"}          a client line sent verbatim (malformed input)
  {"expect": [<message>, ...]}    the server frames caused since the last send, in order
  {"expect_unordered": [...]}     the same, in any order (concurrent work)
  {"sleep": <seconds>}
Volatile values are normalised to placeholders on both sides; in a `send`, the placeholders "<cursor>" and
"<server-id>" are replaced by the last nextCursor / server→client request id the server sent. Variables
("{workdir}") are substituted into sends and argv; their values become "{NAME}" again in server output.
Fields named in meta "mask" get the value "<masked>" wherever they occur, including inside JSON text blocks.

"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

CURSOR = "<cursor>"
SERVER_ID = "<server-id>"
VERSION = "<version>"
UUID = "<uuid>"
TIMESTAMP = "<timestamp>"
SESSION_ID = "<session-id>"
REQUEST_STATE = "<request-state>"
SERVER_INFO_KEY = "io.modelcontextprotocol/serverInfo"
MASKED = "<masked>"

_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# Seconds are optional: listings print minute-precision times ("2026-11-24 05:01 UTC").
_TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?")
STEP_KINDS = ("send", "send_raw", "expect", "expect_unordered", "sleep")


class TranscriptError(Exception):
    """A transcript file is malformed."""


class TranscriptMismatch(AssertionError):
    """The server did not produce what the transcript expects."""


@dataclass
class Step:
    kind: str
    value: Any
    line: int


@dataclass
class Transcript:
    path: Path
    description: str
    argv: list[str]
    steps: list[Step]
    mask: list[str] = field(default_factory=list)
    numbered_uuids: bool = False
    capture: list[str] = field(default_factory=list)


@dataclass
class State:
    """What the replayer or recorder learned from the server so far (for placeholders)."""

    cursor: str | None = None
    server_id: Any = None
    request_state: str | None = None  # the last input_required result's requestState (2026-07-28)
    cursors: set[str] = field(default_factory=set)  # every nextCursor seen (an error may echo one)
    literals: dict[str, str] = field(default_factory=dict)  # e.g. {session_id: "<session-id>"}
    variables: dict[str, str] = field(default_factory=dict)  # e.g. {"workdir": "/tmp/x/work"}
    mask: frozenset[str] = frozenset()  # field names whose values are volatile
    numbered_uuids: bool = False  # meta "uuids": "numbered"
    uuids: dict[str, str] = field(default_factory=dict)  # real UUID → "<uuid-N>"
    capture: frozenset[str] = frozenset()  # meta "capture": tools whose bare result is volatile
    calls: dict[Any, str] = field(default_factory=dict)  # request id → tool name (tools/call sent)
    captured: dict[str, Any] = field(default_factory=dict)  # "<tool-N>" → the value the server returned


def load(path: str | Path) -> Transcript:
    path = Path(path)
    description = ""
    argv: list[str] = []
    mask: list[str] = []
    numbered = False
    capture: list[str] = []
    steps: list[Step] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            entry = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise TranscriptError(f"{path}:{number}: not JSON: {exc}") from None
        if not isinstance(entry, dict) or len(entry) != 1:
            raise TranscriptError(f"{path}:{number}: each line is an object with exactly one key")
        ((kind, value),) = entry.items()
        if kind == "meta":
            description = value.get("description", "")
            argv = list(value.get("argv", []))
            mask = list(value.get("mask", []))
            numbered = value.get("uuids") == "numbered"
            capture = list(value.get("capture", []))
        elif kind in STEP_KINDS:
            steps.append(Step(kind, value, number))
        else:
            raise TranscriptError(f"{path}:{number}: unknown key {kind!r}")
    return Transcript(path, description, argv, steps, mask, numbered, capture)


def dump(transcript_lines: Sequence[dict[str, Any]]) -> str:
    return "".join(msgspec.json.encode(line).decode() + "\n" for line in transcript_lines)


# ---------------------------------------------------------------- normalisation


def observe(message: Any, state: State) -> None:
    """Remember the values a later `send` may refer to by placeholder."""
    for m in message if isinstance(message, list) else [message]:
        if not isinstance(m, dict):
            continue
        result = m.get("result")
        if isinstance(result, dict) and isinstance(result.get("nextCursor"), str):
            state.cursor = result["nextCursor"]
            state.cursors.add(state.cursor)
        if isinstance(result, dict) and isinstance(result.get("requestState"), str):
            state.request_state = result["requestState"]
        if "method" in m and "id" in m:
            state.server_id = m["id"]


def note_send(message: Any, state: State) -> None:
    """Remember which tool each client request calls (for meta "capture")."""
    for m in message if isinstance(message, list) else [message]:
        if isinstance(m, dict) and m.get("method") == "tools/call" and "id" in m:
            state.calls[m["id"]] = str((m.get("params") or {}).get("name", ""))


def _capture(message: dict[str, Any], state: State) -> dict[str, Any]:
    """A tool result whose bare value is volatile (rsync's random state id) → "<tool-N>", usable in sends."""
    tool = state.calls.get(message.get("id")) if "method" not in message else None
    result = message.get("result")
    if tool not in state.capture or not isinstance(result, dict) or result.get("isError"):
        return message
    structured = result.get("structuredContent")
    if not isinstance(structured, dict) or "result" not in structured:
        return message
    value = structured["result"]
    placeholder = f"<{tool}-{len(state.captured) + 1}>"
    state.captured[placeholder] = value
    as_text = msgspec.json.encode(value).decode()
    content = [
        {**c, "text": placeholder} if isinstance(c, dict) and c.get("text") == as_text else c
        for c in result.get("content", [])
    ]
    result = {**result, "structuredContent": {**structured, "result": placeholder}, "content": content}
    return {**message, "result": result}


def normalise(message: Any, state: State) -> Any:
    """A copy of a server message with volatile values replaced by placeholders."""
    if isinstance(message, list):
        return [normalise(m, state) for m in message]
    if not isinstance(message, dict):
        return _scrub(message, state)
    if state.capture:
        message = _capture(message, state)
    out = {k: _scrub(v, state) for k, v in message.items()}
    if "method" in out and "id" in out:  # a server→client request: the id is the server's choice
        out["id"] = SERVER_ID
    error = out.get("error")
    data = error.get("data") if isinstance(error, dict) else None
    if isinstance(data, dict) and data.get("cursor") in state.cursors:
        data["cursor"] = CURSOR  # a stale cursor echoed back: its bytes depend on the registry's history
    result = out.get("result")
    if isinstance(result, dict):
        if isinstance(result.get("nextCursor"), str):
            result["nextCursor"] = CURSOR
        if isinstance(result.get("requestState"), str):
            result["requestState"] = REQUEST_STATE
        meta = result.get("_meta")
        for info in (result.get("serverInfo"), meta.get(SERVER_INFO_KEY) if isinstance(meta, dict) else None):
            if isinstance(info, dict) and "version" in info:
                info["version"] = VERSION
    return out


def _scrub(value: Any, state: State) -> Any:
    if isinstance(value, dict):
        return {
            _scrub_key(k, state): MASKED if k in state.mask else _scrub(v, state) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_scrub(v, state) for v in value]
    if isinstance(value, str):
        value = _unvariable(value, state)
        for literal, placeholder in state.literals.items():
            value = value.replace(literal, placeholder)
        if state.mask:
            value = _mask_text(value, state.mask)
        return _TIME_RE.sub(TIMESTAMP, _UUID_RE.sub(lambda m: _uuid_placeholder(m[0], state), value))
    return value


def _scrub_key(key: str, state: State) -> str:
    # Only numbered transcripts scrub keys: results keyed by operation id must replay under fresh ids.
    return _scrub(key, state) if state.numbered_uuids and isinstance(key, str) else key


def _uuid_placeholder(uuid: str, state: State) -> str:
    """`<uuid>`, or with numbered UUIDs `<uuid-N>` (N by first appearance), which a later send may use."""
    if not state.numbered_uuids:
        return UUID
    uuid = uuid.lower()
    if uuid not in state.uuids:
        state.uuids[uuid] = f"<uuid-{len(state.uuids) + 1}>"
    return state.uuids[uuid]


def _unvariable(value: str, state: State) -> str:
    # Longest first, so a variable inside another's value cannot split it.
    for name, real in sorted(state.variables.items(), key=lambda kv: -len(kv[1])):
        if real:
            value = value.replace(real, "{" + name + "}")
    return value


# A masked field as it appears in JSON text (tool results repeat their structured content as text).
_JSON_SCALAR = r'(?:"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null)'


def _mask_text(text: str, mask: frozenset[str]) -> str:
    if '"' not in text:
        return text
    names = "|".join(re.escape(m) for m in sorted(mask))
    return re.sub(rf'("(?:{names})":\s*){_JSON_SCALAR}', rf'\1"{MASKED}"', text)


def substitute(message: Any, state: State) -> Any:
    """A client message with "<cursor>"/"<server-id>" replaced by the values the server sent."""
    if isinstance(message, list):
        return [substitute(m, state) for m in message]
    if isinstance(message, dict):
        return {k: substitute(v, state) for k, v in message.items()}
    if isinstance(message, str):
        if message in state.captured:
            return state.captured[message]
        for name, real in state.variables.items():
            message = message.replace("{" + name + "}", real)
        for real, placeholder in state.uuids.items():
            message = message.replace(placeholder, real)
    if message == CURSOR and state.cursor is not None:
        return state.cursor
    if message == REQUEST_STATE and state.request_state is not None:
        return state.request_state
    if message == SERVER_ID and state.server_id is not None:
        return state.server_id
    return message


def desubstitute(message: Any, state: State) -> Any:
    """The recorder's inverse of `substitute`: real cursor / server ids in a client message → placeholders."""
    if isinstance(message, list):
        return [desubstitute(m, state) for m in message]
    if not isinstance(message, dict):
        return message
    out = _unvariables(message, state)
    params = out.get("params")
    if isinstance(params, dict) and state.cursor is not None and params.get("cursor") == state.cursor:
        out["params"] = {**params, "cursor": CURSOR}
    params = out.get("params")
    if isinstance(params, dict) and state.request_state is not None:
        if params.get("requestState") == state.request_state:
            out["params"] = {**params, "requestState": REQUEST_STATE}
    if "method" not in out and "id" in out and state.server_id is not None and out["id"] == state.server_id:
        out["id"] = SERVER_ID
    return out


def _unvariables(value: Any, state: State) -> Any:
    if isinstance(value, dict):
        return {k: _unvariables(v, state) for k, v in value.items()}
    if isinstance(value, list):
        return [_unvariables(v, state) for v in value]
    for placeholder, real in state.captured.items():
        if type(value) is type(real) and value == real:
            return placeholder
    if not isinstance(value, str):
        return value
    value = _unvariable(value, state)
    for real, placeholder in state.uuids.items():  # only UUIDs the server sent first
        value = re.sub(re.escape(real), placeholder, value, flags=re.IGNORECASE)
    return value
