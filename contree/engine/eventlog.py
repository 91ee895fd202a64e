"""The event log of one operation, the output spill of one run, and folding events back into results.

Each operation's events live in `<home>/operations/<uuid>.jsonl`, one JSON object per line, ids strictly
increasing; payloads are the `api.EventData*` Structs (`append` takes one, `OperationEvent.payload()`
reads one back). The log keeps a run's output only up to its `truncate_output_at` (the API's rule);
every byte a process writes also goes to its output spill, `<home>/output/<uuid>/<spid>.<stream>`,
written as it arrives (never held in memory) and bounded only by the engine's per-run output quota.

An event line is written with a single `write()` on an O_APPEND descriptor, so a SIGKILL of the engine
at worst tears the last line, which the next open (`read_events(repair=True)`) cuts off.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import msgspec

from contree import api
from contree.engine.changes import Changes
from contree.engine.storage.home import private_dir

Event = api.OperationEvent
_Payload = TypeVar("_Payload", bound=msgspec.Struct)

STREAM_TYPES = frozenset({"stdin", "stdout", "stderr"})
CHUNK_BYTES = 8192
DEFAULT_SIZE_CAP = 100 * 1024 * 1024
DEFAULT_OUTPUT_QUOTA = 1 << 30  # bytes of output (all streams, all processes) one run may store
OUTPUT_STREAMS = ("stdout", "stderr")

_SECRET_SUFFIXES = ("TOKEN", "SECRET", "PASSWORD", "API_KEY", "CREDENTIALS", "AUTHORIZATION")

_event_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(Event)


def now_iso(ts: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if ts is None else ts, tz=UTC)
    return moment.isoformat()


def mask_env(env: dict[str, str]) -> dict[str, str]:
    """Secret-looking values replaced by <MASKED> (event logs only; metadata keeps the request as sent)."""
    return {k: ("<MASKED>" if k.upper().endswith(_SECRET_SUFFIXES) else v) for k, v in env.items()}


def payload_as(event: Event, kind: type[_Payload]) -> _Payload:
    """`event.data` as the payload Struct `kind` (raises msgspec.ValidationError if malformed)."""
    return msgspec.convert(event.data, kind)


# --------------------------------------------------------------------------- output spills


def spill_name(spid: int, stream: str) -> str:
    return f"{spid}.{stream}"


class OutputSpill:
    """Every byte of output of one run, in files as it arrives, up to a quota shared by all its streams
    (beyond what the event log records anyway, which a spill always holds too).

    Files are opened on first write (`<dir>/<spid>.<stream>`, O_APPEND); what the quota refuses is only
    counted. Writes are plain `write()`s to the page cache: a SIGKILL of the engine keeps what was
    written, and `read_output` of a dead run simply sees the file as it was left.
    """

    def __init__(self, directory: Path, quota: int) -> None:
        self.dir = directory
        self.quota = quota
        self.used = 0
        self.dropped: dict[str, int] = {}
        self._fds: dict[str, int] = {}

    def write(self, spid: int, stream: str, data: bytes, *, reserved: int = 0) -> None:
        """Store `data`: its first `reserved` bytes always (the event log keeps them too, so a stream's
        spill holds at least what its events hold), the rest while the quota lasts."""
        name = spill_name(spid, stream)
        room = max(reserved, self.quota - self.used)
        keep = data if len(data) <= room else data[:room]
        if len(keep) < len(data):
            self.dropped[name] = self.dropped.get(name, 0) + len(data) - len(keep)
        if not keep:
            return
        fd = self._fds.get(name)
        if fd is None:
            private_dir(self.dir)
            fd = self._fds[name] = os.open(
                self.dir / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        view = memoryview(keep)
        while view:
            view = view[os.write(fd, view):]
        self.used += len(keep)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# --------------------------------------------------------------------------- event log


class EventLog:
    """The event log of one operation: an append-only file plus, while live, the events in memory."""

    def __init__(
        self, path: Path, *, size_cap: int = DEFAULT_SIZE_CAP, output: OutputSpill | None = None
    ) -> None:
        self.path = path
        self.size_cap = size_cap
        self.output = output
        self.events: list[Event] = read_events(path, repair=True)
        self.next_id = self.events[-1].id + 1 if self.events else 1
        self.size = sum(len(_event_encoder.encode(e)) + 1 for e in self.events)
        self.capped = any(e.type == "size_cap" for e in self.events)
        self.closed = any(e.type == "completion" for e in self.events)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._changes = Changes()
        self._lock = threading.Lock()

    def append(
        self, type: api.OperationEventType, data: api.EventData, spid: int | None = None
    ) -> Event | None:
        """Append one event; stream events over the log-wide size cap are dropped (returns None)."""
        with self._lock:
            if self.closed:
                return None
            if type in STREAM_TYPES and self.capped:
                return None
            event = Event.make(id=self.next_id, ts=now_iso(), type=type, data=data, spid=spid)
            line = _event_encoder.encode(event) + b"\n"
            if type in STREAM_TYPES and self.size + len(line) > self.size_cap:
                self.capped = True
                cap = api.EventDataSizeCap(limit_bytes=self.size_cap, file_size=self.size)
                self._write(Event.make(id=self.next_id, ts=event.ts, type="size_cap", data=cap, spid=0))
                return None
            self._write(event, line)
            if type == "completion":
                self.closed = True
            return event

    def _write(self, event: Event, line: bytes | None = None) -> None:
        if line is None:
            line = _event_encoder.encode(event) + b"\n"
        os.write(self._fd, line)
        self.size += len(line)
        self.events.append(event)
        self.next_id = event.id + 1
        self._changes.notify()

    def close_file(self) -> None:
        if self.output is not None:
            self.output.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._changes.notify()

    async def follow(self, *, since: int | None, spid: int | None, follow: bool) -> AsyncIterator[Event]:
        index = 0
        while True:
            events = self.events
            while index < len(events):
                event = events[index]
                index += 1
                if since is not None and event.id <= since:
                    continue
                if spid is not None and event.spid != spid:
                    continue
                yield event
            if not follow or self.closed or self._fd < 0:
                return
            await self._changes.wait()


def read_events(path: Path, *, repair: bool) -> list[Event]:
    """All complete events of a log file; with `repair`, a torn trailing line is cut off the file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    events: list[Event] = []
    good = 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            events.append(_event_decoder.decode(line))
        except msgspec.DecodeError:
            break
        good += len(line)
    if repair and good != len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(good)
    return events


class StreamRecorder:
    """Records one stream of one process: events up to `truncate_at` bytes (then counts what they miss);
    stdout and stderr also go whole to the log's output spill."""

    def __init__(self, log: EventLog, spid: int, stream: api.StreamName, truncate_at: int) -> None:
        self.log = log
        self.spid = spid
        self.stream = stream
        self.truncate_at = truncate_at
        self.emitted = 0
        self.dropped = 0
        self.captured = bytearray()
        self._closed = False

    def feed(self, data: bytes) -> None:
        if not data or self._closed:
            return
        room = self.truncate_at - self.emitted
        if self.log.output is not None and self.stream in OUTPUT_STREAMS:
            self.log.output.write(self.spid, self.stream, data, reserved=max(room, 0))
        keep, drop = data[: max(room, 0)], data[max(room, 0):]
        self.dropped += len(drop)
        for start in range(0, len(keep), CHUNK_BYTES):
            chunk = keep[start:start + CHUNK_BYTES]
            self.log.append(self.stream, api.encode_event_stream(chunk), self.spid)
            self.emitted += len(chunk)
            self.captured += chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.dropped:
            lost = api.EventDataTruncated(stream=self.stream, bytes_emitted=self.emitted,
                                          bytes_dropped=self.dropped)
            self.log.append("truncated", lost, self.spid)

    @property
    def truncated(self) -> bool:
        return self.dropped > 0


# --------------------------------------------------------------------------- folding events into results


class FoldedProcess(msgspec.Struct, kw_only=True):
    """What the events of one spid say about its process."""

    spawned: bool = False
    pid: int = -1
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stdout_dropped: int = 0
    stderr_dropped: int = 0
    exit: api.EventDataExit | None = None


def fold_process(events: Iterable[Event], spid: int) -> FoldedProcess:
    out = bytearray()
    err = bytearray()
    folded = FoldedProcess()
    for event in events:
        if event.spid != spid:
            continue
        if event.type == "spawn":
            folded.spawned = True
            folded.pid = payload_as(event, api.EventDataSpawn).pid
        elif event.type == "stdout":
            out += _chunk_bytes(event)
        elif event.type == "stderr":
            err += _chunk_bytes(event)
        elif event.type == "truncated":
            lost = payload_as(event, api.EventDataTruncated)
            if lost.stream == "stdout":
                folded.stdout_truncated = True
                folded.stdout_dropped = lost.bytes_dropped
            elif lost.stream == "stderr":
                folded.stderr_truncated = True
                folded.stderr_dropped = lost.bytes_dropped
        elif event.type == "exit":
            folded.exit = payload_as(event, api.EventDataExit)
    folded.stdout = bytes(out)
    folded.stderr = bytes(err)
    return folded


def _chunk_bytes(event: Event) -> bytes:
    chunk = payload_as(event, api.EventDataStream)
    return api.decode_stream(api.StreamRepr(value=chunk.value, encoding=chunk.encoding))
