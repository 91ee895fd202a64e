"""Local sources written by skopeo (a tool we did not write): oci-archive, docker-archive, OCI layout dirs."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from pathlib import Path

import pytest

from contree import api
from contree.engine.storage.store import Store
from contree.errors import BadRequest, Forbidden, NotFound
from contree.oci.importer import ImportCancelled, ImportOptions, ImportProgress, import_image
from contree.oci.registry import BlobDigestMismatch
from tests.oci import harness, images
from tests.oci.conftest import store_is_empty
from tests.oci.harness import Registry


def request(url: str, tag: str | None = None) -> api.ImageImportRequest:
    return api.ImageImportRequest(registry=api.ImageRegistry(url=url), tag=tag)


def skopeo_copy(src: str, dest: str) -> None:
    skopeo = harness.require("skopeo", "skopeo")
    subprocess.run(
        [skopeo, "--insecure-policy", "copy", "-q", "--src-tls-verify=false", src, dest],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def pushed(open_registry: Registry) -> str:
    harness.push_image(open_registry.host, "local/multi", "v1", images.multi_layer())
    return f"docker://{open_registry.host}/local/multi:v1"


@pytest.fixture(scope="module")
def pushed_gzip(open_registry: Registry) -> str:
    # Docker archives cannot carry zstd layers.
    harness.push_image(
        open_registry.host, "local/multigz", "v1", images.multi_layer(("gzip", "gzip", "none"))
    )
    return f"docker://{open_registry.host}/local/multigz:v1"


def check_multi(store: Store, rec) -> None:
    layers = store.layer_paths(rec)
    assert len(layers) == 3
    top, changes, base = layers
    assert (top / "srv/app/hello.txt").read_bytes() == b"hello world\n"
    vi = os.lstat(changes / "bin/vi")
    assert stat.S_ISCHR(vi.st_mode) and vi.st_rdev == 0
    assert os.getxattr(changes / "opt/app", "trusted.overlay.opaque") == b"y"
    assert os.lstat(base / "home/user").st_uid == 1000
    assert rec.config.cwd == "/srv/app"
    assert "GREETING=hello from the image" in rec.config.env


async def test_oci_archive(store: Store, pushed: str, tmp_path: Path) -> None:
    archive = tmp_path / "multi.oci.tar"
    skopeo_copy(pushed, f"oci-archive:{archive}:multi:v1")
    rec = await import_image(store, request(f"oci-archive:{archive}", tag="from-oci-archive"))
    check_multi(store, rec)
    again = await import_image(store, request(f"oci-archive:{archive}:multi:v1"))
    assert again.uuid == rec.uuid


async def test_docker_archive(store: Store, pushed_gzip: str, tmp_path: Path) -> None:
    archive = tmp_path / "multi.docker.tar"
    skopeo_copy(pushed_gzip, f"docker-archive:{archive}:example/multi:v1")
    rec = await import_image(store, request(f"docker-archive:{archive}"))
    check_multi(store, rec)
    named = await import_image(store, request(f"docker-archive:{archive}:example/multi:v1"))
    assert named.uuid == rec.uuid
    with pytest.raises(NotFound, match="no image tagged"):
        await import_image(store, request(f"docker-archive:{archive}:example/other:v2"))


async def test_oci_layout_directory(store: Store, pushed: str, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    skopeo_copy(pushed, f"oci:{layout}:v1")
    rec = await import_image(store, request(f"oci:{layout}:v1"))
    check_multi(store, rec)


async def test_tampered_layout_blob_stores_nothing(store: Store, pushed: str, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    skopeo_copy(pushed, f"oci:{layout}:v1")
    blobs = sorted((layout / "blobs/sha256").iterdir(), key=lambda p: p.stat().st_size)
    biggest = blobs[-1]
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    with pytest.raises(BlobDigestMismatch):
        await import_image(store, request(f"oci:{layout}:v1"))
    assert store_is_empty(store)


async def test_missing_archive_is_not_found(store: Store, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        await import_image(store, request(f"oci-archive:{tmp_path / 'nope.tar'}"))
    assert store_is_empty(store)


async def test_local_roots_confine_local_sources(store: Store, pushed: str, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    archive = allowed / "img.tar"
    skopeo_copy(pushed, f"oci-archive:{archive}")
    outside = tmp_path / "outside.tar"
    outside.write_bytes(archive.read_bytes())
    (allowed / "link.tar").symlink_to(outside)
    opts = ImportOptions(local_roots=(str(allowed),))
    rec = await import_image(store, request(f"oci-archive:{archive}"), options=opts)
    check_multi(store, rec)
    with pytest.raises(Forbidden, match="outside the directories allowed"):
        await import_image(store, request(f"oci-archive:{allowed / 'link.tar'}"), options=opts)
    with pytest.raises(Forbidden):
        await import_image(store, request(f"oci-archive:{allowed}/../outside.tar"), options=opts)
    with pytest.raises(Forbidden):
        await import_image(store, request("docker-archive:/etc/passwd"), options=opts)
    with pytest.raises(BadRequest, match="absolute path"):
        await import_image(store, request("oci-archive:relative.tar"))


async def test_cancelled_local_import_stores_nothing(
    store: Store, open_registry: Registry, tmp_path: Path
) -> None:
    big = [[harness.Entry(f"f{i}.bin", data=os.urandom(2_000_000)) for i in range(4)] for _ in range(3)]
    harness.push_image(open_registry.host, "local/big", "v1", harness.build_image(big, compression="none"))
    layout = tmp_path / "big"
    skopeo_copy(f"docker://{open_registry.host}/local/big:v1", f"oci:{layout}:v1")
    cancel = asyncio.Event()
    seen: list[ImportProgress] = []

    def on_progress(p: ImportProgress) -> None:
        seen.append(p)
        if p.bytes_done > 0:
            cancel.set()

    with pytest.raises(ImportCancelled):
        await import_image(store, request(f"oci:{layout}:v1"), progress=on_progress, cancel_event=cancel)
    assert store_is_empty(store)
    assert any(p.bytes_done > 0 for p in seen)  # progress from the copy threads reached the loop
