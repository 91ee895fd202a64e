"""What keeps a run's commit cheap without giving up consistency: layer metadata lives only in the
database (one transaction with the image), WAL with synchronous=NORMAL, one walk of the upper dir, and
a registered layer whose directory is gone (power loss between rename and row) is reported."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from contree.engine.storage.layertree import clean_and_measure, clean_upper, tree_size
from contree.engine.storage.store import Store


def _image(store: Store) -> str:
    stage = store.staging_dir()
    (stage / "base").write_text("b")
    return store.create_image_from_layer_dir(stage).uuid


def _upper(store: Store, files: dict[str, bytes]) -> Path:
    upper = store.sandboxes_dir / f"box-{len(list(store.sandboxes_dir.iterdir()))}" / "upper"
    upper.mkdir(parents=True)
    for rel, data in files.items():
        (upper / rel).parent.mkdir(parents=True, exist_ok=True)
        (upper / rel).write_bytes(data)
    return upper


def test_commit_writes_no_sidecar_and_records_the_layer_in_the_database(store: Store) -> None:
    parent = store.get(_image(store))
    child = store.commit_upper(_upper(store, {"f": b"12345", "d/g": b"xyz"}), parent, "op-1")
    assert child is not None and child.size == 8 and child.parent == parent.uuid
    assert sorted(p.name for p in store.layers_dir.iterdir()) == sorted(child.layers)
    with store._lock:
        size, source = store._db.execute("SELECT size, source FROM layers WHERE id = ?",
                                         (child.layers[0],)).fetchone()
    assert (size, source) == (8, "run")
    assert store.check() == []
    shutil.rmtree(store.sandboxes_dir / "box-0")  # the emptied sandbox dir, left to the caller
    store.close()
    reopened = Store(store.home)  # the row survives a reopen without any sidecar
    try:
        assert reopened.get(child.uuid).size == 8 and reopened.recover() == [] and reopened.check() == []
    finally:
        reopened.close()


def test_database_is_wal_with_normal_sync(store: Store) -> None:
    with store._lock:
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def test_registered_layer_without_directory_is_reported_by_recover_and_check(store: Store) -> None:
    parent = store.get(_image(store))
    child = store.commit_upper(_upper(store, {"f": b"x"}), parent, None)
    assert child is not None
    shutil.rmtree(store.layer_path(child.layers[0]))  # what a lost rename looks like after power loss
    actions = store.recover()
    assert any(child.layers[0] in a and "missing" in a for a in actions)
    assert any(child.layers[0] in p and "missing" in p for p in store.check())


def test_recover_drops_legacy_sidecars_of_registered_layers(store: Store) -> None:
    img = store.get(_image(store))
    legacy = store.layers_dir / f"{img.layers[0]}.json"
    legacy.write_bytes(b'{"size":1,"created":0.0,"source":"bootstrap"}')
    assert store.recover() == []  # not an action worth reporting
    assert not legacy.exists() and store.layer_path(img.layers[0]).is_dir() and store.check() == []


def test_one_walk_equals_clean_plus_size(tmp_path: Path) -> None:
    def build(root: Path) -> None:
        (root / "d" / "e").mkdir(parents=True)
        (root / "a").write_bytes(b"a" * 100)
        os.link(root / "a", root / "d" / "hard")  # counted once
        (root / "d" / "e" / "b").write_bytes(b"b" * 7)
        os.symlink("a-long-target", root / "link")
        os.mknod(root / "gone", 0o600 | 0o020000, os.makedev(0, 0))
        os.setxattr(root / "d", "trusted.overlay.opaque", b"y")
        os.setxattr(root / "d" / "e", "trusted.overlay.origin", b"junk")
        os.setxattr(root / "a", "trusted.overlay.impure", b"y")
        os.setxattr(root / "d" / "e" / "b", "user.keep", b"v")

    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        root.mkdir()
        build(root)
    size = clean_and_measure(one)
    clean_upper(two)
    assert size == tree_size(two) == 100 + 7 + len("a-long-target")
    for rel in ("d", "d/e", "a", "d/e/b"):
        assert sorted(os.listxattr(one / rel)) == sorted(os.listxattr(two / rel))
    assert os.listxattr(one / "d") == ["trusted.overlay.opaque"] and os.listxattr(one / "a") == []
    assert os.listxattr(one / "d" / "e" / "b") == ["user.keep"]
