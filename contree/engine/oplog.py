"""Operation records (SQLite, WAL) and append-only per-operation event logs.

Records live in `<home>/operations.db`; each operation's events in `<home>/operations/<uuid>.jsonl`,
one JSON object per line, ids strictly increasing. The event log keeps a run's output only up to its
`truncate_output_at` (the API's rule); every byte a process writes also goes to its output spill,
`<home>/output/<uuid>/<spid>.<stream>`, written as it arrives (never held in memory) and bounded only
by the engine's per-run output quota. `OperationLog.read_output` pages through it.

Records and events survive a SIGKILL of the engine: SQLite commits are atomic and an event line is
written with a single `write()` on an O_APPEND descriptor, so at worst the last line is torn, and
`recover()` trims it. Operations that were not terminal when the engine died
are marked FAILED on the next start with `INTERRUPTED`, and their log gets a final `completion` so
followers and resuming clients terminate.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import threading
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from contree import api
from contree.backend import MAX_OUTPUT_PAGE, OutputPage
from contree.engine.storage.home import private_dir, private_file
from contree.errors import BadRequest, NotFound
from contree.timeparse import parse_timestamp

Event = api.OperationEvent

PENDING, ASSIGNED, EXECUTING = "PENDING", "ASSIGNED", "EXECUTING"
SUCCESS, FAILED, CANCELLED = "SUCCESS", "FAILED", "CANCELLED"
TERMINAL = frozenset({SUCCESS, FAILED, CANCELLED})
STATUSES = (PENDING, ASSIGNED, EXECUTING, SUCCESS, FAILED, CANCELLED)
KINDS = ("instance", "image_import")
INTERRUPTED = "engine restarted while the operation was running"

STREAM_TYPES = frozenset({"stdin", "stdout", "stderr"})
CHUNK_BYTES = 8192
DEFAULT_SIZE_CAP = 100 * 1024 * 1024
DEFAULT_OUTPUT_QUOTA = 1 << 30  # bytes of output (all streams, all processes) one run may store
OUTPUT_STREAMS = ("stdout", "stderr")

_SECRET_SUFFIXES = ("TOKEN", "SECRET", "PASSWORD", "API_KEY", "CREDENTIALS", "AUTHORIZATION")


# --------------------------------------------------------------------------- small helpers


def now_iso(ts: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if ts is None else ts, tz=UTC)
    return moment.isoformat()


def mask_env(env: dict[str, str]) -> dict[str, str]:
    """Secret-looking values replaced by <MASKED> (event logs only; metadata keeps the request as sent)."""
    return {k: ("<MASKED>" if k.upper().endswith(_SECRET_SUFFIXES) else v) for k, v in env.items()}


def parse_instant(value: str, *, now: float | None = None) -> float:
    """A `since`/`until` value as unix seconds (ISO 8601, unix seconds or an interval ago); 400 if invalid."""
    try:
        return parse_timestamp(value, now=None if now is None else datetime.fromtimestamp(now, UTC))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


# --------------------------------------------------------------------------- records


class OpRecord(msgspec.Struct, kw_only=True):
    """One operation as persisted. `metadata` is the wire metadata (spawn request or import metadata)."""

    uuid: str
    kind: str
    status: str = PENDING
    error: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    image_uuid: str | None = None
    result_image_uuid: str | None = None
    result_tag: str | None = None
    image_size: int | None = None
    consumed_cpu: float | None = None
    consumed_memory: int | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    # "<spid>/<stream>" -> bytes the quota refused (only streams that lost some); see OutputSpill
    output_dropped: dict[str, int] = msgspec.field(default_factory=dict)
    output_quota: int | None = None

    @property
    def duration(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at if self.finished_at is not None else time.time()
        return round(end - self.started_at, 6)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


_event_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(Event)

_record_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(OpRecord)



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
        self.events: list[Event] = _read_events(path, repair=True)
        self.next_id = self.events[-1].id + 1 if self.events else 1
        self.size = sum(len(_event_encoder.encode(e)) + 1 for e in self.events)
        self.capped = any(e.type == "size_cap" for e in self.events)
        self.closed = any(e.type == "completion" for e in self.events)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._changed = asyncio.Event() if _has_loop() else None
        self._lock = threading.Lock()

    def append(
        self, type: api.OperationEventType, data: dict[str, Any], spid: int | None = None
    ) -> Event | None:
        """Append one event; stream events over the log-wide size cap are dropped (returns None)."""
        with self._lock:
            if self.closed:
                return None
            if type in STREAM_TYPES and self.capped:
                return None
            event = Event(id=self.next_id, ts=now_iso(), type=type, data=data, spid=spid)
            line = _event_encoder.encode(event) + b"\n"
            if type in STREAM_TYPES and self.size + len(line) > self.size_cap:
                self.capped = True
                self._write(Event(id=self.next_id, ts=event.ts, type="size_cap", spid=0,
                                  data={"limit_bytes": self.size_cap, "file_size": self.size}))
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
        self._notify()

    def _notify(self) -> None:
        changed = self._changed
        if changed is not None:
            self._changed = asyncio.Event()
            changed.set()

    def close_file(self) -> None:
        if self.output is not None:
            self.output.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._notify()

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
            changed = self._changed
            if changed is None:
                self._changed = changed = asyncio.Event()
            await changed.wait()


def _has_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _read_events(path: Path, *, repair: bool) -> list[Event]:
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
            self.log.append(self.stream, msgspec.to_builtins(api.encode_event_stream(chunk)), self.spid)
            self.emitted += len(chunk)
            self.captured += chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.dropped:
            self.log.append(
                "truncated",
                {"stream": self.stream, "bytes_emitted": self.emitted, "bytes_dropped": self.dropped},
                self.spid,
            )

    @property
    def truncated(self) -> bool:
        return self.dropped > 0


# --------------------------------------------------------------------------- the operation log


_SCHEMA = """
CREATE TABLE IF NOT EXISTS operations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS operations_created ON operations(created_at);
"""


class OperationLog:
    """Every operation of one engine home: records in SQLite, events in per-operation files."""

    def __init__(
        self, home: Path, *, size_cap: int = DEFAULT_SIZE_CAP, output_quota: int = DEFAULT_OUTPUT_QUOTA
    ) -> None:
        self.home = home
        self.dir = home / "operations"
        self.output_dir = home / "output"
        self.size_cap = size_cap
        self.output_quota = output_quota
        private_dir(self.dir)
        private_file(home / "operations.db")
        self._db = sqlite3.connect(home / "operations.db", isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._live: dict[str, EventLog] = {}
        self._records: dict[str, OpRecord] = {}
        self._changed: asyncio.Event | None = None

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()

    async def _wait_change(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        await self._changed.wait()

    def close(self) -> None:
        for log in self._live.values():
            log.close_file()
        self._live.clear()
        self._db.close()

    # ---- recovery

    def recover(self) -> list[str]:
        """Mark operations left non-terminal by a dead engine FAILED; returns their ids."""
        rows = self._db.execute(
            "SELECT record FROM operations WHERE status NOT IN (?, ?, ?)", tuple(TERMINAL)
        ).fetchall()
        interrupted: list[str] = []
        for (blob,) in rows:
            record = _record_decoder.decode(blob)
            record.status = FAILED
            record.error = INTERRUPTED
            record.result_image_uuid = None
            record.image_size = None
            record.finished_at = record.finished_at or time.time()
            self.save(record)
            log = EventLog(self.log_path(record.uuid), size_cap=self.size_cap)
            log.append("completion", completion_data(record))
            log.close_file()
            interrupted.append(record.uuid)
        for path in self.dir.glob("*.jsonl"):
            _read_events(path, repair=True)
        return interrupted

    # ---- records

    def create(self, kind: str, *, image_uuid: str | None, metadata: dict[str, Any]) -> OpRecord:
        record = OpRecord(
            uuid=str(uuidlib.uuid4()), kind=kind, created_at=time.time(), image_uuid=image_uuid,
            metadata=metadata,
        )
        self._db.execute(
            "INSERT INTO operations (uuid, kind, status, created_at, record) VALUES (?, ?, ?, ?, ?)",
            (record.uuid, kind, record.status, record.created_at, _record_encoder.encode(record)),
        )
        self._records[record.uuid] = record
        return record

    def save(self, record: OpRecord) -> None:
        live = self._live.get(record.uuid)
        if live is not None and live.output is not None:
            record.output_quota = live.output.quota
            record.output_dropped = dict(live.output.dropped)
        self._db.execute(
            "UPDATE operations SET status = ?, record = ? WHERE uuid = ?",
            (record.status, _record_encoder.encode(record), record.uuid),
        )
        if record.terminal:
            self._records.pop(record.uuid, None)
            self._notify()
        else:
            self._records[record.uuid] = record

    def get(self, op_uuid: str) -> OpRecord:
        live = self._records.get(op_uuid)
        if live is not None:
            return live
        row = self._db.execute("SELECT record FROM operations WHERE uuid = ?", (op_uuid,)).fetchone()
        if row is None:
            raise NotFound(f"operation {op_uuid} not found")
        return _record_decoder.decode(row[0])

    def query(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[OpRecord]:
        if not 1 <= limit <= 1000:
            raise BadRequest("limit must be between 1 and 1000")
        if offset < 0:
            raise BadRequest("offset must be >= 0")
        clauses: list[str] = []
        args: list[Any] = []
        if status:
            wanted = status.strip().upper()
            if wanted == "RUNNING":
                wanted = EXECUTING
            if wanted not in STATUSES:
                raise BadRequest(f"unknown status {status!r}; one of {', '.join(STATUSES)}")
            clauses.append("status = ?")
            args.append(wanted)
        if kind:
            if kind not in KINDS:
                raise BadRequest(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
            clauses.append("kind = ?")
            args.append(kind)
        if since:
            clauses.append("created_at >= ?")
            args.append(parse_instant(since))
        if until:
            clauses.append("created_at <= ?")
            args.append(parse_instant(until))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._db.execute(
            f"SELECT uuid, record FROM operations {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
            (*args, limit, offset),
        ).fetchall()
        return [self._records.get(op_uuid) or _record_decoder.decode(blob) for op_uuid, blob in rows]

    def records(self) -> Iterator[OpRecord]:
        """Every operation, oldest first (maintenance: prune, disk usage)."""
        for (blob,) in self._db.execute("SELECT record FROM operations ORDER BY seq"):
            yield _record_decoder.decode(blob)

    def busy(self) -> tuple[set[str], set[str]]:
        """(input images, ids) of the operations still queued or running, in any process."""
        rows = self._db.execute(
            "SELECT record FROM operations WHERE status NOT IN (?, ?, ?)", tuple(TERMINAL)
        ).fetchall()
        found = [_record_decoder.decode(blob) for (blob,) in rows]
        return {r.image_uuid for r in found if r.image_uuid}, {r.uuid for r in found}

    def prune_output(self, *, finished_before: float, dry_run: bool = False) -> tuple[int, int]:
        """Delete the output spills of runs that ended before `finished_before` (their event logs keep
        what the API records); returns (runs, bytes)."""
        if not self.output_dir.is_dir():
            return 0, 0
        count = size = 0
        for entry in list(self.output_dir.iterdir()):
            try:
                record = self.get(entry.name)
            except (NotFound, ValueError):
                record = None  # not an operation of this home: nothing can read it
            if record is not None and not (record.terminal and (record.finished_at or 0) < finished_before):
                continue
            count += 1
            size += sum(f.stat().st_size for f in entry.iterdir()) if entry.is_dir() else 0
            if not dry_run:
                shutil.rmtree(entry, ignore_errors=True)
        return count, size

    # ---- events

    def log_path(self, op_uuid: str) -> Path:
        return self.dir / f"{op_uuid}.jsonl"

    def open_log(self, op_uuid: str) -> EventLog:
        """The live event log of an operation being executed (created on first use)."""
        log = self._live.get(op_uuid)
        if log is None:
            record = self._records.get(op_uuid)
            spill = None
            if record is not None and record.kind == "instance":
                spill = OutputSpill(self.output_dir / op_uuid, self.output_quota)
            log = self._live[op_uuid] = EventLog(self.log_path(op_uuid), size_cap=self.size_cap, output=spill)
            self._notify()
        return log

    def finish_log(self, op_uuid: str) -> None:
        log = self._live.pop(op_uuid, None)
        if log is not None:
            log.close_file()

    def read_output(
        self, op_uuid: str, stream: str, *, spid: int = 1, offset: int = 0, limit: int = MAX_OUTPUT_PAGE,
        tail: bool = False,
    ) -> OutputPage:
        """Bytes [offset, offset+limit) of a process's stored stdout/stderr (`tail`: its last `limit`
        bytes). Runs from before output spills existed are served from their event log."""
        if stream not in OUTPUT_STREAMS:
            raise BadRequest(f"unknown stream {stream!r}: stdout or stderr")
        if offset < 0 or not 0 <= limit <= MAX_OUTPUT_PAGE:
            raise BadRequest(f"offset must be >= 0 and limit 0..{MAX_OUTPUT_PAGE}")
        if spid < 1:
            raise BadRequest("spid must be >= 1")
        record = self.get(op_uuid)
        if record.kind != "instance":
            raise BadRequest(f"operation {op_uuid} is an {record.kind}: it has no output")
        name = spill_name(spid, stream)
        live = self._live.get(op_uuid)
        spill = live.output if live is not None else None
        dropped = (spill.dropped if spill is not None else record.output_dropped).get(name, 0)
        # A run cut short by an engine crash was saved before its spill existed: its quota is this one's.
        quota = spill.quota if spill is not None else (record.output_quota or self.output_quota)
        if not (self.output_dir / op_uuid).is_dir() and (record.terminal or record.output_quota is None):
            # no spill: a run of an engine before spills existed, one whose spill was pruned, or one that
            # wrote nothing (its events say so too)
            return self._output_from_events(record, spid, stream, offset, limit, tail)
        try:
            fd = os.open(self.output_dir / op_uuid / name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if record.terminal and not (self.output_dir / op_uuid).is_dir():  # pruned meanwhile
                return self._output_from_events(record, spid, stream, offset, limit, tail)
            if spid != 1 and not fold_process(self.read_events(op_uuid), spid).spawned:
                raise NotFound(f"operation {op_uuid} has no process {spid}") from None
            fd = -1
        try:
            total = os.fstat(fd).st_size if fd >= 0 else 0
            start = max(0, total - limit) if tail else offset
            if start > total:
                raise BadRequest(f"offset {offset} is beyond the end of {stream} ({total} bytes)")
            data = os.pread(fd, limit, start) if fd >= 0 and start < total and limit else b""
        finally:
            if fd >= 0:
                os.close(fd)
        return OutputPage(data=data, offset=start, total=total, complete=record.terminal,
                          dropped=dropped, quota=quota)

    def _output_from_events(
        self, record: OpRecord, spid: int, stream: str, offset: int, limit: int, tail: bool
    ) -> OutputPage:
        folded = fold_process(self.read_events(record.uuid), spid)
        if not folded.spawned and spid != 1:
            raise NotFound(f"operation {record.uuid} has no process {spid}")
        whole: bytes = getattr(folded, stream)
        start = max(0, len(whole) - limit) if tail else offset
        if start > len(whole):
            raise BadRequest(f"offset {offset} is beyond the end of {stream} ({len(whole)} bytes)")
        dropped = getattr(folded, f"{stream}_dropped")
        return OutputPage(data=whole[start:start + limit], offset=start, total=len(whole),
                          complete=record.terminal, dropped=dropped, quota=None)

    def live_log(self, op_uuid: str) -> EventLog | None:
        return self._live.get(op_uuid)

    def read_events(self, op_uuid: str) -> list[Event]:
        live = self._live.get(op_uuid)
        if live is not None:
            return list(live.events)
        return _read_events(self.log_path(op_uuid), repair=False)

    async def events(
        self, op_uuid: str, *, follow: bool = False, spid: int | None = None, since: int | None = None
    ) -> AsyncIterator[Event]:
        record = self.get(op_uuid)
        live = self._live.get(op_uuid)
        if live is not None:
            async for event in live.follow(since=since, spid=spid, follow=follow):
                yield event
            return
        if follow and not record.terminal:
            # Queued work has no log yet: wait until the executor opens it (or the op ends without one).
            while (live := self._live.get(op_uuid)) is None and not self.get(op_uuid).terminal:
                await self._wait_change()
            if live is not None:
                async for event in live.follow(since=since, spid=spid, follow=True):
                    yield event
                return
        for event in _read_events(self.log_path(op_uuid), repair=False):
            if since is not None and event.id <= since:
                continue
            if spid is not None and event.spid != spid:
                continue
            yield event


def completion_data(record: OpRecord) -> dict[str, Any]:
    duration = record.duration or 0.0
    return {
        "status": record.status,
        "result_image_uuid": record.result_image_uuid if record.status == SUCCESS else None,
        "error": record.error,
        "duration_ms": int(duration * 1000),
        "image_size_bytes": record.image_size or 0,
    }


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
    exit: dict[str, Any] | None = None


def fold_process(events: Iterable[Event], spid: int) -> FoldedProcess:
    out = bytearray()
    err = bytearray()
    folded = FoldedProcess()
    for event in events:
        if event.spid != spid:
            continue
        if event.type == "spawn":
            folded.spawned = True
            folded.pid = int(event.data.get("pid", -1))
        elif event.type == "stdout":
            out += _chunk_bytes(event)
        elif event.type == "stderr":
            err += _chunk_bytes(event)
        elif event.type == "truncated":
            dropped = int(event.data.get("bytes_dropped") or 0)
            if event.data.get("stream") == "stdout":
                folded.stdout_truncated = True
                folded.stdout_dropped = dropped
            elif event.data.get("stream") == "stderr":
                folded.stderr_truncated = True
                folded.stderr_dropped = dropped
        elif event.type == "exit":
            folded.exit = event.data
    folded.stdout = bytes(out)
    folded.stderr = bytes(err)
    return folded


def _chunk_bytes(event: Event) -> bytes:
    stream = api.StreamRepr(value=event.data["value"], encoding=event.data.get("encoding", "ascii"))
    return api.decode_stream(stream)
