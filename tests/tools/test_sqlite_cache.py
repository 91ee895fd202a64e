"""The tools' SQLite caches (lineage edges, operation owners) share SqliteCache: persistence and pruning."""

from __future__ import annotations

from pathlib import Path

from tools.stores.lineage import EdgeStore
from tools.stores.owners import OperationOwners


def test_edges_survive_reopen_and_prune_by_last_use(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "lineage.db"
    store = EdgeStore(path)
    store.record("p", "child", "parent", operation_id="op1", kind="instance")
    store.close()
    store = EdgeStore(path)
    row = store.row("p", "child")
    assert row is not None and row.created_at is not None and row.created_at.endswith("+00:00")
    assert (row.parent_image, row.operation_id, row.kind, row.command) == ("parent", "op1", "instance", None)
    assert store.children("p", "parent") == ["child"] and store.children("q", "parent") == []
    store.prune(1)
    assert store.row("p", "child") is not None
    store.prune(-1)  # everything is older than "one day in the future"
    assert store.row("p", "child") is None
    store.close()


def test_owners_first_writer_wins_and_prune(tmp_path: Path) -> None:
    owners = OperationOwners(tmp_path / "operations.db", scoped=True)
    owners.record("alice", "op1")
    owners.record("bob", "op1")
    assert owners.visible("alice", "op1") and not owners.visible("bob", "op1")
    assert owners.owned("alice") == {"op1"} and owners.owned(None) == set()
    owners.prune(1)
    assert owners.owned("alice") == {"op1"}
    owners.prune(-1)
    assert owners.owned("alice") == set() and not owners.visible("alice", "op1")
    owners.close()
    assert OperationOwners(None).visible("anyone", "op1")  # unscoped: everything is visible
