"""Operation records (SQLite, WAL) and their lifecycle: the one place an operation's status changes.

Records live in `<home>/operations.db`; each operation's events in its event log (`eventlog.py`). An
operation moves along `TRANSITIONS` (h11's rule: every state and transition in one table):

    PENDING → ASSIGNED → EXECUTING → SUCCESS | FAILED | CANCELLED
    PENDING → EXECUTING (imports), and any non-terminal status → FAILED | CANCELLED

`OperationLog.transition()` is the only status write and refuses any other move (`IllegalTransition`);
`OperationLog.finish()` is the only way an operation ends: terminal status, `shutdown` (instances) and
`completion` events, the record saved, the live log closed. `OperationLog.read_output` pages through a
run's output spill.

Records and events survive a SIGKILL of the engine: SQLite commits are atomic and an event line is one
`write()`. Operations that were not terminal when the engine died are finished FAILED with
`INTERRUPTED` on the next start (`recover()`), so followers and resuming clients terminate.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final

import msgspec

from contree import api
from contree.backend import MAX_OUTPUT_PAGE, OutputPage
from contree.engine.changes import Changes
from contree.engine.eventlog import (
    DEFAULT_OUTPUT_QUOTA,
    DEFAULT_SIZE_CAP,
    OUTPUT_STREAMS,
    Event,
    EventLog,
    OutputSpill,
    fold_process,
    now_iso,
    read_events,
    spill_name,
)
from contree.engine.storage.home import private_dir, private_file
from contree.errors import BadRequest, NotFound
from contree.sqlitedb import open_wal
from contree.timeparse import time_bounds

__all__ = ["DEFAULT_OUTPUT_QUOTA", "DEFAULT_SIZE_CAP"]  # re-exported: the engine's settings name them

PENDING: Final = "PENDING"
ASSIGNED: Final = "ASSIGNED"
EXECUTING: Final = "EXECUTING"
SUCCESS: Final = "SUCCESS"
FAILED: Final = "FAILED"
CANCELLED: Final = "CANCELLED"
STATUSES: tuple[api.OperationStatus, ...] = (PENDING, ASSIGNED, EXECUTING, SUCCESS, FAILED, CANCELLED)
KINDS: tuple[api.OperationKind, ...] = ("instance", "image_import")
INTERRUPTED = "engine restarted while the operation was running"

# Which status may follow which; every other move is refused.
TRANSITIONS: dict[api.OperationStatus, frozenset[api.OperationStatus]] = {
    PENDING: frozenset({ASSIGNED, EXECUTING, FAILED, CANCELLED}),  # an import starts EXECUTING
    ASSIGNED: frozenset({EXECUTING, FAILED, CANCELLED}),  # an instance between staging and its start
    EXECUTING: frozenset({SUCCESS, FAILED, CANCELLED}),
    SUCCESS: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A status move `TRANSITIONS` does not allow: an engine bug, never a client's."""


# --------------------------------------------------------------------------- records


class OpRecord(msgspec.Struct, kw_only=True):
    """One operation as persisted. `metadata` is the wire metadata (spawn request or import metadata)."""

    uuid: str
    kind: api.OperationKind
    status: api.OperationStatus = PENDING
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
        return self.status in api.TERMINAL_STATUSES


def completion_event(record: OpRecord, status: api.TerminalStatus) -> api.EventDataCompletion:
    duration = record.duration or 0.0
    return api.EventDataCompletion(
        status=status,
        result_image_uuid=record.result_image_uuid if status == SUCCESS else None,
        error=record.error,
        duration_ms=int(duration * 1000),
        image_size_bytes=record.image_size or 0,
    )


_record_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(OpRecord)


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
        self._db = open_wal(home / "operations.db", _SCHEMA)
        self._live: dict[str, EventLog] = {}
        self._records: dict[str, OpRecord] = {}
        self._changes = Changes()

    def close(self) -> None:
        for log in self._live.values():
            log.close_file()
        self._live.clear()
        self._db.close()

    # ---- recovery

    def recover(self) -> list[str]:
        """Mark operations left non-terminal by a dead engine FAILED; returns their ids."""
        rows = self._db.execute(
            "SELECT record FROM operations WHERE status NOT IN (?, ?, ?)", tuple(api.TERMINAL_STATUSES)
        ).fetchall()
        interrupted: list[str] = []
        for (blob,) in rows:
            record = _record_decoder.decode(blob)
            self.finish(record, FAILED, error=INTERRUPTED)
            interrupted.append(record.uuid)
        for path in self.dir.glob("*.jsonl"):
            read_events(path, repair=True)
        return interrupted

    # ---- lifecycle

    def transition(
        self, record: OpRecord, to: api.OperationStatus, *, error: str | None = None, save: bool = True
    ) -> None:
        """Move `record` to status `to` (EXECUTING also stamps `started_at`); refuses a move
        `TRANSITIONS` does not allow. `save=False` keeps the move in memory until the next save."""
        if to not in TRANSITIONS[record.status]:
            raise IllegalTransition(f"operation {record.uuid}: {record.status} -> {to}")
        record.status = to
        if error is not None:
            record.error = error
        if to == EXECUTING:
            record.started_at = time.time()
        if save:
            self.save(record)

    def finish(
        self, record: OpRecord, status: api.TerminalStatus, *, error: str | None = None,
        reason: api.ShutdownReason | None = None,
    ) -> None:
        """End an operation: its terminal `status` (and `error`), no result image unless it succeeded, a
        `shutdown` event when the sandbox stopped for `reason` (instances), the `completion` event, the
        record saved and its live log closed (followers end)."""
        self.transition(record, status, error=error, save=False)
        if status != SUCCESS:
            record.result_image_uuid = None
            record.image_size = None
        record.finished_at = record.finished_at or time.time()
        events = self.open_log(record.uuid)
        if reason is not None:
            events.append("shutdown", api.EventDataShutdown(stopped_at=now_iso(), reason=reason), 0)
        events.append("completion", completion_event(record, status))
        self.save(record)
        self.finish_log(record.uuid)

    # ---- records

    def create(
        self, kind: api.OperationKind, *, image_uuid: str | None, metadata: dict[str, Any]
    ) -> OpRecord:
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
            self._changes.notify()
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
        bounds, bound_args = time_bounds("created_at", since, until)
        clauses += bounds
        args += bound_args
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
            "SELECT record FROM operations WHERE status NOT IN (?, ?, ?)", tuple(api.TERMINAL_STATUSES)
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
            self._changes.notify()
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

    def read_events(self, op_uuid: str) -> list[Event]:
        live = self._live.get(op_uuid)
        if live is not None:
            return list(live.events)
        return read_events(self.log_path(op_uuid), repair=False)

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
                await self._changes.wait()
            if live is not None:
                async for event in live.follow(since=since, spid=spid, follow=True):
                    yield event
                return
        for event in read_events(self.log_path(op_uuid), repair=False):
            if since is not None and event.id <= since:
                continue
            if spid is not None and event.spid != spid:
                continue
            yield event
