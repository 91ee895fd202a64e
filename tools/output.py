"""The whole output of a run: UTF-8-safe pages for the stream resources, tails for results.

The embedded engine keeps every byte a run writes (up to its output quota) and serves byte ranges
(`read_output`, directly or over its REST API). The Contree cloud API keeps only what its event log
recorded, at most `truncate_output_at` (10 MiB) per stream: there the pages come from the event log and
say so (`source="events"`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from contree import api
from contree.backend import OutputPage, OutputReader
from contree.errors import NotFound
from tools.budget import as_text, fit_bytes, fit_prefix, json_len, result_size, utf8_boundary
from tools.convert import head_length, operation_output, stream_raw
from tools.models import OperationOutput, ProcessOutput
from tools.state import ServerState

Shaped = OperationOutput | ProcessOutput  # the results whose streams are shaped here

STREAMS = ("stdout", "stderr")
UTF8_SLACK = 3  # bytes read beyond a page's limit to finish its last character
DEFAULT_PAGE = 45 * 1024  # a default page (text, or base64 of binary) stays within RESULT_BUDGET


class StreamPage(api.Model):
    """One page of a stream. `text` is None for binary data (not UTF-8, or NUL bytes)."""

    data: bytes
    text: str | None
    offset: int
    total: int
    complete: bool
    dropped: int = 0
    quota: int | None = None
    source: str = "engine"

    @property
    def next_offset(self) -> int:
        return self.offset + len(self.data)

    def meta(self) -> dict[str, Any]:
        """What a reader needs to page on (`_meta` of the resource contents)."""
        meta: dict[str, Any] = {
            "offset": self.offset,
            "bytes": len(self.data),
            "next_offset": self.next_offset,
            "total_bytes": self.total,
            "complete": self.complete,
            "encoding": "utf-8" if self.text is not None else "base64",
            "source": self.source,
        }
        if self.dropped:
            meta["dropped_bytes"] = self.dropped
        if self.quota is not None:
            meta["quota_bytes"] = self.quota
        return meta


async def fetch(
    state: ServerState, operation_id: str, stream: str, *, offset: int, limit: int, tail: bool = False,
    spid: int = 1,
) -> OutputPage:
    """Raw bytes of a process's stream (spid 1: the run's): from the engine's spill, else (cloud) from the
    recorded event log."""
    page = await engine_page(state, operation_id, stream, offset=offset, limit=limit, tail=tail, spid=spid)
    if page is not None:
        return page
    whole, dropped, complete = await events_stream(state, operation_id, stream, spid=spid)
    start = max(0, len(whole) - limit) if tail else offset
    if start > len(whole):
        raise ValueError(f"offset {offset} is beyond the end of {stream} ({len(whole)} bytes recorded)")
    return OutputPage(
        data=whole[start : start + limit], offset=start, total=len(whole), complete=complete, dropped=dropped
    )


async def engine_page(
    state: ServerState, operation_id: str, stream: str, *, offset: int, limit: int, tail: bool = False,
    spid: int = 1,
) -> OutputPage | None:
    """The engine's page of a stream; None when the backend keeps no whole output (remembered)."""
    backend = state.backend
    if not state.output_paging or not isinstance(backend, OutputReader):
        return None
    try:
        return await backend.read_output(operation_id, stream, spid=spid, offset=offset, limit=limit,
                                         tail=tail)
    except NotFound:
        # The callers checked that the operation exists: this server has no output paging.
        state.output_paging = False
        return None


async def events_stream(
    state: ServerState, operation_id: str, stream: str, *, spid: int = 1
) -> tuple[bytes, int, bool]:
    """(bytes, bytes not recorded, log complete) of a process's stream, read from the operation's event
    log (spid 1: the main process, which events without a spid belong to)."""
    wanted = (1, None) if spid == 1 else (spid,)
    chunks: list[bytes] = []
    dropped = 0
    complete = False
    async for event in state.backend.events(operation_id, follow=False):
        if event.type == "completion":
            complete = True
        if event.spid not in wanted or event.type not in (stream, "truncated"):
            continue
        payload = event.payload()
        if isinstance(payload, api.EventDataStream) and event.type == stream:
            chunks.append(stream_raw(payload)[0])
        elif isinstance(payload, api.EventDataTruncated) and payload.stream == stream:
            dropped = payload.bytes_dropped
    return b"".join(chunks), dropped, complete


def page_text(data: bytes) -> tuple[bytes, str | None]:
    """(data, text) with a character cut off at the end moved out of the page; text None when binary."""
    if b"\x00" in data:
        return data, None
    try:
        return data, data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start > 0 and exc.start >= len(data) - UTF8_SLACK and exc.reason == "unexpected end of data":
            return data[: exc.start], data[: exc.start].decode("utf-8")
        return data, None


async def read_page(
    state: ServerState,
    operation_id: str,
    stream: str,
    *,
    offset: int,
    limit: int,
    json_budget: int | None = None,
    spid: int = 1,
) -> StreamPage:
    """Bytes [offset, offset+limit) of a stream, never ending inside a UTF-8 character: a text page stops
    at the last whole character (or, when the limit is smaller than the first character, holds that one
    character). `json_budget` shortens a text page whose JSON form would be larger."""
    raw = await fetch(state, operation_id, stream, offset=offset, limit=limit + UTF8_SLACK, spid=spid)
    data = raw.data
    if len(data) > limit:
        cut = utf8_boundary(data, limit)
        if cut == 0:  # the limit is smaller than the first character: give that one whole
            cut = next((i for i in range(1, len(data)) if data[i] & 0xC0 != 0x80), len(data))
        data = data[:cut]
    data, text = page_text(data)
    if text is not None and json_budget is not None and json_len(text) > json_budget:
        text = fit_prefix(text, json_budget)
        data = text.encode()
    elif text is None and json_budget is not None:
        data = data[: json_budget * 3 // 4]
    source = "engine" if raw.quota is not None else "events"
    return StreamPage(
        data=data,
        text=text,
        offset=raw.offset,
        total=raw.total,
        complete=raw.complete,
        dropped=raw.dropped,
        quota=raw.quota,
        source=source,
    )


RESOURCE_BASE = "contree://operations/instance"
HINT_ROOM = 1024  # bytes of the budget kept for the hint, written after the streams are fitted


def stream_uri(operation_id: str, stream: str) -> str:
    return f"{RESOURCE_BASE}/{operation_id}/{stream}"


class StreamPlace(msgspec.Struct, kw_only=True, frozen=True):  # mypy: no frozen below non-frozen Model
    """Where a shaped result's streams are read whole: a run's (spid 1) or a sandbox process's."""

    operation_id: str
    spid: int = 1
    resource_base: str | None = None  # …/<stream> is the resource; None: the run's stream resource
    tool_call: str | None = None  # '<tool>(<args>, stream="{stream}", offset={offset})' template

    def uri(self, stream: str) -> str:
        if self.resource_base is None:
            return stream_uri(self.operation_id, stream)
        return f"{self.resource_base}/{stream}"

    def call(self, stream: str, offset: int) -> str:
        template = self.tool_call or 'get_operation(operation_id, stream="{stream}", offset={offset})'
        return template.format(stream=stream, offset=offset)



class _View(api.Model):
    """One stream of a result while it is being shaped: head bytes, tail bytes and what is beyond."""

    head: bytes
    total: int
    tail: bytes = b""
    recorded_only: bool = False  # the backend kept only part of the stream (the cloud's event log)
    dropped: int = 0
    quota: int | None = None

    @property
    def cut(self) -> bool:
        return len(self.head) + len(self.tail) < self.total or self.recorded_only or self.dropped > 0


async def _view(
    state: ServerState, place: StreamPlace, stream: str, recorded: api.StreamRepr | None, cap: int,
    truncated: bool,
) -> _View:
    raw, api_cut = stream_raw(recorded)
    head = raw[: head_length(raw, cap)]
    if not truncated:
        return _View(head=head, total=len(raw))
    page = await engine_page(state, place.operation_id, stream, offset=0, limit=cap, tail=True,
                             spid=place.spid)
    if page is not None and page.quota is not None:
        start = max(page.offset, len(head))
        return _View(
            head=head,
            total=page.total,
            tail=page.data[start - page.offset :],
            dropped=page.dropped,
            quota=page.quota,
        )
    start = max(len(head), len(raw) - cap)
    return _View(head=head, total=len(raw), tail=raw[start:], recorded_only=api_cut)


def _fit(out: Shaped, views: dict[str, _View], budget: int, place: StreamPlace) -> None:
    """Shorten tails, then heads, until the result fits `budget` (bytes of pretty JSON)."""
    for _ in range(12):
        _fill(out, views, place, hint=False)
        excess = result_size(out) - (budget - HINT_ROOM)
        if excess <= 0:
            return
        parts = [(len(v.tail), name, "tail") for name, v in views.items() if v.tail]
        if not parts:
            parts = [(len(v.head), name, "head") for name, v in views.items() if v.head]
        if not parts:
            return
        _, name, which = max(parts)
        view = views[name]
        if which == "tail":
            keep = fit_bytes(view.tail, max(0, json_len(as_text(view.tail)) - excess), head=False)
            view.tail = view.tail[len(view.tail) - keep :] if keep else b""
        else:
            keep = fit_bytes(view.head, max(0, json_len(as_text(view.head)) - excess), head=True)
            view.head = view.head[:keep]


def _fill(out: Shaped, views: dict[str, _View], place: StreamPlace, *, hint: bool) -> None:
    notes: list[str] = []
    for name, view in views.items():
        cut = view.cut
        setattr(out, name, view.head.decode("utf-8", errors="replace"))
        setattr(out, f"{name}_truncated", cut)
        setattr(out, f"{name}_bytes", view.total)
        setattr(out, f"{name}_tail", as_text(view.tail) if view.tail else None)
        setattr(out, f"{name}_resource", place.uri(name) if cut else None)
        if hint and cut:
            notes.append(_note(place, name, view))
    dropped = sum(v.dropped for v in views.values())
    out.output_quota_exceeded = dropped > 0
    out.output_bytes_kept = sum(v.total for v in views.values()) if dropped else None
    if hint and notes:
        out.hint = " ".join(notes)


def _note(place: StreamPlace, name: str, view: _View) -> str:
    shown = f"the first {len(view.head)} bytes ({name})"
    if view.tail:
        shown += f" and the last {len(view.tail)} ({name}_tail)"
    note = f"{name} has {view.total} bytes; shown: {shown}."
    rest = view.total - len(view.head) - len(view.tail)
    if rest > 0:
        note += (
            f" Read the rest with resources/read {place.uri(name)}?offset={len(view.head)}"
            f"&limit=<bytes>, or {place.call(name, len(view.head))}."
        )
    if view.recorded_only:
        note += f" The Contree API recorded only these {view.total} bytes of {name}; the rest was not kept."
    if view.dropped:
        note += (
            f" {view.dropped} more bytes of {name} exceeded the engine's per-run output quota "
            f"({view.quota} bytes) and were not stored."
        )
    return note


async def shape(
    state: ServerState,
    op: api.OperationResponse,
    *,
    cap: int,
    budget: int | None,
    with_resources: bool = False,
) -> OperationOutput:
    """The OperationOutput of an operation as a tool returns it: each stream's head (`cap` bytes) and,
    when a stream was longer, its tail, size, resource URI and a hint on reading the rest; within
    `budget` bytes (None: the caller asked for `cap` explicitly)."""
    out = operation_output(op, cap=cap, with_resources=with_resources)
    if out.kind != "instance" or not out.uuid:
        return out
    recorded = op.instance_result() or api.InstanceResult()
    await shape_streams(state, out, StreamPlace(operation_id=out.uuid), recorded, cap=cap, budget=budget)
    return out


async def shape_streams(
    state: ServerState, out: Shaped, place: StreamPlace, recorded: api.InstanceResult, *, cap: int,
    budget: int | None,
) -> None:
    """Fill `out`'s stream fields (`stdout`, `stdout_truncated`, `stdout_tail`, `stdout_bytes`,
    `stdout_resource`, the same for stderr, `hint`, `output_quota_exceeded`, `output_bytes_kept`) from a
    process's recorded result, within `budget` bytes of the whole result."""
    views = {
        "stdout": await _view(state, place, "stdout", recorded.stdout, cap, out.stdout_truncated),
        "stderr": await _view(state, place, "stderr", recorded.stderr, cap, out.stderr_truncated),
    }
    if budget is not None:
        _fit(out, views, budget, place)
    _fill(out, views, place, hint=True)
