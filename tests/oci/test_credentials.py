"""Credential store (0600, never echoed) and validation against real registries on loopback."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from aiohttp import web

from contree.oci.auth import Credentials, url_is_safe_for_secrets
from contree.oci.credentials import CredentialStore, pat_page, validate_credentials
from tests.oci import harness
from tests.oci.conftest import PASSWORD, USER
from tests.oci.harness import Registry


def test_store_is_0600_and_masks_secrets(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "state" / "registries.json")
    entry = store.put("docker://ghcr.io/org/app:1", "alice", "ghp_secret")
    assert entry.registry == "ghcr.io"
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.path.parent).st_mode) == 0o700
    got = store.get("ghcr.io")
    assert got is not None and got.credentials() == Credentials(username="alice", password="ghp_secret")
    assert "ghp_secret" not in repr(got) and "ghp_secret" not in repr(got.credentials())
    store.put("python:3.11", "bob", "dckr_pat")
    assert store.registries() == ["docker.io", "ghcr.io"]
    assert store.delete("ghcr.io") and not store.delete("ghcr.io")
    assert store.get("ghcr.io") is None and store.get("docker.io") is not None
    assert [p.name for p in store.path.parent.iterdir()] == ["registries.json"]  # no temp files left


def test_store_scopes_by_principal(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "registry-credentials.json")
    store.put("ghcr.io", "shared", "t0")
    store.put("ghcr.io", "alice", "t1", principal="alice")
    store.put("docker.io", "bob", "t2", principal="bob")
    shared, own = store.get("ghcr.io"), store.get("ghcr.io", principal="alice")
    assert shared is not None and shared.username == "shared" and own is not None and own.username == "alice"
    assert store.get("ghcr.io", principal="bob") is None and store.get("docker.io") is None
    assert store.registries(principal="bob") == ["docker.io"] and store.registries() == ["ghcr.io"]
    assert not store.delete("ghcr.io", principal="bob")
    assert store.delete("ghcr.io", principal="alice") and store.get("ghcr.io") is not None
    assert b"alice" not in store.path.read_bytes()  # an emptied principal leaves no trace
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600


def test_pat_pages() -> None:
    assert pat_page("docker.io") == "https://app.docker.com/settings/personal-access-tokens"
    assert pat_page("docker://python:3.11") == "https://app.docker.com/settings/personal-access-tokens"
    assert pat_page("ghcr.io") == "https://github.com/settings/tokens?type=beta"
    assert pat_page("eu.gcr.io") == "https://console.cloud.google.com/apis/credentials"
    assert pat_page("registry.example.com") is None


def test_secrets_only_over_https_or_loopback() -> None:
    assert url_is_safe_for_secrets("https://ghcr.io/token")
    assert url_is_safe_for_secrets("http://127.0.0.1:5000/v2/")
    assert url_is_safe_for_secrets("http://localhost:5000/v2/")
    assert not url_is_safe_for_secrets("http://registry.example.com/v2/")


async def test_validate_basic_realm(basic_registry: Registry) -> None:
    ok = await validate_credentials(basic_registry.host, USER, PASSWORD)
    assert (
        ok.status == "valid"
        and ok.message == f"Authenticated with '{basic_registry.host}' as '{USER}' successfully."
    )
    bad = await validate_credentials(basic_registry.host, USER, "nope")
    assert bad.status == "invalid" and "Invalid credentials" in bad.message and "nope" not in bad.message


async def test_validate_bearer_realm(token_registry: Registry) -> None:
    assert (await validate_credentials(f"docker://{token_registry.host}/x", USER, PASSWORD)).valid
    bad = await validate_credentials(token_registry.host, USER, "nope")
    assert bad.status == "invalid"


async def test_unreachable_registry_is_not_invalid() -> None:
    port = harness.free_port()  # nothing listens there
    check = await validate_credentials(f"127.0.0.1:{port}", USER, PASSWORD)
    assert check.status == "unreachable" and not check.valid


async def test_server_errors_are_not_invalid() -> None:
    async def v2(request: web.Request) -> web.Response:
        return web.Response(status=503, text="maintenance")

    app = web.Application()
    app.router.add_get("/v2/", v2)
    runner, port = await harness.serve_app(app)
    try:
        check = await validate_credentials(f"127.0.0.1:{port}", USER, PASSWORD)
        assert check.status == "unreachable"
    finally:
        await runner.cleanup()
