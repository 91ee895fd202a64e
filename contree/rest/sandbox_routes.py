"""`/v1/sandboxes`: the long-lived sandbox extension of the REST API (shapes in `contree.sandbox_api`).

Served for backends that are a `SandboxHost` (the embedded engine); for any other backend the routes
answer 404 naming the missing capability, as a server without the extension (the Contree cloud) does.
"""

from __future__ import annotations

from aiohttp import web

from contree.backend import Backend
from contree.errors import NotFound
from contree.rest import params
from contree.rest.handlers import decode_body, json_response
from contree.sandbox_api import PortRequest, SandboxHost, SandboxList, SandboxRequest, StopSandboxRequest


class SandboxHandlers:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def _host(self) -> SandboxHost:
        if not isinstance(self.backend, SandboxHost):
            raise NotFound("this backend has no long-lived sandboxes")
        return self.backend

    @staticmethod
    def _id(request: web.Request) -> str:
        return params.operation_uuid(request.match_info["sandbox"])

    async def start(self, request: web.Request) -> web.StreamResponse:
        body = await decode_body(request, SandboxRequest)
        info = await self._host().start_sandbox(body)
        return json_response(info, status=201, headers={"Location": f"/v1/sandboxes/{info.uuid}"})

    async def list(self, request: web.Request) -> web.StreamResponse:
        return json_response(SandboxList(sandboxes=await self._host().list_sandboxes()))

    async def get(self, request: web.Request) -> web.StreamResponse:
        return json_response(await self._host().get_sandbox(self._id(request)))

    async def expose_port(self, request: web.Request) -> web.StreamResponse:
        body = await decode_body(request, PortRequest)
        return json_response(await self._host().expose_port(self._id(request), body.port))

    async def close_port(self, request: web.Request) -> web.StreamResponse:
        port = params.int_value(request.match_info["port"], "port", lo=1, hi=65535)
        await self._host().close_port(self._id(request), port)
        return web.Response(status=204)

    async def snapshot(self, request: web.Request) -> web.StreamResponse:
        snapshot = await self._host().snapshot_sandbox(self._id(request))
        return json_response(snapshot, status=201)

    async def stop(self, request: web.Request) -> web.StreamResponse:
        body = StopSandboxRequest()
        if request.can_read_body:
            body = await decode_body(request, StopSandboxRequest)
        return json_response(await self._host().stop_sandbox(self._id(request), body))


def add_routes(router: web.UrlDispatcher, backend: Backend) -> None:
    h = SandboxHandlers(backend)
    router.add_post("/v1/sandboxes", h.start)
    router.add_get("/v1/sandboxes", h.list)
    router.add_get("/v1/sandboxes/{sandbox}", h.get)
    router.add_post("/v1/sandboxes/{sandbox}/ports", h.expose_port)
    router.add_delete("/v1/sandboxes/{sandbox}/ports/{port}", h.close_port)
    router.add_post("/v1/sandboxes/{sandbox}/snapshot", h.snapshot)
    router.add_post("/v1/sandboxes/{sandbox}/stop", h.stop)
