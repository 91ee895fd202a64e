"""Registry client behaviour that a stock docker-registry does not exercise: transient errors and retries,
redirects to blob storage on another host (no credentials forwarded), oversized manifests, insecure
registry configuration. A small aiohttp app on 127.0.0.1 plays registry and storage."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from contree import api
from contree.engine.storage.store import Store
from contree.errors import Unavailable, Unprocessable
from contree.oci.auth import Credentials
from contree.oci.importer import ImportProgress, default_options, import_image, open_source
from contree.oci.manifest import MAX_MANIFEST_BYTES
from contree.oci.sources import RegistrySource
from tests.oci import harness
from tests.oci.conftest import store_is_empty


@dataclass
class Fake:
    image: harness.BuiltImage
    blob_failures: dict[str, int] = field(default_factory=dict)  # digest → 503s still to send
    redirect: bool = False
    storage_auth_headers: list[str | None] = field(default_factory=list)
    registry_auth_headers: list[str | None] = field(default_factory=list)
    manifest_override: bytes | None = None
    host: str = ""
    storage_url: str = ""


async def _start(app: web.Application) -> tuple[web.AppRunner, int]:
    return await harness.serve_app(app)


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    image = harness.build_image(
        [[harness.Entry("a.txt", data=b"a" * 100_000)], [harness.Entry("b.txt", data=b"b")]]
    )
    state = Fake(image=image)
    auth = harness.basic("u", "p")

    async def v2(request: web.Request) -> web.Response:
        state.registry_auth_headers.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != auth:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="fake"'})
        return web.json_response({})

    async def manifest(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != auth:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="fake"'})
        body = state.manifest_override or image.manifest
        return web.Response(body=body, content_type="application/vnd.oci.image.manifest.v1+json")

    async def blob(request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        state.registry_auth_headers.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != auth:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="fake"'})
        if state.blob_failures.get(digest, 0) > 0:
            state.blob_failures[digest] -= 1
            return web.Response(status=503, text="try again", headers={"Retry-After": "0"})
        if state.redirect and digest in image.layer_digests:
            raise web.HTTPTemporaryRedirect(f"{state.storage_url}/storage/{digest}")
        return web.Response(body=image.blobs[digest])

    async def storage(request: web.Request) -> web.Response:
        state.storage_auth_headers.append(request.headers.get("Authorization"))
        return web.Response(body=image.blobs[request.match_info["digest"]])

    reg_app = web.Application()
    reg_app.router.add_get("/v2/", v2)
    reg_app.router.add_get("/v2/fake/img/manifests/{ref}", manifest)
    reg_app.router.add_get("/v2/fake/img/blobs/{digest}", blob)
    sto_app = web.Application()
    sto_app.router.add_get("/storage/{digest}", storage)
    reg_runner, reg_port = await _start(reg_app)
    sto_runner, sto_port = await _start(sto_app)
    state.host = f"127.0.0.1:{reg_port}"
    state.storage_url = f"http://localhost:{sto_port}"
    try:
        yield state
    finally:
        await reg_runner.cleanup()
        await sto_runner.cleanup()


def _request(fake: Fake) -> api.ImageImportRequest:
    return api.ImageImportRequest(
        registry=api.ImageRegistry(
            url=f"{fake.host}/fake/img:v1", credentials=api.RegistryCredentials(username="u", password="p")
        )
    )


async def test_transient_blob_errors_are_retried(store: Store, fake: Fake) -> None:
    fake.blob_failures = {fake.image.layer_digests[0]: 2}
    events: list[ImportProgress] = []
    rec = await import_image(store, _request(fake), progress=events.append)
    assert (store.layer_paths(rec)[1] / "a.txt").read_bytes() == b"a" * 100_000
    assert fake.blob_failures[fake.image.layer_digests[0]] == 0
    done = [e.bytes_done for e in events]
    assert done == sorted(done)  # progress never goes back


async def test_persistent_blob_errors_fail_cleanly(store: Store, fake: Fake) -> None:
    fake.blob_failures = {fake.image.layer_digests[1]: 10}
    with pytest.raises(Unavailable, match="HTTP 503"):
        await import_image(store, _request(fake))
    assert store_is_empty(store)


async def test_redirect_to_storage_gets_no_credentials(store: Store, fake: Fake) -> None:
    fake.redirect = True
    rec = await import_image(store, _request(fake))
    assert (store.layer_paths(rec)[0] / "b.txt").read_bytes() == b"b"
    assert len(fake.storage_auth_headers) == 2
    assert fake.storage_auth_headers == [None, None]
    assert harness.basic("u", "p") in fake.registry_auth_headers


async def test_oversized_manifest_is_refused(store: Store, fake: Fake) -> None:
    fake.manifest_override = json.dumps({"pad": "x" * (MAX_MANIFEST_BYTES + 10)}).encode()
    with pytest.raises(Unprocessable, match="larger than"):
        await import_image(store, _request(fake))
    assert store_is_empty(store)


async def test_insecure_registries_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTREE_INSECURE_REGISTRIES", "registry.lan:5000, other.lan")
    options = default_options()
    assert options.insecure_registries == ("registry.lan:5000", "other.lan")
    lan = open_source("registry.lan:5000/app:1", credentials=None, options=options)
    remote = open_source(
        "ghcr.io/org/app:1", credentials=Credentials(username="u", password="p"), options=options
    )
    try:
        assert isinstance(lan, RegistrySource) and lan.client.insecure
        assert isinstance(remote, RegistrySource) and not remote.client.insecure
    finally:
        await lan.close()
        await remote.close()


async def test_expired_bearer_token_is_renewed_mid_import(store: Store) -> None:
    """The registry stops accepting the first token after the manifest; the client fetches a new one."""
    image = harness.build_image([[harness.Entry("t.txt", data=b"t")]])
    issued: list[str] = []
    valid: set[str] = set()
    port_box: dict[str, int] = {}

    async def token(request: web.Request) -> web.Response:
        assert request.query.get("scope") == "repository:fake/img:pull"
        tok = f"tok{len(issued)}"
        issued.append(tok)
        valid.clear()
        valid.add(tok)
        return web.json_response({"token": tok, "expires_in": 300})

    def challenge() -> web.Response:
        realm = f"http://127.0.0.1:{port_box['p']}/token"
        return web.Response(
            status=401, headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="fake"'}
        )

    def authorized(request: web.Request) -> bool:
        return request.headers.get("Authorization", "").removeprefix("Bearer ") in valid

    async def v2(request: web.Request) -> web.Response:
        return web.json_response({}) if authorized(request) else challenge()

    async def manifest(request: web.Request) -> web.Response:
        if not authorized(request):
            return challenge()
        valid.clear()  # the token "expires" right after the manifest
        return web.Response(body=image.manifest, content_type="application/vnd.oci.image.manifest.v1+json")

    async def blob(request: web.Request) -> web.Response:
        if not authorized(request):
            return challenge()
        return web.Response(body=image.blobs[request.match_info["digest"]])

    app = web.Application()
    app.router.add_get("/token", token)
    app.router.add_get("/v2/", v2)
    app.router.add_get("/v2/fake/img/manifests/{ref}", manifest)
    app.router.add_get("/v2/fake/img/blobs/{digest}", blob)
    runner, port = await harness.serve_app(app)
    port_box["p"] = port
    try:
        rec = await import_image(
            store, api.ImageImportRequest(registry=api.ImageRegistry(url=f"127.0.0.1:{port}/fake/img:v1"))
        )
        assert (store.layer_paths(rec)[0] / "t.txt").read_bytes() == b"t"
        assert issued == ["tok0", "tok1"]
    finally:
        await runner.cleanup()
