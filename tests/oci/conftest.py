"""Fixtures: registries on 127.0.0.1 (anonymous, Basic, token) sharing one storage, test images pushed
once per module, and a fresh store per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from contree.engine.storage.store import Store
from tests.oci import harness
from tests.oci.harness import Registry, TokenService

USER, PASSWORD = "tester", "s3cret"


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry-storage")


@pytest.fixture(scope="module")
def open_registry(tmp_path_factory: pytest.TempPathFactory, storage: Path) -> Iterator[Registry]:
    reg = harness.start_registry(tmp_path_factory.mktemp("open"), storage)
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory, storage: Path) -> Iterator[Registry]:
    work = tmp_path_factory.mktemp("basic")
    harness.htpasswd(work / "htpasswd", USER, PASSWORD)
    reg = harness.start_registry(
        work, storage, {"htpasswd": {"realm": "basic-realm", "path": str(work / "htpasswd")}}
    )
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def token_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenService]:
    svc = harness.start_token_service(tmp_path_factory.mktemp("token"), {USER: PASSWORD})
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory, storage: Path, token_service: TokenService
) -> Iterator[Registry]:
    reg = harness.start_registry(
        tmp_path_factory.mktemp("tokreg"), storage, harness.token_auth(token_service)
    )
    yield reg
    reg.stop()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "home")
    yield s
    s.close()


def store_is_empty(store: Store) -> bool:
    """No image, no layer, nothing left in staging."""
    return (
        not store.list_images()
        and not store.referenced_layers()
        and not [p for p in os.listdir(store.layers_dir)]
        and not os.listdir(store.tmp_dir)
    )
