"""The service's private control surface (`/engine/…` on the home's socket): its wire shapes, the
version rules, and a small blocking client the CLI and the starter use.

The client speaks HTTP/1.1 through the stdlib (`http.client` on a connected unix socket), so
`contree-mcp engine status` answers without importing aiohttp. It also pins the service process: the
socket's peer credentials name the process that listens, and a pidfd opened on it while the connection is
still answered is that process for sure, so `engine stop` can wait for its exit without trusting a pid.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import select
import socket
import struct
from pathlib import Path
from typing import Literal, TypeVar

import msgspec

from contree import api
from contree.service.paths import SOCKET_NAME, address, socket_path
from contree.version import VERSION

# Bumped whenever a client of one API level could not use a service of another (control routes, the
# private engine routes); the /v1 REST API itself follows the Contree spec and does not change with it.
SERVICE_API = 1
STATUS_PATH = "/engine/status"
STOP_PATH = "/engine/stop"
ATTACH_PATH = "/engine/attach"
LINEAGE_PATH = "/engine/v1/images/{uuid}/lineage"
IMPORT_PATH = "/engine/v1/images/import"
CHUNKS_MISSING_PATH = "/engine/v1/chunks/missing"
CHUNKS_PATH = "/engine/v1/chunks"
FILES_BATCH_PATH = "/engine/v1/files/batch"
FILES_MISSING_PATH = "/engine/v1/files/missing"
FILES_ASSEMBLE_PATH = "/engine/v1/files/assemble"
MSGPACK = "application/msgpack"

T = TypeVar("T")
ServiceState = Literal["starting", "ready", "stopping", "retiring"]
StopMode = Literal["drain", "now", "idle"]


def package_version() -> str:
    return VERSION


class ClientInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One attached client, for `engine status`."""

    name: str
    pid: int | None = None
    since: float


class ServiceStatus(msgspec.Struct, kw_only=True):
    version: str
    api: int
    pid: int
    home: str
    socket: str
    log: str
    state: ServiceState
    started_at: float
    uptime: float
    clients: list[ClientInfo]
    running_operations: int
    pending_operations: int
    idle_exit: float | None  # seconds without clients and work before it exits; None = never
    idle_for: float | None  # how long it has been idle; None while busy
    busy: list[str]  # why it is not idle


class StopRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # drain: refuse new work, let running operations finish, then exit; now: cancel them;
    # idle: keep serving, exit at the first moment no operation runs (version skew: a newer client
    # asks an older service to make way).
    mode: StopMode = "drain"


class ServiceImport(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`POST /engine/v1/images/import`: the import request with the allowed roots of the MCP server
    that asked, which the engine re-checks when it opens a local source."""

    request: api.ImageImportRequest
    local_roots: list[str]


# ---------------------------------------------------------------------- versions


def version_key(version: str) -> tuple[int, ...] | None:
    """`0.6.0` → (0, 6, 0); None when it is not a plain dotted release (then no order is assumed)."""
    release = version.split("+", 1)[0]
    parts = release.split(".")
    if not parts or not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


def skew(service: str, client: str) -> Literal["same", "older", "newer"]:
    """How the service's version relates to the client's. Unordered differences count as older, so the
    client that finds them replaces the service (two unordered builds cannot agree who is newer)."""
    if service == client:
        return "same"
    s, c = version_key(service), version_key(client)
    if s is None or c is None or s <= c:
        return "older"
    return "newer"


# ---------------------------------------------------------------------- the blocking client


class ServiceGone(Exception):
    """Nothing answers on the socket (no file, refused, or the peer closed without a reply)."""


class ServiceUnresponsive(Exception):
    """Something accepted the connection but did not answer in time: a service that is alive but busy
    (a loaded machine), never one to replace."""


class ControlError(Exception):
    """The service answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_status_decoder = msgspec.json.Decoder(ServiceStatus)
_encoder = msgspec.json.Encoder()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, sock: socket.socket, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)  # the REST guard wants a loopback Host
        self.sock = sock

    def connect(self) -> None:  # already connected
        return


class ControlConnection:
    """One connection to a home's service. `pidfd` (when `pin=True`) refers to the service process."""

    def __init__(self, home: Path, *, timeout: float = 5.0, pin: bool = False, socket: Path | None = None
                 ) -> None:
        self.home = home
        self.timeout = timeout
        self.pidfd = -1
        self._sock = _connect(socket or socket_path(home), timeout)
        try:
            if pin:
                self.pidfd = _open_peer_pidfd(self._sock)
            # The first answer proves the peer is alive, so the pidfd opened before it is that process.
            self.status = self._status()
        except BaseException:
            self.close()
            raise

    def _request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        return _exchange(self._sock, self.timeout, method, path, body)

    def _status(self) -> ServiceStatus:
        status, raw = self._request("GET", STATUS_PATH)
        if status != 200:
            raise ControlError(status, _message(raw))
        return _status_decoder.decode(raw)

    def refresh(self) -> ServiceStatus:
        self.status = self._status()
        return self.status

    def stop(self, mode: StopMode) -> ServiceStatus:
        status, raw = self._request("POST", STOP_PATH, _encoder.encode(StopRequest(mode=mode)))
        if status != 202:
            raise ControlError(status, _message(raw))
        self.status = _status_decoder.decode(raw)
        return self.status

    def wait_exit(self, timeout: float | None) -> bool:
        """True once the pinned service process has exited (needs `pin=True`)."""
        if self.pidfd < 0:
            raise RuntimeError("wait_exit needs a pinned connection")
        with contextlib.suppress(OSError):
            self._sock.close()  # our own connection must not keep it waiting
        ready, _, _ = select.select([self.pidfd], [], [], timeout)
        return bool(ready)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def __enter__(self) -> ControlConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def get_json(socket: Path, path: str, kind: type[T], *, timeout: float = 5.0) -> T:
    """One GET on a service's socket (any route, e.g. of the `/v1` API), decoded as `kind`; ControlError
    for an error status. For a client that has not loaded its HTTP client yet (start-up)."""
    sock = _connect(socket, timeout)
    try:
        status, raw = _exchange(sock, timeout, "GET", path, None)
    finally:
        sock.close()
    if status != 200:
        raise ControlError(status, _message(raw))
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.MsgspecError as exc:
        raise ControlError(502, f"GET {path}: malformed response: {exc}") from None


def _exchange(
    sock: socket.socket, timeout: float, method: str, path: str, body: bytes | None
) -> tuple[int, bytes]:
    conn = _UnixHTTPConnection(sock, timeout)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    except (ConnectionError, http.client.HTTPException) as exc:
        raise ServiceGone(f"the engine service closed the connection: {exc}") from None
    except TimeoutError:
        raise ServiceUnresponsive(f"the engine service did not answer within {timeout:g} s") from None


def _connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    where = path.parent if path.name == SOCKET_NAME else path
    try:
        with address(path) as target:
            sock.connect(target.path)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
        sock.close()
        raise ServiceGone(f"no engine service answers at {where} ({exc.strerror})") from None
    except TimeoutError:
        sock.close()
        raise ServiceUnresponsive(f"the engine service at {where} does not accept connections") from None
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            raise ServiceGone(f"no engine service answers at {where}") from None
        raise
    return sock


def _open_peer_pidfd(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _, _ = struct.unpack("3i", creds)
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise ServiceGone("the engine service exited") from None


def _message(raw: bytes) -> str:
    try:
        return msgspec.json.decode(raw, type=api.Error).message()
    except msgspec.MsgspecError:
        return raw.decode("utf-8", "replace").strip()[:500] or "no message"


def probe(home: Path, *, timeout: float = 5.0, socket: Path | None = None) -> ServiceStatus | None:
    """The status of the home's service (or of the one on `socket`), or None when there is none
    (ServiceUnresponsive when one is there but does not answer in time)."""
    try:
        with ControlConnection(home, timeout=timeout, socket=socket) as conn:
            return conn.status
    except ServiceGone:
        return None
