"""Imports from a real docker-registry on 127.0.0.1: layout on disk, config, idempotence, auth flows,
multi-platform indexes, corrupted blobs and cancellation."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from contree import api
from contree.engine.storage.store import KIND_IMPORTED, Store
from contree.errors import NotFound, Unauthorized
from contree.oci.auth import Credentials
from contree.oci.importer import ImportCancelled, ImportOptions, ImportProgress, image_uuid_for, import_image
from contree.oci.manifest import Platform
from contree.oci.registry import BlobDigestMismatch
from tests.oci import harness, images
from tests.oci.conftest import PASSWORD, USER, store_is_empty
from tests.oci.harness import Registry, TokenService


def request(url: str, tag: str | None = None, creds: tuple[str, str] | None = None) -> api.ImageImportRequest:
    credentials = api.RegistryCredentials(username=creds[0], password=creds[1]) if creds else None
    return api.ImageImportRequest(registry=api.ImageRegistry(url=url, credentials=credentials), tag=tag)


@pytest.fixture(scope="module")
def multi(open_registry: Registry) -> harness.BuiltImage:
    image = images.multi_layer()
    harness.push_image(open_registry.host, "test/multi", "v1", image)
    return image


def lstat(layer: Path, rel: str) -> os.stat_result:
    return os.lstat(layer / rel)


async def test_multi_layer_image_lands_as_overlay_layers(
    store: Store, open_registry: Registry, multi
) -> None:
    events: list[ImportProgress] = []
    rec = await import_image(
        store, request(f"docker://{open_registry.host}/test/multi:v1", tag="multi:v1"), progress=events.append
    )
    assert rec.uuid == image_uuid_for(multi.manifest_digest)
    assert rec.tag == "multi:v1" and rec.kind == KIND_IMPORTED
    top, changes, base = store.layer_paths(rec)
    assert [p.name for p in (base, changes, top)] == [d.replace(":", "-") for d in multi.diff_ids]
    # base layer: owners, modes, mtimes, links, fifo, xattrs
    home = lstat(base, "home/user")
    assert (home.st_uid, home.st_gid, stat.S_IMODE(home.st_mode)) == (1000, 1000, 0o700)
    notes = lstat(base, "home/user/notes")
    assert notes.st_mtime == 1_600_000_000 and stat.S_IMODE(notes.st_mode) == 0o600
    assert stat.S_IMODE(lstat(base, "usr/bin/su").st_mode) == 0o4755
    assert os.readlink(base / "etc/alt") == "/etc/passwd"
    assert lstat(base, "bin/view").st_ino == lstat(base, "bin/vi").st_ino
    assert stat.S_ISFIFO(lstat(base, "run/fifo").st_mode)
    assert os.getxattr(base / "etc/passwd", "user.origin") == b"base-layer"
    # second layer: whiteout and opaque dir in overlay form
    vi = lstat(changes, "bin/vi")
    assert stat.S_ISCHR(vi.st_mode) and vi.st_rdev == os.makedev(0, 0)
    assert os.getxattr(changes / "opt/app", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(changes / "opt/app")) == ["new.txt"]
    assert (top / "srv/app/hello.txt").read_bytes() == b"hello world\n"
    # image config kept as run defaults
    assert rec.config.env == images.IMAGE_CONFIG["Env"]
    assert rec.config.cwd == "/srv/app" and rec.config.user == "1000:1000"
    assert rec.config.entrypoint == ["/bin/sh", "-c"] and rec.config.cmd == ["echo ready"]
    assert rec.config.labels == {"org.example.test": "yes"}
    # progress went through the phases and counted every compressed byte
    assert events[0].phase == "resolving" and events[-1].phase == "done"
    assert max(e.bytes_done for e in events) == sum(len(multi.blobs[d]) for d in multi.layer_digests)
    assert not os.listdir(store.tmp_dir)


async def test_reimport_downloads_nothing_and_returns_same_uuid(
    store: Store, open_registry: Registry, multi
) -> None:
    url = f"{open_registry.host}/test/multi:v1"
    first = await import_image(store, request(url))
    # Remove the blobs from the registry: a second import must not need them.
    saved = {d: harness.Registry.blob_path(open_registry, d).read_bytes() for d in multi.layer_digests}
    for d in saved:
        open_registry.blob_path(d).write_bytes(b"gone")
    try:
        events: list[ImportProgress] = []
        again = await import_image(store, request(url, tag="again"), progress=events.append)
    finally:
        for d, data in saved.items():
            open_registry.blob_path(d).write_bytes(data)
    assert again.uuid == first.uuid and again.tag == "again"
    assert events[-1].layers_cached == 3 and all(e.bytes_done == 0 for e in events)
    assert len(store.list_images()) == 1


async def test_shared_layers_are_not_fetched_twice(store: Store, open_registry: Registry, multi) -> None:
    await import_image(store, request(f"{open_registry.host}/test/multi:v1"))
    derived = harness.build_image(
        [harness.layer_tar([harness.Entry("extra.txt", data=b"x")])], config={"Env": ["A=1"]}
    )
    # Same three base layers + one more: only the new one is fetched.
    manifest = harness.json.loads(multi.manifest)
    manifest["layers"].append(harness.json.loads(derived.manifest)["layers"][0])
    cfg = harness.json.loads(multi.config)
    cfg["rootfs"]["diff_ids"].append(derived.diff_ids[0])
    cfg_bytes = harness.json.dumps(cfg).encode()
    manifest["config"] = {
        "mediaType": harness.OCI_CONFIG,
        "digest": harness.sha(cfg_bytes),
        "size": len(cfg_bytes),
    }
    harness.push_blob(open_registry.host, "test/derived", cfg_bytes)
    for blob in [*multi.blobs.values(), *derived.blobs.values()]:
        harness.push_blob(open_registry.host, "test/derived", blob)
    harness.push_manifest(open_registry.host, "test/derived", "v1", harness.json.dumps(manifest).encode())
    events: list[ImportProgress] = []
    rec = await import_image(store, request(f"{open_registry.host}/test/derived:v1"), progress=events.append)
    assert len(rec.layers) == 4
    assert events[-1].layers_cached == 3
    assert max(e.bytes_total for e in events) == len(derived.blobs[derived.layer_digests[0]])


async def test_unknown_tag_is_not_found(store: Store, open_registry: Registry, multi) -> None:
    with pytest.raises(NotFound, match="not found"):
        await import_image(store, request(f"{open_registry.host}/test/multi:nope"))
    assert store_is_empty(store)


async def test_basic_auth_with_right_password(store: Store, basic_registry: Registry, multi) -> None:
    rec = await import_image(store, request(f"{basic_registry.host}/test/multi:v1", creds=(USER, PASSWORD)))
    assert rec.uuid == image_uuid_for(multi.manifest_digest)


async def test_basic_auth_wrong_password_is_a_clear_error(
    store: Store, basic_registry: Registry, multi
) -> None:
    with pytest.raises(Unauthorized, match="credentials rejected"):
        await import_image(store, request(f"{basic_registry.host}/test/multi:v1", creds=(USER, "wrong")))
    with pytest.raises(Unauthorized, match="requires credentials"):
        await import_image(store, request(f"{basic_registry.host}/test/multi:v1"))
    assert store_is_empty(store)


async def test_token_auth_with_credentials(
    store: Store, token_registry: Registry, token_service: TokenService, multi
) -> None:
    rec = await import_image(
        store,
        request(f"docker://{token_registry.host}/test/multi:v1"),
        credentials=Credentials(username=USER, password=PASSWORD),
    )
    assert rec.uuid == image_uuid_for(multi.manifest_digest)
    asked = token_service.requests()
    assert {"user": USER, "scope": ["repository:test/multi:pull"], "status": 200} in asked
    # one token for the whole import (cached per scope)
    assert sum(1 for r in asked if r["status"] == 200) == 1


async def test_token_auth_wrong_password(store: Store, token_registry: Registry, multi) -> None:
    with pytest.raises(Unauthorized, match="token service"):
        await import_image(store, request(f"{token_registry.host}/test/multi:v1", creds=(USER, "bad")))
    assert store_is_empty(store)


async def test_anonymous_bearer_token(tmp_path: Path, store: Store, storage: Path, multi) -> None:
    svc = harness.start_token_service(tmp_path / "anon", {USER: PASSWORD}, anonymous=True)
    reg = harness.start_registry(tmp_path / "reg", storage, harness.token_auth(svc))
    try:
        rec = await import_image(store, request(f"{reg.host}/test/multi:v1"))
        assert rec.uuid == image_uuid_for(multi.manifest_digest)
        assert svc.requests()[0] == {"user": "", "scope": ["repository:test/multi:pull"], "status": 200}
    finally:
        reg.stop()
        svc.stop()


async def test_multi_platform_index_picks_the_platform(store: Store, open_registry: Registry) -> None:
    amd, arm = images.platform_image("amd64"), images.platform_image("arm64")
    index_digest = harness.push_index(
        open_registry.host, "test/multiarch", "v1", {"arm64": arm, "amd64": amd}
    )
    url = f"{open_registry.host}/test/multiarch:v1"
    rec = await import_image(store, request(url))
    assert rec.uuid == image_uuid_for(amd.manifest_digest) != image_uuid_for(index_digest)
    assert (store.layer_paths(rec)[0] / "arch.txt").read_text() == "amd64"
    opts = ImportOptions(platform=Platform(os="linux", architecture="arm64", variant="v8"))
    rec_arm = await import_image(store, request(url), options=opts)
    assert (store.layer_paths(rec_arm)[0] / "arch.txt").read_text() == "arm64"
    assert rec_arm.config.env == ["ARCH=arm64"]
    with pytest.raises(Exception, match="no manifest for linux/s390x"):
        await import_image(
            store, request(url), options=ImportOptions(platform=Platform(os="linux", architecture="s390x"))
        )


async def test_pull_by_digest(store: Store, open_registry: Registry, multi) -> None:
    rec = await import_image(store, request(f"{open_registry.host}/test/multi@{multi.manifest_digest}"))
    assert rec.uuid == image_uuid_for(multi.manifest_digest)


async def test_corrupted_blob_stores_nothing(store: Store, open_registry: Registry) -> None:
    image = harness.build_image(
        [[harness.Entry("a.txt", data=b"a" * 5000)], [harness.Entry("b.txt", data=b"b")]]
    )
    harness.push_image(open_registry.host, "test/corrupt", "v1", image)
    blob = open_registry.blob_path(image.layer_digests[1])
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(BlobDigestMismatch, match="digest mismatch"):
        await import_image(store, request(f"{open_registry.host}/test/corrupt:v1"))
    assert store_is_empty(store)


async def test_cancelled_import_stores_nothing(store: Store, open_registry: Registry) -> None:
    big = [[harness.Entry(f"f{i}.bin", data=os.urandom(2_000_000)) for i in range(4)] for _ in range(3)]
    image = harness.build_image(big, compression="none")
    harness.push_image(open_registry.host, "test/big", "v1", image)
    cancel = asyncio.Event()

    def on_progress(p: ImportProgress) -> None:
        if p.bytes_done > 0:
            cancel.set()

    with pytest.raises(ImportCancelled):
        await import_image(
            store, request(f"{open_registry.host}/test/big:v1"), progress=on_progress, cancel_event=cancel
        )
    assert store_is_empty(store)
    # and a task cancellation (the operation's own timeout) cleans up the same way
    task = asyncio.ensure_future(import_image(store, request(f"{open_registry.host}/test/big:v1")))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store_is_empty(store)


async def test_tls_registry_on_loopback_with_basic_auth(
    tmp_path: Path, store: Store, storage: Path, multi
) -> None:
    """Loopback registries may use self-signed TLS (as Docker allows); Basic travels inside TLS."""
    harness.htpasswd(tmp_path / "htpasswd", USER, PASSWORD)
    reg = harness.start_registry(
        tmp_path / "tls",
        storage,
        {"htpasswd": {"realm": "basic-realm", "path": str(tmp_path / "htpasswd")}},
        tls=harness.self_signed_cert(tmp_path),
    )
    try:
        rec = await import_image(store, request(f"{reg.host}/test/multi:v1", creds=(USER, PASSWORD)))
        assert rec.uuid == image_uuid_for(multi.manifest_digest)
        with pytest.raises(Unauthorized):
            await import_image(store, request(f"{reg.host}/test/multi:v1", creds=(USER, "bad"), tag="x"))
    finally:
        reg.stop()


async def test_concurrent_imports_of_one_image_agree(store: Store, open_registry: Registry, multi) -> None:
    url = f"{open_registry.host}/test/multi:v1"
    recs = await asyncio.gather(*(import_image(store, request(url)) for _ in range(3)))
    assert {r.uuid for r in recs} == {image_uuid_for(multi.manifest_digest)}
    assert len(store.list_images()) == 1
    assert not os.listdir(store.tmp_dir)


@pytest.mark.parametrize(
    ("media_type", "ok"),
    [
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", True),
        ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", False),
        ("application/vnd.oci.image.layer.v1.tar+gzip+encrypted", False),
    ],
)
async def test_layer_media_types(store: Store, open_registry: Registry, media_type: str, ok: bool) -> None:
    image = harness.build_image([[harness.Entry("m.txt", data=media_type.encode())]])
    manifest = harness.json.loads(image.manifest)
    manifest["layers"][0]["mediaType"] = media_type
    for blob in image.blobs.values():
        harness.push_blob(open_registry.host, "test/media", blob)
    harness.push_manifest(open_registry.host, "test/media", "v1", harness.json.dumps(manifest).encode())
    if ok:
        rec = await import_image(store, request(f"{open_registry.host}/test/media:v1"))
        assert (store.layer_paths(rec)[0] / "m.txt").read_text() == media_type
    else:
        with pytest.raises(Exception, match="unsupported layer media type"):
            await import_image(store, request(f"{open_registry.host}/test/media:v1"))
        assert store_is_empty(store)
