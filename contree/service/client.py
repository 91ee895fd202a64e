"""`ServiceBackend`: the embedded engine of a home, reached through its service's unix socket.

It is `RemoteBackend` over an aiohttp `UnixConnector` (the same `/v1` REST API), plus what an MCP server
did in-process before: image lineage, imports checked against its own allowed roots, and the sync chunk
store (only chunks the engine lacks travel). While open it holds an attach stream, so the service counts
it as a client and does not exit idle under it. When the service has gone (stopped, killed) the next
request starts a new one and is sent again.

Reaching the service and attaching need no aiohttp (the stdlib control client, an asyncio stream for the
lease), so an MCP server can answer `initialize` before paying for that import (see contree.client_transport).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import msgspec

from contree import api
from contree.backend import ImageLineage, ImageQuery
from contree.client import RemoteBackend
from contree.errors import Unavailable, error_for_status
from contree.service import control
from contree.service.paths import SocketAddress, address, socket_path
from contree.service.starter import EngineStartError, ensure_service

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

log = logging.getLogger("contree.service")

ROOT = "http://localhost"  # a loopback name: the REST guard refuses any other Host
LEASE_RETRY = 1.0  # seconds between attempts to re-attach after the service went away
LEASE_CONNECT_TIMEOUT = 5.0
LEASE_READ_TIMEOUT = 120.0  # several missed heartbeats: the service hangs or is gone

_msgpack = msgspec.msgpack.Encoder()
_strings = msgspec.msgpack.Decoder(list[str])
_file_responses = msgspec.json.Decoder(list[api.FileResponse])
_file_response = msgspec.json.Decoder(api.FileResponse)


class ServiceBackend(RemoteBackend):
    """`import_roots`: directories local image sources must resolve into (sent with every import, the
    engine re-checks them when it opens the source); None = no restriction beyond the user's own rights.
    `client_name` is what `engine status` lists for this client. `engine_options` (`engine serve` flags:
    output quota, sandbox limits) configure a service this client starts; a running one keeps its own.
    `socket`: a shared service's socket (`contree.service.system`), attached to but never started."""

    def __init__(
        self,
        home: Path,
        *,
        import_roots: Sequence[str] | None = None,
        client_name: str = "client",
        user_agent: str | None = None,
        version: str | None = None,
        timeout: float = 300.0,
        engine_options: Sequence[str] = (),
        socket: Path | None = None,
    ) -> None:
        super().__init__(
            f"{ROOT}/v1", token=None, user_agent=user_agent, timeout=timeout, connect_timeout=10.0
        )
        self.home = Path(home).absolute()  # the service runs in /, and messages name the full path
        self.shared_socket = socket
        self.import_roots = tuple(import_roots) if import_roots is not None else None
        self.client_name = client_name
        self.version = version
        self.engine_options = list(engine_options)
        self.status: control.ServiceStatus | None = None
        self._address: SocketAddress | None = None  # made once the home exists (a first start creates it)
        self._restart = asyncio.Lock()
        self._generation = 0
        self._lease: asyncio.Task[None] | None = None
        self.attached = asyncio.Event()
        self.chunk_store = ServiceChunkStore(self)

    def __repr__(self) -> str:
        return f"ServiceBackend({str(self.home)!r})"

    async def connect(self) -> control.ServiceStatus:
        """Reach (or start) the home's service and attach to it. Raises EngineStartError."""
        self.status, started = await self._reach()
        if self.engine_options and not started:
            log.warning(
                "the engine service at %s was already running: it keeps its own settings, not %s "
                "(contree-mcp engine stop --home %s, then start again, to apply them)",
                self.home, " ".join(self.engine_options), self.home,
            )
        log.info(
            "engine service at %s (pid %d, contree-mcp %s)", self.home, self.status.pid, self.status.version
        )
        if self._lease is None:
            self._lease = asyncio.get_running_loop().create_task(self._hold_lease(), name="engine-lease")
        return self.status

    @property
    def socket(self) -> Path:
        """The service's socket: the home's own, or a shared service's."""
        return self.shared_socket or socket_path(self.home)

    def _socket_path(self) -> str:
        if self._address is None:
            self._address = address(self.socket)
        return self._address.path

    def _make_connector(self) -> aiohttp.BaseConnector | None:
        import aiohttp

        return aiohttp.UnixConnector(path=self._socket_path())

    @staticmethod
    def _engine_url(path: str) -> URL:
        from yarl import URL

        return URL(ROOT + path)

    async def _reconnect(self) -> bool:
        """The socket refused us: the service has gone. Start (or find) its successor."""
        generation = self._generation
        async with self._restart:
            if generation == self._generation:  # nobody else did it while we waited
                try:
                    self.status, _started = await self._reach()
                except EngineStartError as exc:
                    raise Unavailable(str(exc)) from None
                self._generation += 1
                log.info("reconnected to the engine service at %s (pid %d)", self.home, self.status.pid)
        return True

    async def _reach(self) -> tuple[control.ServiceStatus, bool]:
        """The service's status and whether this client started it (a shared one: never)."""
        if self.shared_socket is None:
            reached = await ensure_service(self.home, version=self.version, options=self.engine_options)
            return reached.status, reached.started
        status = await asyncio.to_thread(control.probe, self.home, socket=self.shared_socket)
        if status is None or status.state not in ("ready", "retiring"):
            state = "does not answer" if status is None else f"is {status.state}"
            raise EngineStartError(self.home, f"the shared engine service on {self.shared_socket} {state}")
        return status, False

    async def _hold_lease(self) -> None:
        """Keep one attach stream open while this backend lives; re-attach (never start) after drops.
        The stream's content (heartbeat comments) does not matter, only that it stays open."""
        request = (
            f"GET {control.ATTACH_PATH}?name={quote(self.client_name)} HTTP/1.1\r\n"
            "Host: localhost\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancel that meets a finished read
            try:
                async with asyncio.timeout(LEASE_CONNECT_TIMEOUT):
                    reader, writer = await asyncio.open_unix_connection(self._socket_path())
                try:
                    writer.write(request)
                    async with asyncio.timeout(LEASE_READ_TIMEOUT):
                        status = await reader.readline()
                    if status.split(b" ", 2)[1:2] == [b"200"]:
                        self.attached.set()
                        while True:
                            async with asyncio.timeout(LEASE_READ_TIMEOUT):
                                if not await reader.read(4096):
                                    break
                finally:
                    writer.close()
            except (OSError, TimeoutError):
                pass
            self.attached.clear()
            await asyncio.sleep(LEASE_RETRY)

    async def close(self) -> None:
        if self._lease is not None:
            self._lease.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lease
            self._lease = None
        await super().close()
        if self._address is not None:
            self._address.close()
            self._address = None

    def follow_to_end(
        self, operation_id: str, *, since: int | None = None
    ) -> AsyncIterator[api.OperationEvent | api.OperationResponse]:
        """`events(follow=True)`, then the operation's record once `completion` came: the engine sends it
        on the same stream, so a follower needs no request after the run ended."""
        return self._follow_events(operation_id, follow=True, spid=None, since=since, record=True)

    async def list_images(self, query: ImageQuery) -> list[api.Image]:
        if self._session is None:
            # Nothing has needed the HTTP client yet (start-up: the instructions list the images), so
            # this one request goes through the stdlib control client instead of loading aiohttp.
            path = f"/v1/images?{urlencode(self._image_query(query))}"
            try:
                listing = await asyncio.to_thread(control.get_json, self.socket, path, api.ImageListResponse)
                return listing.images
            except control.ControlError as exc:
                if exc.status < 500 and exc.status not in (425, 429):
                    raise error_for_status(exc.status, exc.message) from None
            except (control.ServiceGone, control.ServiceUnresponsive, OSError):
                pass
            # the HTTP client retries, reconnects (or starts a successor), or says why it cannot
        return await super().list_images(query)

    # ------------------------------------------------------------ what the engine adds to the API

    async def image_lineage(self, image_uuid: str) -> ImageLineage:
        """Parent, children, ancestors, root and depth (the engine's own records, `LineageReader`)."""
        url = self._engine_url(control.LINEAGE_PATH.format(uuid=self._image(image_uuid)))
        return await self._json(ImageLineage, "GET", url)

    async def import_image(self, request: api.ImageImportRequest) -> str:
        if self.import_roots is None:
            return await super().import_image(request)
        payload = control.ServiceImport(request=request, local_roots=list(self.import_roots))
        result = await self._json(
            api.ImageImportResponse,
            "POST",
            self._engine_url(control.IMPORT_PATH),
            payload=payload,
            idempotent=False,
            ok=(201, 200),
        )
        return result.uuid

    async def _post_msgpack(self, path: str, payload: Any, *, ok: Sequence[int] = (200,)) -> bytes:
        # Everything here is content-addressed, so a replay is harmless: idempotent.
        response = await self._request(
            "POST",
            self._engine_url(path),
            body=_msgpack.encode(payload),
            content_type=control.MSGPACK,
            idempotent=True,
            ok=ok,
        )
        try:
            return await response.read()
        finally:
            response.release()


class ServiceChunkStore:
    """The service's sync chunk store (xxh3-128 chunks, assembled into file blobs by the engine)."""

    def __init__(self, backend: ServiceBackend) -> None:
        self._backend = backend
        self.target = f"engine:{backend.home / 'blobs'}"

    async def missing_chunks(self, digests: Sequence[str]) -> set[str]:
        raw = await self._backend._post_msgpack(control.CHUNKS_MISSING_PATH, list(digests))
        return set(_strings.decode(raw))

    async def put_chunks(self, items: Sequence[tuple[str, bytes]]) -> None:
        await self._backend._post_msgpack(control.CHUNKS_PATH, list(items), ok=(204, 200))

    async def put_files(self, datas: Sequence[bytes]) -> list[api.FileResponse]:
        raw = await self._backend._post_msgpack(control.FILES_BATCH_PATH, list(datas))
        return _file_responses.decode(raw)

    async def assemble(self, digests: Sequence[str]) -> api.FileResponse:
        raw = await self._backend._post_msgpack(control.FILES_ASSEMBLE_PATH, list(digests))
        return _file_response.decode(raw)

    async def missing_files(self, refs: Sequence[str]) -> set[str]:
        raw = await self._backend._post_msgpack(control.FILES_MISSING_PATH, list(refs))
        return set(_strings.decode(raw))
