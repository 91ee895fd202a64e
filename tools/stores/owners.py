"""Which principal started which operation (COMPAT §15 item 10).

When the HTTP server answers several bearer tokens (one principal each), the operation tools and resources
show a principal only the operations it started through this server; anything else reads as not found, so
ids of others cannot even be confirmed to exist. With one principal (stdio, a single token) nothing is
scoped: the backend account's operations, including those started elsewhere, stay visible.
The map lives in SQLite beside the other caches so it survives restarts.
"""

from __future__ import annotations

import time
from pathlib import Path

from contree.errors import NotFound
from tools.stores.sqlite_cache import SqliteCache


class OperationOwners:
    def __init__(self, path: Path | None = None, *, scoped: bool = False) -> None:
        self.scoped = scoped
        self._sql = SqliteCache(
            path,
            [
                "CREATE TABLE IF NOT EXISTS operation_owner (operation_id TEXT PRIMARY KEY,"
                " principal TEXT NOT NULL, created_at REAL NOT NULL)",
                "CREATE INDEX IF NOT EXISTS operation_owner_principal ON operation_owner (principal)",
            ],
        )

    def record(self, principal: str | None, operation_id: str) -> None:
        if not self.scoped:
            return
        # first writer wins: an id is never handed over to another principal
        self._sql.write(
            "INSERT OR IGNORE INTO operation_owner VALUES (?,?,?)",
            (operation_id, principal or "", time.time()),
        )

    def visible(self, principal: str | None, operation_id: str) -> bool:
        if not self.scoped:
            return True
        row = self._sql.one("SELECT principal FROM operation_owner WHERE operation_id=?", (operation_id,))
        return row is not None and row[0] == (principal or "")

    def require(self, principal: str | None, operation_id: str) -> None:
        """Raise the backend's own not-found error for an operation this principal may not see."""
        if not self.visible(principal, operation_id):
            raise NotFound(f"operation {operation_id} not found")

    def owned(self, principal: str | None) -> set[str]:
        rows = self._sql.all("SELECT operation_id FROM operation_owner WHERE principal=?", (principal or "",))
        return {r[0] for r in rows}

    def prune(self, older_than_days: float) -> None:
        self._sql.delete_older("operation_owner", "created_at", older_than_days)

    def close(self) -> None:
        self._sql.close()
