"""The Tasks extension (`io.modelcontextprotocol/tasks`, 2026-07-28): task records and their state machine.

Sans-IO: records, the transition table and the wire shapes. The shell runs the work; it reports progress,
input requests and the outcome here, and `tasks/get`/`tasks/update`/`tasks/cancel` read and change the
records. Ids are HMAC-derived from a per-server secret (unguessable, no I/O); each record belongs to the
principal whose request created it, and another principal cannot see it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec

from protocol.errors import InvalidParams, McpError
from protocol.messages import InputRequest

EXTENSION = "io.modelcontextprotocol/tasks"
WORKING = "working"
INPUT_REQUIRED = "input_required"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})
# Every legal move (h11-style: one table, anything else is a bug and raises).
TRANSITIONS: dict[str, frozenset[str]] = {
    WORKING: frozenset({INPUT_REQUIRED, COMPLETED, FAILED, CANCELLED}),
    INPUT_REQUIRED: frozenset({WORKING, INPUT_REQUIRED, COMPLETED, FAILED, CANCELLED}),
    COMPLETED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}
RETENTION_MS = 3_600_000  # a finished task stays readable this long after it ends
POLL_INTERVAL_MS = 1000
MAX_TASKS = 4096  # per server; the oldest finished ones go first


class TaskError(McpError):
    """An illegal status move (a bug in the caller, not the client's doing)."""


class TaskRecord(msgspec.Struct):
    task_id: str
    principal: str | None
    created: float
    updated: float
    status: str = WORKING
    status_message: str | None = None
    ttl_ms: int = RETENTION_MS
    poll_interval_ms: int = POLL_INTERVAL_MS
    # Keys asked for and not answered yet; every key ever used (keys are unique over a task's life).
    pending: dict[str, InputRequest] = msgspec.field(default_factory=dict)
    used_keys: set[str] = msgspec.field(default_factory=set)
    result: msgspec.Raw | None = None  # the encoded result the request would have returned
    error: dict[str, Any] | None = None


class _Task(msgspec.Struct, rename="camel", omit_defaults=True):
    task_id: str
    status: str
    created_at: str
    last_updated_at: str
    ttl_ms: int | None
    poll_interval_ms: int | None = None
    status_message: str | None = None
    input_requests: dict[str, InputRequest] | None = None
    result: msgspec.Raw | None = None
    error: dict[str, Any] | None = None


class TaskStore:
    def __init__(self, secret: bytes, clock: Callable[[], float], *, limit: int = MAX_TASKS) -> None:
        self._secret = secret
        self._clock = clock
        self._limit = limit
        self._serial = 0
        self.records: dict[str, TaskRecord] = {}

    # ------------------------------------------------------------ lifecycle

    def create(self, principal: str | None, status_message: str | None = None) -> TaskRecord | None:
        """A new working task, or None when the store is full of unfinished work."""
        now = self._clock()
        self._purge(now)
        if len(self.records) >= self._limit and not self._evict():
            return None
        self._serial += 1
        digest = hmac.new(self._secret, b"task:%d" % self._serial, hashlib.sha256).hexdigest()
        task_id = f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"
        record = TaskRecord(task_id, principal, now, now, status_message=status_message)
        self.records[task_id] = record
        return record

    def get(self, task_id: str, principal: str | None) -> TaskRecord:
        """The caller's task, or -32602 (unknown, expired, or another principal's)."""
        self._purge(self._clock())
        record = self.records.get(task_id)
        if record is None or record.principal != principal:
            raise InvalidParams(f"Failed to retrieve task: Task not found: {task_id[:80]}")
        return record

    def move(self, record: TaskRecord, status: str) -> None:
        if status not in TRANSITIONS[record.status]:
            raise TaskError(f"task {record.task_id}: {record.status} → {status} is not a legal move")
        record.status = status
        record.updated = self._clock()
        if status in TERMINAL:
            record.pending.clear()
            # Retention counts from the end: ttlMs (from creation) grows by the time the task ran.
            record.ttl_ms = int((record.updated - record.created) * 1000) + RETENTION_MS

    def note(self, record: TaskRecord, message: str) -> None:
        """A progress message becomes the statusMessage (progress notifications do not exist for tasks)."""
        if record.status not in TERMINAL:
            record.status_message = message[:1000]
            record.updated = self._clock()

    def complete(self, record: TaskRecord, result: bytes) -> None:
        if record.status in TERMINAL:
            return  # a cancel won the race: the work's late outcome is dropped
        record.result = msgspec.Raw(result)
        self.move(record, COMPLETED)

    def fail(self, record: TaskRecord, error: dict[str, Any], message: str) -> None:
        if record.status in TERMINAL:
            return
        record.error = error
        record.status_message = message[:1000]
        self.move(record, FAILED)

    def cancel(self, record: TaskRecord) -> bool:
        """True if this stopped a running task (a finished one stays as it is: cancel is idempotent)."""
        if record.status in TERMINAL:
            return False
        record.status_message = "Cancelled by the client"
        self.move(record, CANCELLED)
        return True

    # ------------------------------------------------------------ input requests

    def park(self, record: TaskRecord, requests: dict[str, InputRequest]) -> dict[str, str]:
        """Mark the task input_required with `requests`; returns caller key → wire key (wire keys are never
        reused within a task, as the extension requires)."""
        keys: dict[str, str] = {}
        for key, request in requests.items():
            wire = key
            n = 1
            while wire in record.used_keys:
                n += 1
                wire = f"{key}-{n}"
            record.used_keys.add(wire)
            record.pending[wire] = request
            keys[key] = wire
        self.move(record, INPUT_REQUIRED)
        return keys

    def provide(self, record: TaskRecord, answers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The answers to keys still outstanding (others are ignored); back to working once none is left."""
        accepted = {k: v for k, v in answers.items() if k in record.pending}
        for key in accepted:
            del record.pending[key]
        if accepted and not record.pending and record.status == INPUT_REQUIRED:
            self.move(record, WORKING)
        elif accepted:
            record.updated = self._clock()
        return accepted

    # ------------------------------------------------------------ wire shapes

    def encode(self, record: TaskRecord, *, detailed: bool) -> bytes:
        """The Task fields (CreateTaskResult when not `detailed`; DetailedTask for tasks/get)."""
        task = _Task(
            task_id=record.task_id,
            status=record.status,
            created_at=_iso(record.created),
            last_updated_at=_iso(record.updated),
            ttl_ms=record.ttl_ms,
            poll_interval_ms=record.poll_interval_ms,
            status_message=record.status_message,
        )
        if detailed:
            if record.status == INPUT_REQUIRED:
                task.input_requests = dict(record.pending)
            elif record.status == COMPLETED:
                task.result = record.result
            elif record.status == FAILED:
                task.error = record.error
        return msgspec.json.encode(task)

    # ------------------------------------------------------------ housekeeping

    def _purge(self, now: float) -> None:
        expired = [
            t
            for t, r in self.records.items()
            if r.status in TERMINAL and now * 1000 > r.created * 1000 + r.ttl_ms
        ]
        for task_id in expired:
            del self.records[task_id]

    def _evict(self) -> bool:
        finished = [r for r in self.records.values() if r.status in TERMINAL]
        if not finished:
            return False
        oldest = min(finished, key=lambda r: r.updated)
        del self.records[oldest.task_id]
        return True


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
