"""Image references (docker rules) and import sources.

`parse_reference("python:3.11-slim")` → docker.io/library/python:3.11-slim. The first path component is a
registry only when it contains `.` or `:` or is `localhost`; Docker Hub's API host is registry-1.docker.io.
`parse_source` also accepts the skopeo-style local transports `oci-archive:`, `docker-archive:` and `oci:`.
"""

from __future__ import annotations

import os
import re
from typing import Literal

import msgspec

from contree.errors import BadRequest

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_REGISTRY_SCHEMES = ("docker://", "oci://")
_LOCAL_SCHEMES: dict[str, Literal["oci-archive", "docker-archive", "oci-layout"]] = {
    "oci-archive:": "oci-archive",
    "docker-archive:": "docker-archive",
    "oci:": "oci-layout",
}
# distribution/reference grammar, simplified to what registries accept.
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$|^sha512:[a-f0-9]{128}$")
_HOST = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?$")


class Reference(msgspec.Struct, frozen=True, kw_only=True):
    """A fully qualified registry reference."""

    registry: str  # as the user names it: docker.io, ghcr.io, localhost:5000
    repository: str  # library/python
    tag: str | None = None  # None only when pinned by digest alone
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """Host[:port] that serves the /v2/ API."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def selector(self) -> str:
        """What goes after /manifests/: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def name(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    def __str__(self) -> str:
        return self.name


class LocalSource(msgspec.Struct, frozen=True, kw_only=True):
    """An image on the local filesystem: an OCI/docker archive tarball or an OCI layout directory."""

    kind: Literal["oci-archive", "docker-archive", "oci-layout"]
    path: str
    ref: str | None = None  # tag inside an OCI layout / repo:tag inside a docker archive

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.path}" + (f":{self.ref}" if self.ref else "")

    def __str__(self) -> str:
        return self.name


Source = Reference | LocalSource


def _is_registry_component(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def parse_reference(text: str) -> Reference:
    """Parse `[docker://|oci://][registry/]repo[:tag][@digest]` with Docker's defaults."""
    raw = text.strip()
    for scheme in _REGISTRY_SCHEMES:
        if raw.startswith(scheme):
            raw = raw[len(scheme) :]
            break
    if not raw or "://" in raw:
        raise BadRequest(f"invalid image reference {text!r}")
    digest: str | None = None
    if "@" in raw:
        raw, digest = raw.split("@", 1)
        if not _DIGEST.match(digest):
            raise BadRequest(f"invalid digest in image reference {text!r}")
    registry = DOCKER_HUB
    first, sep, rest = raw.partition("/")
    if sep and _is_registry_component(first):
        if not _HOST.match(first):
            raise BadRequest(f"invalid registry host in image reference {text!r}")
        registry, raw = first, rest
    tag: str | None = None
    last_slash = raw.rfind("/")
    colon = raw.rfind(":")
    if colon > last_slash:
        raw, tag = raw[:colon], raw[colon + 1 :]
        if not _TAG.match(tag):
            raise BadRequest(f"invalid tag {tag!r} in image reference {text!r}")
    repository = raw
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if not repository or not all(_COMPONENT.match(c) for c in repository.split("/")):
        raise BadRequest(f"invalid repository name in image reference {text!r}")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry=registry, repository=repository, tag=tag, digest=digest)


def _split_local(body: str) -> tuple[str, str | None]:
    # skopeo syntax `path[:ref]` where ref may itself hold colons (docker-archive:x.tar:repo:tag); the
    # shortest existing path prefix wins, else the last colon splits.
    if os.path.exists(body) or ":" not in body:
        return body, None
    for i, ch in enumerate(body):
        if ch == ":" and i and os.path.exists(body[:i]):
            return body[:i], (body[i + 1 :] or None)
    path, ref = body.rsplit(":", 1)
    return path, (ref or None)


def parse_source(text: str) -> Source:
    """A registry reference or a local archive/layout source."""
    raw = text.strip()
    for prefix, kind in _LOCAL_SCHEMES.items():
        if raw.startswith(prefix) and not raw.startswith(prefix + "//"):
            path, ref = _split_local(raw[len(prefix) :])
            if not path:
                raise BadRequest(f"missing path in image source {text!r}")
            return LocalSource(kind=kind, path=path, ref=ref)
    return parse_reference(raw)


def _looks_like_host(text: str) -> bool:
    hostpart = text.rsplit(":", 1)[0] if not text.startswith("[") else text
    return bool(_HOST.match(text)) and ("." in hostpart or hostpart == "localhost" or text.startswith("["))


def registry_host(text: str) -> str:
    """The registry a user-supplied URL or reference points to (docker.io for Docker Hub)."""
    raw = text.strip()
    for scheme in ("https://", "http://", *_REGISTRY_SCHEMES):
        if raw.startswith(scheme):
            raw = raw[len(scheme) :]
            break
    bare = raw.rstrip("/")
    if "/" not in bare and _looks_like_host(bare):
        return DOCKER_HUB if bare in ("index.docker.io", "registry-1.docker.io") else bare
    return parse_reference(raw).registry
