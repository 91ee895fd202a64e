"""Test harness: a real `docker-registry` on 127.0.0.1, a token service, and an image builder that pushes
layers, configs, manifests and indexes through the registry API (so hostile layers can be served too)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import shutil
import socket
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.netutil import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN_SERVER = REPO_ROOT / "fixtures" / "oci" / "token_server.py"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


def require(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} not found: install the Debian package '{package}' (make install-system)")
    return path


async def serve_app(app: Any) -> tuple[Any, int]:
    """Start an aiohttp app on a socket already bound to 127.0.0.1:0 (no port race) → (runner, port)."""
    from aiohttp import web

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner, int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Wait until `url` answers; with `proc`, only answers carrying the registry's API header count and
    False is returned if `proc` exits first (e.g. its port was taken by someone else)."""
    deadline = time.monotonic() + timeout
    context = ssl._create_unverified_context() if url.startswith("https:") else None
    while True:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as r:
                headers = r.headers
        except urllib.error.HTTPError as exc:
            headers = exc.headers  # any HTTP answer (401 included) means it is up
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        if proc is None or headers.get("Docker-Distribution-Api-Version") == "registry/2.0":
            return True
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} answers but is not our registry")
        time.sleep(0.05)


@dataclass
class Registry:
    host: str  # 127.0.0.1:port
    storage: Path
    proc: subprocess.Popen[bytes]

    def blob_path(self, digest: str) -> Path:
        hexpart = digest.split(":", 1)[1]
        return (
            self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexpart[:2] / hexpart / "data"
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def self_signed_cert(workdir: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (cert, key)."""
    cert, key = workdir / "tls.pem", workdir / "tls.key"
    make_self_signed(cert, key, "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1")
    return cert, key


def make_self_signed(cert: Path, key: Path, subject: str, *extra: str) -> None:
    """A one-day self-signed RSA certificate with `openssl req -x509`."""
    openssl = require("openssl", "openssl")
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            subject,
            *extra,
        ],
        capture_output=True,
        check=True,
    )


def start_registry(
    workdir: Path, storage: Path, auth: dict[str, Any] | None = None, tls: tuple[Path, Path] | None = None
) -> Registry:
    binary = require("docker-registry", "docker-registry")
    workdir.mkdir(parents=True, exist_ok=True)
    for _attempt in range(5):  # a free port can be taken by another process before the registry binds it
        port = free_port()
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{port}"},
        }
        if auth:
            config["auth"] = auth
        if tls:
            config["http"]["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
        cfg = workdir / f"registry-{port}.yml"
        cfg.write_text(json.dumps(config))  # JSON is YAML
        log = open(workdir / f"registry-{port}.log", "wb")
        proc = subprocess.Popen([binary, "serve", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            up = wait_http(f"{'https' if tls else 'http'}://127.0.0.1:{port}/v2/", proc=proc)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if up:
            return Registry(host=f"127.0.0.1:{port}", storage=storage, proc=proc)
        proc.wait()
    raise RuntimeError(f"docker-registry did not start; see {workdir}/registry-*.log")


def htpasswd(path: Path, user: str, password: str) -> None:
    binary = require("htpasswd", "apache2-utils")
    out = subprocess.run([binary, "-Bbn", user, password], capture_output=True, check=True).stdout
    path.write_bytes(out)


@dataclass
class TokenService:
    url: str
    cert: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def requests(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_token_service(workdir: Path, users: dict[str, str], *, anonymous: bool = False) -> TokenService:
    workdir.mkdir(parents=True, exist_ok=True)
    key, cert = workdir / "tkey.pem", workdir / "tcert.pem"
    if not cert.exists():
        make_self_signed(cert, key, "/CN=sbx-token")
    users_file = workdir / "users.txt"
    users_file.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
    log = workdir / f"token-{time.monotonic_ns()}.log"
    cmd = [
        sys.executable,
        str(TOKEN_SERVER),
        "--key",
        str(key),
        "--cert",
        str(cert),
        "--users",
        str(users_file),
        "--log",
        str(log),
    ]
    if anonymous:
        cmd.append("--anonymous")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("READY "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"token server did not start: {line!r}")
    port = int(line.split()[1])
    return TokenService(url=f"http://127.0.0.1:{port}/token", cert=cert, log=log, proc=proc)


def token_auth(service: TokenService) -> dict[str, Any]:
    return {
        "token": {
            "realm": service.url,
            "service": "sbx-registry",
            "issuer": "sbx-token",
            "rootcertbundle": str(service.cert),
        }
    }


# ---- building images ------------------------------------------------------------------------------


@dataclass
class Entry:
    """One tar entry: kind is file | dir | symlink | hardlink | fifo | chardev."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    mtime: int = 1_700_000_000
    xattrs: dict[str, str] = field(default_factory=dict)
    devmajor: int = 0
    devminor: int = 0


def layer_tar(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mode, info.uid, info.gid, info.mtime = e.mode, e.uid, e.gid, e.mtime
            if e.xattrs:
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()}
            if e.kind == "file":
                info.size = len(e.data)
                tf.addfile(info, io.BytesIO(e.data))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "fifo": tarfile.FIFOTYPE,
                "chardev": tarfile.CHRTYPE,
                "blockdev": tarfile.BLKTYPE,
            }[e.kind]
            info.linkname = e.link
            info.devmajor, info.devminor = e.devmajor, e.devminor
            tf.addfile(info)
    return buf.getvalue()


def compress(tar: bytes, how: str) -> tuple[bytes, str]:
    if how == "gzip":
        return gzip.compress(tar, compresslevel=1), LAYER_GZIP
    if how == "zstd":
        zstd = require("zstd", "zstd")
        return subprocess.run(
            [zstd, "-q", "-c"], input=tar, capture_output=True, check=True
        ).stdout, LAYER_ZSTD
    return tar, LAYER_TAR


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class BuiltImage:
    manifest: bytes
    manifest_digest: str
    config: bytes
    blobs: dict[str, bytes]  # digest → content (config and layers)
    layer_digests: list[str]
    diff_ids: list[str]


def build_image(
    layers: Sequence[list[Entry] | bytes],
    *,
    compression: list[str] | str = "gzip",
    config: dict[str, Any] | None = None,
    arch: str = "amd64",
) -> BuiltImage:
    """Layers (bottom first) as entry lists or raw tar bytes → config + OCI manifest."""
    blobs: dict[str, bytes] = {}
    descs: list[dict[str, Any]] = []
    diff_ids: list[str] = []
    for i, layer in enumerate(layers):
        tar = layer if isinstance(layer, bytes) else layer_tar(layer)
        how = compression if isinstance(compression, str) else compression[i]
        blob, media = compress(tar, how)
        blobs[sha(blob)] = blob
        descs.append({"mediaType": media, "digest": sha(blob), "size": len(blob)})
        diff_ids.append(sha(tar))
    cfg = {
        "architecture": arch,
        "os": "linux",
        "config": config or {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    cfg_bytes = json.dumps(cfg).encode()
    blobs[sha(cfg_bytes)] = cfg_bytes
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha(cfg_bytes), "size": len(cfg_bytes)},
            "layers": descs,
        }
    ).encode()
    return BuiltImage(manifest, sha(manifest), cfg_bytes, blobs, [d["digest"] for d in descs], diff_ids)


def _request(method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    return urllib.request.urlopen(req, timeout=30)


def push_blob(host: str, repo: str, data: bytes) -> str:
    digest = sha(data)
    try:
        _request("HEAD", f"http://{host}/v2/{repo}/blobs/{digest}").close()
        return digest
    except urllib.error.HTTPError:
        pass
    with _request("POST", f"http://{host}/v2/{repo}/blobs/uploads/", b"") as r:
        location = r.headers["Location"]
    if location.startswith("/"):
        location = f"http://{host}{location}"
    sep = "&" if "?" in location else "?"
    _request(
        "PUT", f"{location}{sep}digest={digest}", data, {"Content-Type": "application/octet-stream"}
    ).close()
    return digest


def push_manifest(host: str, repo: str, ref: str, manifest: bytes, media_type: str = OCI_MANIFEST) -> str:
    _request(
        "PUT", f"http://{host}/v2/{repo}/manifests/{ref}", manifest, {"Content-Type": media_type}
    ).close()
    return sha(manifest)


def push_image(host: str, repo: str, tag: str, image: BuiltImage) -> str:
    for blob in image.blobs.values():
        push_blob(host, repo, blob)
    return push_manifest(host, repo, tag, image.manifest)


def push_index(host: str, repo: str, tag: str, images: dict[str, BuiltImage]) -> str:
    """A multi-platform OCI index: arch → image."""
    manifests = []
    for arch, image in images.items():
        for blob in image.blobs.values():
            push_blob(host, repo, blob)
        push_manifest(host, repo, image.manifest_digest, image.manifest)
        manifests.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": image.manifest_digest,
                "size": len(image.manifest),
                "platform": {
                    "architecture": arch,
                    "os": "linux",
                    **({"variant": "v8"} if arch == "arm64" else {}),
                },
            }
        )
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()
    return push_manifest(host, repo, tag, index, OCI_INDEX)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
