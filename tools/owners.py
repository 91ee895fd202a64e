"""Which principal started which operation (COMPAT §15 item 10).

When the HTTP server answers several bearer tokens (one principal each), the operation tools and resources
show a principal only the operations it started through this server; anything else reads as not found, so
ids of others cannot even be confirmed to exist. With one principal (stdio, a single token) nothing is
scoped: the backend account's operations, including those started elsewhere, stay visible.
The map lives in SQLite beside the other caches so it survives restarts.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from contree.errors import NotFound


class OperationOwners:
    def __init__(self, path: Path | None = None, *, scoped: bool = False) -> None:
        self.scoped = scoped
        target = str(path) if path else ":memory:"
        if target != ":memory:":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(target, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS operation_owner (operation_id TEXT PRIMARY KEY,"
                " principal TEXT NOT NULL, created_at REAL NOT NULL)"
            )
            self._db.execute(
                "CREATE INDEX IF NOT EXISTS operation_owner_principal ON operation_owner (principal)"
            )
            self._db.commit()

    def record(self, principal: str | None, operation_id: str) -> None:
        if not self.scoped:
            return
        with self._lock:
            # first writer wins: an id is never handed over to another principal
            self._db.execute(
                "INSERT OR IGNORE INTO operation_owner VALUES (?,?,?)",
                (operation_id, principal or "", time.time()),
            )
            self._db.commit()

    def visible(self, principal: str | None, operation_id: str) -> bool:
        if not self.scoped:
            return True
        with self._lock:
            row = self._db.execute(
                "SELECT principal FROM operation_owner WHERE operation_id=?", (operation_id,)
            ).fetchone()
        return row is not None and row[0] == (principal or "")

    def require(self, principal: str | None, operation_id: str) -> None:
        """Raise the backend's own not-found error for an operation this principal may not see."""
        if not self.visible(principal, operation_id):
            raise NotFound(f"operation {operation_id} not found")

    def owned(self, principal: str | None) -> set[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT operation_id FROM operation_owner WHERE principal=?", (principal or "",)
            ).fetchall()
        return {r[0] for r in rows}

    def prune(self, older_than_days: float) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM operation_owner WHERE created_at < ?", (time.time() - older_than_days * 86400,)
            )
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()
