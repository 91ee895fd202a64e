"""What `Session.receive` hands the shell: messages to send, and instructions (run, cancel, deliver).

Every event is an immutable Struct. The shell sends `Reply`/`Notify`/`Ask` as they are, runs a handler
for each `Dispatch`, and reports the handler's outcome back with `Session.finish`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from protocol.messages import HandlerParams
from protocol.types import Ask, Notify, Reply, RequestId


class Client(msgspec.Struct, frozen=True):
    """Who asks: capabilities and identity (the session's, or a 2026-07-28 request's own `_meta`)."""

    capabilities: dict[str, Any]
    info: dict[str, Any]
    # Minimum log level a 2026-07-28 request asked for (None: no log notifications at all).
    log_level: int | None = None


class Call(msgspec.Struct, frozen=True):
    """A request whose answer needs a handler (tools/call, resources/read, prompts/get, completion)."""

    serial: int  # unique per session: request ids may be reused once answered
    id: RequestId
    method: str
    params: HandlerParams
    version: str
    modern: bool
    progress_token: RequestId | None = None
    client: Client | None = None  # 2026-07-28: the request's own; None: the session's (handshake era)
    answers: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)  # verified input responses
    task_support: str = (
        "forbidden"  # "optional"/"required": may become a task (client declared the extension)
    )


class Dispatch(msgspec.Struct, frozen=True):
    """Run the handler for `call`, then report its outcome with `Session.finish(call, ...)`."""

    call: Call


class Cancel(msgspec.Struct, frozen=True):
    """The client cancelled request `id`: stop its handler; no response will be sent for it."""

    id: RequestId


class Answer(msgspec.Struct, frozen=True):
    """The client's response to our server→client request `id` (exactly one of result / error)."""

    id: int
    result: Any = None
    error: dict[str, Any] | None = None


class Listen(msgspec.Struct, frozen=True):
    """A subscriptions/listen request opened a notification stream: keep request `id`'s stream open."""

    id: RequestId


class Provide(msgspec.Struct, frozen=True):
    """tasks/update delivered answers to task `task_id`'s outstanding input requests."""

    task_id: str
    answers: dict[str, dict[str, Any]]


class StopTask(msgspec.Struct, frozen=True):
    """tasks/cancel: stop the work of task `task_id` (its status already says cancelled)."""

    task_id: str


class Batch(msgspec.Struct, frozen=True):
    """A JSON array frame: the replies its events cause go out together, as one array."""

    events: tuple[Event, ...]


Event = Reply | Notify | Ask | Dispatch | Cancel | Answer | Listen | Provide | StopTask | Batch


def expects_reply(events: list[Event]) -> bool:
    """Whether anything will answer this frame (HTTP answers 202 otherwise)."""
    for event in events:
        t = type(event)
        if t is Reply or t is Dispatch or t is Listen:
            return True
        if t is Batch and expects_reply(list(event.events)):  # type: ignore[union-attr]
            return True
    return False


def runs_handlers(events: list[Event]) -> bool:
    """Whether a handler will run (stdio runs such frames concurrently, answers others in line order)."""
    for event in events:
        t = type(event)
        if t is Dispatch or t is Listen:
            return True
        if t is Batch and runs_handlers(list(event.events)):  # type: ignore[union-attr]
            return True
    return False
