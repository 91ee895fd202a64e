"""The service's aiohttp application: the Contree REST API at `/v1` (the same app `serve-api` serves),
the control surface (`/engine/status`, `/engine/stop`, `/engine/attach`) and private engine routes
(`/engine/v1/…`: lineage, imports with the asking server's allowed roots, the sync chunk store).

Only the home's owner can connect (the socket is 0600 in a private home), so nothing here checks tokens.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec
from aiohttp import web

from contree import api
from contree.engine.local import LocalEngine
from contree.engine.storage.blobs import BlobStore
from contree.errors import BadRequest
from contree.rest import params
from contree.rest.app import build_app, error_response
from contree.rest.handlers import decode_body, json_response
from contree.service import control
from contree.service.control import (
    ClientInfo,
    ServiceImport,
    ServiceState,
    ServiceStatus,
    StopMode,
    StopRequest,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HEARTBEAT = 15.0  # seconds between keepalive comments on an attach stream
DISCONNECT_POLL = 0.5  # how often an attach stream looks whether its client went away
EVENTS_KEEPALIVE = 15.0
NEW_WORK = frozenset(("/v1/instances", "/v1/images/import", control.IMPORT_PATH))

_digests = msgspec.msgpack.Decoder(list[str])
_chunks = msgspec.msgpack.Decoder(list[tuple[str, bytes]])
_datas = msgspec.msgpack.Decoder(list[bytes])
_msgpack = msgspec.msgpack.Encoder()


class ServiceHost(Protocol):
    """What the app needs of the service hosting it (`server.EngineService`)."""

    engine: LocalEngine
    home: Path
    state: ServiceState
    engine_open: bool
    clients: dict[object, ClientInfo]
    closing: asyncio.Event

    def status(self) -> ServiceStatus: ...

    def request_stop(self, mode: StopMode) -> None: ...

    def wake(self) -> None: ...


def build_service_app(service: ServiceHost) -> web.Application:
    app = build_app(service.engine, keepalive=EVENTS_KEEPALIVE)
    app.middlewares.insert(0, _gate(service))
    routes = ServiceRoutes(service)
    r = app.router
    r.add_get(control.STATUS_PATH, routes.status)
    r.add_post(control.STOP_PATH, routes.stop)
    r.add_get(control.ATTACH_PATH, routes.attach, allow_head=False)
    r.add_get(control.LINEAGE_PATH, routes.lineage)
    r.add_post(control.IMPORT_PATH, routes.import_image)
    r.add_post(control.CHUNKS_MISSING_PATH, routes.missing_chunks)
    r.add_post(control.CHUNKS_PATH, routes.put_chunks)
    r.add_post(control.FILES_BATCH_PATH, routes.put_files)
    r.add_post(control.FILES_MISSING_PATH, routes.missing_files)
    r.add_post(control.FILES_ASSEMBLE_PATH, routes.assemble)
    return app


def _gate(service: ServiceHost) -> Any:
    """Engine routes answer 503 while the engine is not open; new work is refused once it stops."""

    @web.middleware
    async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith("/engine/") and not path.startswith("/engine/v1/"):
            return await handler(request)  # the control surface answers in every state
        state = service.state
        if state == "starting":
            return error_response(503, f"the engine at {service.home} is starting", retry_after=1)
        if not service.engine_open or service.closing.is_set():
            return error_response(503, f"the engine at {service.home} is shutting down", retry_after=1)
        if state == "stopping" and request.method == "POST" and path in NEW_WORK:
            return error_response(
                503,
                f"the engine at {service.home} is stopping (contree-mcp engine stop); new work is refused",
            )
        return await handler(request)

    return gate


def _peer(request: web.Request) -> tuple[int, int] | None:
    """(pid, uid) of the client process, as the kernel recorded it when it connected."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


def _peer_pid(request: web.Request) -> int | None:
    peer = _peer(request)
    return None if peer is None else peer[0]


class ServiceRoutes:
    def __init__(self, service: ServiceHost) -> None:
        self.service = service

    # ------------------------------------------------------------ control

    async def status(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.service.status())

    async def stop(self, request: web.Request) -> web.StreamResponse:
        body = await decode_body(request, StopRequest)
        self.service.request_stop(body.mode)
        return json_response(self.service.status(), status=202)

    async def attach(self, request: web.Request) -> web.StreamResponse:
        """A client's lease: the service counts it as connected until this stream ends. The stream ends
        when the client goes away or the service stops (then the client knows at once)."""
        service = self.service
        name = request.query.get("name", "client")[:200]
        info = ClientInfo(name=name, pid=_peer_pid(request), since=time.time())
        response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        response.content_type = "text/event-stream"
        await response.prepare(request)
        key = object()
        service.clients[key] = info
        service.wake()
        loop = asyncio.get_running_loop()
        try:
            await response.write(b": attached\n\n")
            last_beat = loop.time()
            while not service.closing.is_set():
                if request.transport is None or request.transport.is_closing():
                    break
                try:
                    await asyncio.wait_for(service.closing.wait(), DISCONNECT_POLL)
                except TimeoutError:
                    pass
                if loop.time() - last_beat >= HEARTBEAT:
                    await response.write(b": ping\n\n")
                    last_beat = loop.time()
        except (ConnectionError, RuntimeError):
            pass  # the client went away mid-write
        finally:
            service.clients.pop(key, None)
            service.wake()
        return response

    # ------------------------------------------------------------ engine extras

    async def lineage(self, request: web.Request) -> web.StreamResponse:
        uuid = params.image_uuid(request.match_info["uuid"])
        return json_response(await self.service.engine.image_lineage(uuid))

    async def import_image(self, request: web.Request) -> web.StreamResponse:
        body = await decode_body(request, ServiceImport)
        if not all(os.path.isabs(root) for root in body.local_roots):
            raise BadRequest("local_roots must be absolute paths")
        roots = tuple(body.local_roots)
        peer = _peer(request)
        if peer is not None and peer[1] != os.geteuid():
            # Another user of a shared service: the engine would read their archive with its own rights.
            roots = ()
        op = await self.service.engine.import_image(body.request, local_roots=roots)
        return json_response(
            api.ImageImportResponse(uuid=op), status=201, headers={"Location": f"/v1/operations/{op}"}
        )

    def _blobs(self) -> BlobStore:
        engine = self.service.engine
        if not engine.started:
            raise BadRequest("the engine is not open")
        return engine.blobs

    async def missing_chunks(self, request: web.Request) -> web.StreamResponse:
        digests = _decode(_digests, await request.read())
        held = await asyncio.to_thread(self._blobs().has_chunks, set(digests))
        return _msgpack_response([d for d in digests if d not in held])

    async def put_chunks(self, request: web.Request) -> web.StreamResponse:
        items = _decode(_chunks, await request.read())
        # put_chunks checks every chunk against its digest, so a digest also names a safe file name
        await asyncio.to_thread(self._blobs().put_chunks, items)
        return web.Response(status=204)

    async def put_files(self, request: web.Request) -> web.StreamResponse:
        datas = _decode(_datas, await request.read())
        return json_response(await asyncio.to_thread(self._blobs().put_many, datas))

    async def missing_files(self, request: web.Request) -> web.StreamResponse:
        refs = _decode(_digests, await request.read())
        blobs = self._blobs()

        def missing() -> list[str]:
            return [ref for ref in refs if blobs.path_for(ref) is None]

        return _msgpack_response(await asyncio.to_thread(missing))

    async def assemble(self, request: web.Request) -> web.StreamResponse:
        digests = _decode(_digests, await request.read())
        if not digests:
            raise BadRequest("assemble needs at least one chunk")
        return json_response(await asyncio.to_thread(self._blobs().assemble, digests))


def _decode(decoder: msgspec.msgpack.Decoder[Any], raw: bytes) -> Any:
    try:
        return decoder.decode(raw)
    except msgspec.MsgspecError as exc:
        raise BadRequest(f"invalid request body: {exc}") from None


def _msgpack_response(value: Any) -> web.Response:
    return web.Response(body=_msgpack.encode(value), content_type=control.MSGPACK)
