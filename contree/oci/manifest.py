"""Wire shapes of OCI / Docker v2 manifests, indexes and image configs, and platform selection."""

from __future__ import annotations

import platform as _platform

import msgspec

from contree.errors import Unprocessable

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_CONFIG_BYTES = 8 * 1024 * 1024
MAX_LAYERS = 128

# Layer media types known to be tars (compression is detected from the bytes, so other types are
# accepted too unless `unsupported_layer` says they cannot be unpacked here).
LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
    }
)


class Platform(
    msgspec.Struct, kw_only=True, rename={"os_version": "os.version", "os_features": "os.features"}
):
    architecture: str = ""
    os: str = ""
    variant: str | None = None
    os_version: str | None = None
    os_features: list[str] | None = None


class Descriptor(msgspec.Struct, kw_only=True, rename="camel"):
    media_type: str = ""
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] | None = None
    urls: list[str] | None = None


class Index(msgspec.Struct, kw_only=True, rename="camel"):
    schema_version: int = 2
    media_type: str | None = None
    manifests: list[Descriptor] = []


class Manifest(msgspec.Struct, kw_only=True, rename="camel"):
    schema_version: int = 2
    media_type: str | None = None
    config: Descriptor
    layers: list[Descriptor] = []


class ContainerConfig(msgspec.Struct, kw_only=True, rename="pascal"):
    env: list[str] | None = None
    working_dir: str | None = None
    user: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    labels: dict[str, str] | None = None
    exposed_ports: dict[str, object] | None = None


class RootFS(msgspec.Struct, kw_only=True):
    type: str = "layers"
    diff_ids: list[str] = []


class ImageConfigBlob(msgspec.Struct, kw_only=True):
    architecture: str = ""
    os: str = ""
    config: ContainerConfig | None = None
    rootfs: RootFS = msgspec.field(default_factory=RootFS)


class ImageDefaults(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The run defaults an image carries (what the store keeps as image config)."""

    env: list[str] = []
    cwd: str | None = None
    user: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    labels: dict[str, str] = {}


def defaults_of(config: ImageConfigBlob) -> ImageDefaults:
    c = config.config or ContainerConfig()
    return ImageDefaults(
        env=list(c.env or []),
        cwd=c.working_dir or None,
        user=c.user or None,
        entrypoint=c.entrypoint,
        cmd=c.cmd,
        labels=dict(c.labels or {}),
    )


_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm"}


def host_platform() -> Platform:
    machine = _platform.machine().lower()
    arch = _ARCH.get(machine, machine)
    variant = "v8" if arch == "arm64" else ("v7" if arch == "arm" else None)
    return Platform(os="linux", architecture=arch, variant=variant)


def pick_manifest(index: Index, want: Platform | None = None) -> Descriptor:
    """The manifest of `index` for `want` (default: the host platform), ignoring attestation entries."""
    want = want or host_platform()
    candidates = [
        d
        for d in index.manifests
        if d.platform is not None
        and d.platform.os == want.os
        and d.platform.architecture == want.architecture
        and d.media_type in (*MANIFEST_TYPES, "")
    ]
    if want.variant:
        exact = [d for d in candidates if d.platform is not None and d.platform.variant == want.variant]
        candidates = exact or [d for d in candidates if d.platform is not None and not d.platform.variant]
    if not candidates:
        offered = sorted(
            {f"{d.platform.os}/{d.platform.architecture}" for d in index.manifests if d.platform is not None}
        )
        raise Unprocessable(
            f"no manifest for {want.os}/{want.architecture} in the image index"
            f" (offers: {', '.join(offered) or 'none'})"
        )
    return candidates[0]


def decode_manifest(data: bytes, media_type: str) -> Index | Manifest:
    """Decode by the declared media type, falling back to the document's own mediaType / shape."""
    try:
        probe = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise Unprocessable(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(probe, dict):
        raise Unprocessable("manifest is not a JSON object")
    kind = media_type.split(";")[0].strip()
    if kind not in (*INDEX_TYPES, *MANIFEST_TYPES):
        kind = str(probe.get("mediaType") or "")
    if kind not in (*INDEX_TYPES, *MANIFEST_TYPES):
        kind = OCI_INDEX if "manifests" in probe else OCI_MANIFEST if "config" in probe else ""
    if probe.get("schemaVersion") == 1:
        raise Unprocessable("Docker schema 1 manifests are not supported (deprecated format)")
    try:
        if kind in INDEX_TYPES:
            return msgspec.convert(probe, Index)
        if kind in MANIFEST_TYPES:
            manifest = msgspec.convert(probe, Manifest)
            if len(manifest.layers) > MAX_LAYERS:
                raise Unprocessable(f"image has {len(manifest.layers)} layers (limit {MAX_LAYERS})")
            return manifest
    except msgspec.ValidationError as exc:
        raise Unprocessable(f"malformed manifest: {exc}") from None
    raise Unprocessable(f"unsupported manifest media type {media_type!r}")


def decode_config(data: bytes) -> ImageConfigBlob:
    try:
        return msgspec.json.decode(data, type=ImageConfigBlob)
    except msgspec.DecodeError as exc:
        raise Unprocessable(f"malformed image config: {exc}") from None


def unsupported_layer(media_type: str) -> bool:
    """Foreign (Windows base) and encrypted layers cannot be unpacked into a Linux rootfs."""
    kind = media_type.lower()
    return "foreign" in kind or "encrypted" in kind or "windows" in kind
