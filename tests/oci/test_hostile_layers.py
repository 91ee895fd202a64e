"""Hostile layers served by a real registry: whatever they try, nothing is written outside the store and
nothing is half-stored."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from contree import api
from contree.engine.storage.store import Store
from contree.errors import Unprocessable
from contree.oci.extract import ExtractLimits, LayerTooLarge, UnsafeLayer
from contree.oci.importer import ImportOptions, import_image
from tests.oci import harness
from tests.oci.conftest import store_is_empty
from tests.oci.harness import Entry, Registry


def request(url: str) -> api.ImageImportRequest:
    return api.ImageImportRequest(registry=api.ImageRegistry(url=url))


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the store that hostile layers aim at; it must stay empty."""
    path = tmp_path / "outside"
    path.mkdir()
    return path


def hostile_layers(outside: Path) -> dict[str, list[Entry]]:
    # The store stages layers at <tmp_path>/home/tmp/import-*/layer-N: four `..` reach tmp_path.
    up = "../../../../outside"
    return {
        "dotdot": [Entry(f"{up}/pwned", data=b"x")],
        "dotdot-inside": [Entry("etc", "dir"), Entry("etc/../../outside/pwned", data=b"x")],
        "symlink-parent-absolute": [
            Entry("esc", "symlink", link=str(outside)),
            Entry("esc/pwned", data=b"x"),
        ],
        "symlink-parent-relative": [Entry("esc", "symlink", link=up), Entry("esc/pwned", data=b"x")],
        "symlink-dir-then-file": [
            Entry("a", "dir"),
            Entry("a/b", "symlink", link=str(outside)),
            Entry("a/b/c/pwned", data=b"x"),
        ],
        "hardlink-absolute": [Entry("stolen", "hardlink", link=str(outside / "target"))],
        "hardlink-dotdot": [Entry("stolen", "hardlink", link=f"{up}/target")],
        "hardlink-missing": [Entry("stolen", "hardlink", link="etc/shadow")],
        "hardlink-through-symlink": [
            Entry("esc", "symlink", link=str(outside)),
            Entry("stolen", "hardlink", link="esc/target"),
        ],
        "whiteout-through-symlink": [Entry("esc", "symlink", link=str(outside)), Entry("esc/.wh.target")],
    }


@pytest.mark.parametrize(
    "case",
    list(hostile_layers(Path("/x")).keys()),
)
async def test_hostile_layer_is_rejected_and_nothing_escapes(
    case: str, store: Store, open_registry: Registry, outside: Path
) -> None:
    target = outside / "target"
    target.write_bytes(b"keep me")
    before = sorted(os.listdir(outside))
    layers = hostile_layers(outside)[case]
    image = harness.build_image([[Entry("ok.txt", data=b"fine")], layers])
    repo = f"hostile/{case}"
    harness.push_image(open_registry.host, repo, "v1", image)
    with pytest.raises(UnsafeLayer):
        await import_image(store, request(f"{open_registry.host}/{repo}:v1"))
    assert sorted(os.listdir(outside)) == before
    assert target.read_bytes() == b"keep me" and os.stat(target).st_nlink == 1
    assert store_is_empty(store)


async def test_device_nodes_are_dropped(store: Store, open_registry: Registry) -> None:
    layer = [
        Entry("dev", "dir"),
        Entry("dev/mem", "chardev", devmajor=1, devminor=1),
        Entry("dev/sda", "blockdev", devmajor=8, devminor=0),
        Entry("dev/fake-whiteout", "chardev", devmajor=0, devminor=0),
        Entry("keep.txt", data=b"k"),
    ]
    image = harness.build_image([layer])
    harness.push_image(open_registry.host, "hostile/devices", "v1", image)
    rec = await import_image(store, request(f"{open_registry.host}/hostile/devices:v1"))
    (root,) = store.layer_paths(rec)
    assert os.listdir(root / "dev") == []
    assert (root / "keep.txt").read_bytes() == b"k"


async def test_forbidden_xattrs_are_dropped(store: Store, open_registry: Registry) -> None:
    layer = [
        Entry("d", "dir", xattrs={"trusted.overlay.redirect": "/etc", "user.ok": "1"}),
        Entry("d/f", data=b"f", xattrs={"trusted.overlay.metacopy": "", "security.selinux": "x"}),
    ]
    image = harness.build_image([layer])
    harness.push_image(open_registry.host, "hostile/xattrs", "v1", image)
    rec = await import_image(store, request(f"{open_registry.host}/hostile/xattrs:v1"))
    (root,) = store.layer_paths(rec)
    assert os.listxattr(root / "d") == ["user.ok"]
    assert not [x for x in os.listxattr(root / "d/f") if x.startswith(("trusted.", "security.selinux"))]


async def test_tar_bomb_by_size(store: Store, open_registry: Registry) -> None:
    # 64 MiB of zeros compress to ~64 KiB; the cap is 8 MiB.
    image = harness.build_image([[Entry("zeros", data=bytes(64 * 1024 * 1024))]])
    assert len(image.blobs[image.layer_digests[0]]) < 1024 * 1024
    harness.push_image(open_registry.host, "hostile/bomb", "v1", image)
    opts = ImportOptions(limits=ExtractLimits(max_bytes=8 * 1024 * 1024))
    with pytest.raises(LayerTooLarge, match="more than"):
        await import_image(store, request(f"{open_registry.host}/hostile/bomb:v1"), options=opts)
    assert store_is_empty(store)


async def test_tar_bomb_by_entry_count(store: Store, open_registry: Registry) -> None:
    image = harness.build_image([[Entry(f"f{i}") for i in range(500)]])
    harness.push_image(open_registry.host, "hostile/many", "v1", image)
    opts = ImportOptions(limits=ExtractLimits(max_entries=100))
    with pytest.raises(LayerTooLarge, match="more than 100 entries"):
        await import_image(store, request(f"{open_registry.host}/hostile/many:v1"), options=opts)
    assert store_is_empty(store)


async def test_diff_id_mismatch_is_refused(store: Store, open_registry: Registry) -> None:
    image = harness.build_image([[Entry("a", data=b"a")]])
    cfg = harness.json.loads(image.config)
    cfg["rootfs"]["diff_ids"] = ["sha256:" + "0" * 64]
    cfg_bytes = harness.json.dumps(cfg).encode()
    manifest = harness.json.loads(image.manifest)
    manifest["config"]["digest"], manifest["config"]["size"] = harness.sha(cfg_bytes), len(cfg_bytes)
    harness.push_blob(open_registry.host, "hostile/diffid", cfg_bytes)
    harness.push_blob(open_registry.host, "hostile/diffid", image.blobs[image.layer_digests[0]])
    harness.push_manifest(open_registry.host, "hostile/diffid", "v1", harness.json.dumps(manifest).encode())
    with pytest.raises(Unprocessable, match="image config says"):
        await import_image(store, request(f"{open_registry.host}/hostile/diffid:v1"))
    assert store_is_empty(store)


async def test_replacing_entries_within_a_layer(store: Store, open_registry: Registry) -> None:
    """Later entries win: a dir replaced by a file, a file by a symlink (never followed)."""
    layer = [
        Entry("x", "dir"),
        Entry("x/inner", data=b"1"),
        Entry("x", data=b"now a file"),
        Entry("y", data=b"file"),
        Entry("y", "symlink", link="/etc/passwd"),
        Entry("ro", "dir", mode=0o555),
        Entry("ro/child", data=b"c"),
    ]
    image = harness.build_image([layer])
    harness.push_image(open_registry.host, "hostile/replace", "v1", image)
    rec = await import_image(store, request(f"{open_registry.host}/hostile/replace:v1"))
    (root,) = store.layer_paths(rec)
    assert (root / "x").read_bytes() == b"now a file"
    assert os.readlink(root / "y") == "/etc/passwd"
    assert stat.S_IMODE(os.lstat(root / "ro").st_mode) == 0o555 and (root / "ro/child").read_bytes() == b"c"
