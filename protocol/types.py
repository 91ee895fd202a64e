"""Leaf types shared by the core and the transports: request ids, the three kinds of outgoing message, sinks.

Outgoing messages are typed, so a transport never has to read its own output to learn what it is (a
response ends an HTTP POST stream; a notification or a server→client request does not).
"""

from __future__ import annotations

from typing import Protocol

import msgspec

RequestId = int | str


class Reply(msgspec.Struct, frozen=True):
    """The response to a client request (result or error, or a batch array of them), encoded.

    `status` is the HTTP status the Streamable HTTP binding answers with when this reply is the whole
    body: 400/404 for the envelope errors of 2026-07-28 requests, 200 otherwise."""

    id: RequestId | None
    data: bytes
    status: int = 200


class Notify(msgspec.Struct, frozen=True):
    """A notification; `related` is the request it belongs to (None: unrelated, e.g. list_changed)."""

    data: bytes
    related: RequestId | None = None


class Ask(msgspec.Struct, frozen=True):
    """A server→client request (sampling, elicitation, roots) sent while serving request `related`."""

    id: int
    data: bytes
    related: RequestId | None = None


Outgoing = Reply | Notify | Ask


class Sink(Protocol):
    """Where a transport takes outgoing messages (stdout, an SSE stream, a JSON body)."""

    async def __call__(self, message: Outgoing, /) -> None: ...
