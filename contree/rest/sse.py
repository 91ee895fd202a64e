"""Server-Sent Events framing for `GET /operations/{id}/events` (both directions).

The server writes three frame kinds (spec, getOperationEvents): normal `id:`/`event:`/`data:` frames,
`: keepalive` comments and, after a failure once the 200 is committed, an `sse_error` frame preceded by
a comment. The parser is incremental so the client can feed it whatever chunks the socket yields.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec

from contree import api

KEEPALIVE = b": keepalive\n\n"
ERROR_COMMENT = b": stream ended with error, retry since last event id\n\n"

_encoder = msgspec.json.Encoder()


def event_frame(event: api.OperationEvent) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.id, event.type.encode(), _encoder.encode(event))


RECORD_EVENT = "operation"


def record_frame(body: bytes) -> bytes:
    """The operation's record after `completion` (an extension a client asks for with `record=1`): no id,
    so resuming from the last event id never replays it."""
    return b"event: " + RECORD_EVENT.encode() + b"\ndata: " + body + b"\n\n"


def error_frames(message: str) -> bytes:
    # data must stay on one line or the client would see several data fields joined by \n.
    one_line = " ".join(message.splitlines()) or "stream error"
    return ERROR_COMMENT + b"event: sse_error\ndata: " + one_line.encode("utf-8", "replace") + b"\n\n"


class SseFrame(msgspec.Struct, kw_only=True):
    event: str = "message"
    data: str = ""
    id: str | None = None


class SseParser:
    """Incremental SSE parser (WHATWG rules: CRLF/LF/CR line ends, comments, multi-line data)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, chunk: bytes) -> Iterator[SseFrame]:
        self._buffer += chunk
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                return
            end, skip = cut
            line = self._buffer[:end].decode("utf-8", "replace")
            self._buffer = self._buffer[end + skip :]
            frame = self._line(line)
            if frame is not None:
                yield frame

    def _line(self, line: str) -> SseFrame | None:
        if line == "":
            if not self._data and not self._event:
                self._id = None
                return None
            frame = SseFrame(event=self._event or "message", data="\n".join(self._data), id=self._id)
            self._event, self._data, self._id = "", [], None
            return frame
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._id = value
        return None


def _line_end(buffer: bytes) -> tuple[int, int] | None:
    """Index and width of the first line terminator, or None if no complete line is buffered."""
    lf = buffer.find(b"\n")
    cr = buffer.find(b"\r")
    if cr == -1 or (lf != -1 and lf < cr):
        return None if lf == -1 else (lf, 1)
    if cr == len(buffer) - 1:
        return None  # a CR at the end may be the first half of CRLF
    return (cr, 2) if buffer[cr + 1 : cr + 2] == b"\n" else (cr, 1)
