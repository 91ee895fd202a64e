"""One SQLite connection for a tools-side cache (lineage edges, operation owners): tools reach it from
worker threads (`asyncio.to_thread`), so every statement runs under one lock."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


class SqliteCache:
    def __init__(self, path: Path | None, schema: Iterable[str]) -> None:
        """`path=None` keeps the cache in memory; `schema` holds idempotent `CREATE … IF NOT EXISTS`."""
        target = str(path) if path else ":memory:"
        if target != ":memory:":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        # Several server processes of one home share these files: wait for a writer instead of failing.
        self._db = sqlite3.connect(target, check_same_thread=False, timeout=10)
        self._lock = threading.Lock()
        with self._lock:
            for statement in schema:
                self._db.execute(statement)
            self._db.commit()

    def write(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self._lock:
            self._db.execute(sql, params)
            self._db.commit()

    def write_many(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """Several statements in one transaction: other processes see all of them or none."""
        with self._lock:
            try:
                for sql, params in statements:
                    self._db.execute(sql, params)
                self._db.commit()
            except BaseException:
                self._db.rollback()
                raise

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        with self._lock:
            row: tuple[Any, ...] | None = self._db.execute(sql, params).fetchone()
            return row

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def delete_older(self, table: str, column: str, older_than_days: float) -> None:
        """Rows whose `column` (a time.time() stamp) is older than the given age go."""
        self.write(f"DELETE FROM {table} WHERE {column} < ?", (time.time() - older_than_days * 86400,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
