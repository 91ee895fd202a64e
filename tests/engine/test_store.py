"""Store: image records, tags, lineage, commits of real overlay upper dirs, recovery, gc, squash."""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from contree.backend import ImageQuery
from contree.engine.cli import check_store_main as check_main
from contree.engine.storage.overlay import is_mountpoint, mount_overlay, unmount
from contree.engine.storage.store import (
    KIND_IMPORTED,
    KIND_INSTANCE,
    ImageConfig,
    ImageRecord,
    LayerTooLarge,
    Store,
)
from contree.errors import BadRequest, NotFound

Mutate = Callable[[Store, ImageRecord, Callable[[Path], object]], Path]


def _simple_image(store: Store, files: dict[str, str], **kwargs: object) -> ImageRecord:
    stage = store.staging_dir()
    for rel, text in files.items():
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        (stage / rel).write_text(text)
    return store.create_image_from_layer_dir(stage, **kwargs)


def _view(store: Store, image: ImageRecord, tmp: Path) -> dict[str, tuple[str, int, str]]:
    """The merged filesystem of `image` as {path: (type, mode, content or link target)}."""
    merged = tmp / f"view-{image.uuid}-{time.monotonic_ns()}"
    merged.mkdir()
    mount_overlay(store.layer_paths(image), None, None, merged)
    out: dict[str, tuple[str, int, str]] = {}
    try:
        for dirpath, dirnames, filenames in os.walk(merged):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                rel = str(p.relative_to(merged))
                if stat.S_ISLNK(st.st_mode):
                    out[rel] = ("l", 0o777, os.readlink(p))
                elif stat.S_ISDIR(st.st_mode):
                    out[rel] = ("d", stat.S_IMODE(st.st_mode), "")
                elif not stat.S_ISREG(st.st_mode):
                    out[rel] = ("c", stat.S_IMODE(st.st_mode), str(st.st_rdev))
                else:
                    out[rel] = ("f", stat.S_IMODE(st.st_mode), p.read_text())
    finally:
        unmount(merged)
    return out


def test_create_get_and_api_shape(store: Store) -> None:
    img = _simple_image(store, {"etc/hello": "hi"}, tag="base:1", config=ImageConfig(env=["A=1"], cwd="/etc"))
    got = store.get(img.uuid)
    assert got == img
    assert got.kind == KIND_IMPORTED and got.parent is None and got.depth == 1
    assert got.size == 2 and got.total_size == 2
    assert got.config.env == ["A=1"] and got.config.cwd == "/etc"
    api_img = got.to_api()
    assert api_img.uuid == img.uuid and api_img.tag == "base:1" and api_img.created_at.endswith("+00:00")
    with pytest.raises(NotFound):
        store.get("00000000-0000-0000-0000-000000000000")


def test_records_survive_reopening(store: Store) -> None:
    img = _simple_image(store, {"f": "x"}, tag="keep")
    store.close()
    again = Store(store.home)
    try:
        assert again.get(img.uuid) == img
        assert again.resolve_tag("keep") == img.uuid
    finally:
        again.close()


def test_tags_are_unique_and_move(store: Store) -> None:
    a = _simple_image(store, {"a": "a"}, tag="t")
    b = _simple_image(store, {"b": "b"})
    assert store.resolve_tag("t") == a.uuid
    assert store.set_tag(b.uuid, "t").tag == "t"
    assert store.get(a.uuid).tag is None
    assert store.resolve_tag("t") == b.uuid
    with pytest.raises(NotFound):
        store.delete_tag(b.uuid, "other")
    store.delete_tag(b.uuid, "t")
    with pytest.raises(NotFound):
        store.resolve_tag("t")
    store.set_tag(a.uuid, "again")
    store.delete_tag(a.uuid)
    assert store.get(a.uuid).tag is None
    with pytest.raises(NotFound):
        store.set_tag("nope", "x")
    with pytest.raises(BadRequest):
        store.set_tag(a.uuid, "has space")


def test_list_filters_and_paging(store: Store) -> None:
    imgs = [_simple_image(store, {"f": str(i)}, tag=(f"app/{i}" if i % 2 else None)) for i in range(6)]
    listed = store.list(ImageQuery(limit=100))
    assert [i.uuid for i in listed] == [i.uuid for i in reversed(imgs)]  # newest first
    assert [i.uuid for i in store.list(ImageQuery(limit=2, offset=1))] == [imgs[4].uuid, imgs[3].uuid]
    assert {i.tag for i in store.list(ImageQuery(tagged=True))} == {"app/1", "app/3", "app/5"}
    assert [i.tag for i in store.list(ImageQuery(tag="app/3"))] == ["app/3"]
    assert [i.uuid for i in store.list(ImageQuery(uuid=imgs[2].uuid[:8]))] == [imgs[2].uuid]
    assert store.list(ImageQuery(since="1h")) and not store.list(ImageQuery(until="1h"))
    assert len(store.list(ImageQuery(kind=KIND_IMPORTED))) == 6
    assert not store.list(ImageQuery(kind=KIND_INSTANCE))
    with pytest.raises(BadRequest):
        store.list(ImageQuery(limit=0))
    with pytest.raises(BadRequest):
        store.list(ImageQuery(since="yesterday-ish"))


def test_empty_upper_means_unchanged(store: Store, mutate: Mutate) -> None:
    base = _simple_image(store, {"f": "x"})
    upper = mutate(store, base, lambda root: (root / "f").read_text())
    assert store.commit_upper(upper, base, "op-1") is None


def test_commit_keeps_deletions_opaque_dirs_renames_and_modes(
    store: Store, mutate: Mutate, tmp_path: Path
) -> None:
    base = _simple_image(store, {"del": "d", "dir1/old": "o", "dir2/b": "b", "dir3/c": "c", "dir3/keep": "k",
                                 "mod": "m"})

    def change(root: Path) -> None:
        (root / "del").unlink()
        shutil.rmtree(root / "dir1")
        (root / "dir1").mkdir()
        (root / "dir1" / "new").write_text("n")
        shutil.move(root / "dir2", root / "dir2renamed")  # EXDEV on a lower dir: copy + delete, like mv
        (root / "mod").chmod(0o600)
        (root / "dir3" / "c").unlink()
        os.symlink("mod", root / "link")

    upper = mutate(store, base, change)
    child = store.commit_upper(upper, base, "op-7")
    assert child is not None
    assert not upper.exists()
    assert child.parent == base.uuid and child.kind == KIND_INSTANCE and child.operation_uuid == "op-7"
    assert child.layers[1:] == base.layers and child.depth == 2
    layer = store.layer_path(child.layers[0])
    whiteout = (layer / "del").lstat()
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert os.getxattr(layer / "dir1", "trusted.overlay.opaque") == b"y"
    for dirpath, dirnames, filenames in os.walk(layer):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            leftovers = [x for x in os.listxattr(name, follow_symlinks=False)
                         if x.startswith("trusted.overlay.") and x != "trusted.overlay.opaque"]
            assert leftovers == [], name

    view = _view(store, child, tmp_path)
    assert "del" not in view and "dir2" not in view and "dir3/c" not in view
    assert view["dir3/keep"] == ("f", 0o644, "k")
    assert {k for k in view if k.startswith("dir1/")} == {"dir1/new"}
    assert view["dir2renamed/b"][2] == "b"
    assert view["mod"] == ("f", 0o600, "m")
    assert view["link"] == ("l", 0o777, "mod")
    assert _view(store, base, tmp_path)["mod"] == ("f", 0o644, "m")  # the parent never changes


def test_branches_see_only_their_own_changes(store: Store, mutate: Mutate, tmp_path: Path) -> None:
    base = _simple_image(store, {"shared": "s"})
    left = store.commit_upper(mutate(store, base, lambda r: (r / "left").write_text("L")), base, None)
    right = store.commit_upper(mutate(store, base, lambda r: (r / "shared").write_text("R")), base, None)
    assert left and right
    assert set(_view(store, left, tmp_path)) == {"shared", "left"}
    assert _view(store, right, tmp_path) == {"shared": ("f", 0o644, "R")}
    assert _view(store, base, tmp_path) == {"shared": ("f", 0o644, "s")}
    assert {c.uuid for c in store.children(base.uuid)} == {left.uuid, right.uuid}
    assert store.parent(left.uuid) == base and store.parent(base.uuid) is None
    grandchild = store.commit_upper(mutate(store, left, lambda r: (r / "g").write_text("g")), left, None)
    assert grandchild is not None
    assert [i.uuid for i in store.lineage(grandchild.uuid)] == [grandchild.uuid, left.uuid, base.uuid]


def test_commit_above_max_layer_bytes_is_refused(store: Store, mutate: Mutate) -> None:
    base = _simple_image(store, {"f": "x"})
    upper = mutate(store, base, lambda r: (r / "big").write_bytes(b"\0" * 10_000))
    with pytest.raises(LayerTooLarge) as info:
        store.commit_upper(upper, base, None, max_layer_bytes=9_999)
    assert info.value.status == 422
    assert upper.exists() and len(store.list()) == 1
    assert store.commit_upper(upper, base, None, max_layer_bytes=10_000) is not None


def test_config_override_and_inheritance(store: Store, mutate: Mutate) -> None:
    base = _simple_image(store, {"f": "x"}, config=ImageConfig(env=["A=1"], cwd="/w", user="1000"))
    child = store.commit_upper(mutate(store, base, lambda r: (r / "g").write_text("g")), base, None)
    assert child and child.config == base.config
    other = store.commit_upper(mutate(store, base, lambda r: (r / "h").write_text("h")), base, None,
                               config_override=ImageConfig(env=["B=2"]))
    assert other and other.config.env == ["B=2"]


def test_shared_layers_and_idempotent_image_uuid(store: Store) -> None:
    stage = store.staging_dir()
    (stage / "f").write_text("x")
    lid = store.add_layer(stage, layer_id="sha256-abc", source="oci(sha256:abc)")
    again = store.staging_dir()
    assert store.add_layer(again, layer_id="sha256-abc", source="oci(sha256:abc)") == lid
    assert not again.exists()
    fixed = "11111111-1111-1111-1111-111111111111"
    img = store.create_image_from_layer_dirs([lid], image_uuid=fixed, tag="x")
    same = store.create_image_from_layer_dirs([lid], image_uuid=img.uuid, tag="y")
    assert same.uuid == img.uuid and same.tag == "y" and len(store.list()) == 1
    with pytest.raises(NotFound):
        store.create_image_from_layer_dirs(["missing-layer"])


def test_recover_removes_half_written_state_and_mounts(store: Store, mutate: Mutate) -> None:
    base = _simple_image(store, {"f": "x"})
    # A crash after the rename into layers/ but before the database row:
    stray = store.staging_dir()
    (stray / "junk").write_text("j")
    store._place_layer(stray, "deadbeef", "run")
    (store.tmp_dir / "half-extracted").mkdir()
    box = store.sandboxes_dir / "crashed"
    (box / "rootfs").mkdir(parents=True)
    mount_overlay(store.layer_paths(base), None, None, box / "rootfs")
    problems = store.check()
    assert any("deadbeef" in p for p in problems)
    assert any("stray mount" in p for p in problems)
    assert any("tmp/" in p for p in problems)
    actions = store.recover()
    assert actions
    assert not is_mountpoint(box / "rootfs") and not box.exists()
    assert not (store.layers_dir / "deadbeef").exists() and not (store.layers_dir / "deadbeef.json").exists()
    assert store.check() == []
    assert (store.layer_path(base.layers[0]) / "f").read_text() == "x"  # lower content untouched


def test_check_finds_missing_layers(store: Store) -> None:
    img = _simple_image(store, {"f": "x"})
    shutil.rmtree(store.layer_path(img.layers[0]))
    assert any("missing" in p for p in store.check())
    assert check_main(["--home", str(store.home)]) == 1


def test_check_main_reports_ok(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    _simple_image(store, {"f": "x"})
    assert check_main(["--home", str(store.home)]) == 0
    assert "ok" in capsys.readouterr().out


def test_gc_deletes_only_unreferenced_unpinned_old_layers(store: Store) -> None:
    img = _simple_image(store, {"f": "x"}, tag="kept")
    untagged = _simple_image(store, {"g": "y"})
    loose = store.add_layer(store.staging_dir(), layer_id="loose", source="oci")
    pinned = store.add_layer(store.staging_dir(), layer_id="pinned", source="oci")
    assert store.gc() == []  # too young
    with store.pinned([pinned]):
        assert store.gc(min_age=0) == [loose]
    assert not store.layer_path(loose).exists()
    assert store.layer_path(img.layers[0]).is_dir() and store.layer_path(untagged.layers[0]).is_dir()
    assert store.gc(min_age=0) == [pinned]
    assert store.check() == []


def test_squash_keeps_uuid_content_and_metadata(store: Store, mutate: Mutate, tmp_path: Path) -> None:
    img = _simple_image(store, {"a": "1"}, tag="deep")
    for i in range(4):
        def step(root: Path, i: int = i) -> None:
            (root / f"f{i}").write_text(str(i))
            (root / "a").write_text(f"a{i}")
            if i == 1:
                os.link(root / "f1", root / "hard")
                os.setxattr(root / "f1", "user.note", b"kept")
                os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
                os.chown(root / "f0", 1234, 5678)
            if i == 2:
                (root / "f0").unlink()
        nxt = store.commit_upper(mutate(store, img, step), img, None)
        assert nxt is not None
        img = nxt
    store.set_tag(img.uuid, "deep")
    child_before = store.commit_upper(mutate(store, img, lambda r: (r / "c").write_text("c")), img, None)
    assert child_before is not None
    before = _view(store, img, tmp_path)
    assert store.squash_if_deep(img, max_depth=10) is None
    squashed = store.squash_if_deep(img, max_depth=3)
    assert squashed is not None
    assert squashed.uuid == img.uuid and squashed.depth == 1 and squashed.tag == "deep"
    assert _view(store, squashed, tmp_path) == before
    layer = store.layer_path(squashed.layers[0])
    assert os.stat(layer / "f1").st_ino == os.stat(layer / "hard").st_ino
    assert os.getxattr(layer / "f1", "user.note") == b"kept"
    assert os.lstat(layer / "null").st_rdev == os.makedev(1, 3)
    assert not (layer / "f0").exists()
    assert store.get(child_before.uuid).layers == child_before.layers  # children keep the old list
    assert store.check() == []


def test_concurrent_commits_and_tags_from_threads(store: Store, mutate: Mutate) -> None:
    base = _simple_image(store, {"f": "x"})
    def writer(i: int) -> Callable[[Path], object]:
        return lambda r: (r / f"t{i}").write_text(str(i))

    uppers = [mutate(store, base, writer(i)) for i in range(8)]
    results: list[ImageRecord | None] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            rec = store.commit_upper(uppers[i], base, None)
            results.append(rec)
            assert rec is not None
            store.set_tag(rec.uuid, "latest")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({r.uuid for r in results if r}) == 8
    assert len(store.list(ImageQuery(tag="latest"))) == 1
    assert store.check() == []


def test_commit_on_an_image_at_the_kernel_limit_squashes_the_parent_first(
    store: Store, mutate: Mutate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contree.engine.storage.store as store_module

    monkeypatch.setattr(store_module, "MAX_LOWERS", 3)
    img = _simple_image(store, {"a": "1"})
    for name in ("f0", "f1"):
        def write(root: Path, n: str = name) -> None:
            (root / n).write_text(n)

        nxt = store.commit_upper(mutate(store, img, write), img, None)
        assert nxt is not None
        img = nxt
    assert img.depth == 3
    child = store.commit_upper(mutate(store, img, lambda r: (r / "last").write_text("x")), img, None)
    assert child is not None and child.depth == 2
    assert store.get(img.uuid).depth == 1
    assert set(_view(store, child, tmp_path)) == {"a", "f0", "f1", "last"}
