"""Docker reference rules (COMPAT §15.40) and local source syntax."""

from __future__ import annotations

from pathlib import Path

import pytest

from contree.errors import BadRequest
from contree.oci.auth import is_loopback_host, parse_challenge
from contree.oci.reference import LocalSource, parse_reference, parse_source, registry_host

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("python:3.11-slim", "docker.io", "library/python", "3.11-slim", None),
        ("docker://python:3.11-slim", "docker.io", "library/python", "3.11-slim", None),
        ("oci://python:3.11-slim", "docker.io", "library/python", "3.11-slim", None),
        ("docker://pytorch/pytorch:2.0", "docker.io", "pytorch/pytorch", "2.0", None),
        ("docker://localhost:5000/img", "localhost:5000", "img", "latest", None),
        ("localhost/img", "localhost", "img", "latest", None),
        ("ghcr.io/x/y", "ghcr.io", "x/y", "latest", None),
        ("docker://docker.io/busybox:latest", "docker.io", "library/busybox", "latest", None),
        ("index.docker.io/library/alpine", "docker.io", "library/alpine", "latest", None),
        ("127.0.0.1:5000/a/b/c:v1", "127.0.0.1:5000", "a/b/c", "v1", None),
        (f"alpine@{DIGEST}", "docker.io", "library/alpine", None, DIGEST),
        (f"alpine:3@{DIGEST}", "docker.io", "library/alpine", "3", DIGEST),
        ("[::1]:5000/img:1", "[::1]:5000", "img", "1", None),
    ],
)
def test_docker_reference_rules(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)


def test_docker_hub_api_host_and_selector() -> None:
    ref = parse_reference("python:3.11-slim")
    assert ref.api_host == "registry-1.docker.io"
    assert ref.selector == "3.11-slim"
    assert str(ref) == "docker.io/library/python:3.11-slim"
    assert parse_reference(f"alpine:3@{DIGEST}").selector == DIGEST
    assert parse_reference("localhost:5000/x").api_host == "localhost:5000"


@pytest.mark.parametrize(
    "bad", ["", "docker://", "UPPER/case", "a//b", "img:bad tag", "img@sha256:short", "http://x/y", "img:"]
)
def test_invalid_references_are_bad_requests(bad: str) -> None:
    with pytest.raises(BadRequest):
        parse_reference(bad)


@pytest.mark.parametrize(
    ("text", "host"),
    [
        ("docker.io", "docker.io"),
        ("ghcr.io", "ghcr.io"),
        ("https://ghcr.io/", "ghcr.io"),
        ("localhost:5000", "localhost:5000"),
        ("index.docker.io", "docker.io"),
        ("python", "docker.io"),
        ("python:3", "docker.io"),
        ("docker://python:3.11-slim", "docker.io"),
        ("docker://ghcr.io/x/y:1", "ghcr.io"),
        ("oci://localhost:5000/img", "localhost:5000"),
    ],
)
def test_registry_host(text: str, host: str) -> None:
    assert registry_host(text) == host


def test_local_sources(tmp_path: Path) -> None:
    archive = tmp_path / "img.tar"
    archive.write_bytes(b"")
    assert parse_source(f"oci-archive:{archive}") == LocalSource(kind="oci-archive", path=str(archive))
    assert parse_source(f"oci-archive:{archive}:v1") == LocalSource(
        kind="oci-archive", path=str(archive), ref="v1"
    )
    assert parse_source(f"docker-archive:{archive}:example/app:v2") == LocalSource(
        kind="docker-archive", path=str(archive), ref="example/app:v2"
    )
    assert parse_source(f"oci:{tmp_path}:latest") == LocalSource(
        kind="oci-layout", path=str(tmp_path), ref="latest"
    )
    assert parse_source("oci://alpine").registry == "docker.io"  # type: ignore[union-attr]


def test_challenge_parsing_and_loopback() -> None:
    c = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="a:b:pull"'
    )
    assert c is not None and c.scheme == "bearer" and c.realm == "https://auth.docker.io/token"
    assert c.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "a:b:pull",
    }
    b = parse_challenge('Basic realm="basic-realm"')
    assert b is not None and b.scheme == "basic"
    assert parse_challenge("") is None
    for host in ("localhost", "localhost:5000", "127.0.0.1:5000", "127.1.2.3", "[::1]:5000", "::1"):
        assert is_loopback_host(host), host
    for host in ("ghcr.io", "10.0.0.1:5000", "localhost.example.com", "[::2]:1"):
        assert not is_loopback_host(host), host
