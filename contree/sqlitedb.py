"""Opening the engine's and the sync cache's SQLite databases: one way, in autocommit mode (transactions
are explicit `BEGIN`s), shared across threads (callers hold their own lock), write-ahead logged."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Literal


def open_wal(
    path: Path | str,
    schema: str,
    *,
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    busy_timeout: float = 5.0,
) -> sqlite3.Connection:
    """`path` in WAL mode with `schema` applied. `synchronous=NORMAL` in WAL mode costs no fsync per
    commit and stays consistent after power loss (only the newest transactions can be lost);
    `busy_timeout` is how many seconds a statement waits for another connection's lock."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=busy_timeout)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.executescript(schema)
    return db
