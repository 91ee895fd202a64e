"""`build_app`: the aiohttp application serving a Backend at `/v1`, with auth and error mapping."""

from __future__ import annotations

import errno
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

from contree import api
from contree.backend import Backend
from contree.errors import BackendError
from contree.rest import sandbox_routes
from contree.rest.guard import RequestGuard
from contree.rest.handlers import Handlers

log = logging.getLogger("contree.rest")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_encoder = msgspec.json.Encoder()


# Statuses whose clients are told to come back: they always carry Retry-After (1 s unless the backend
# suggested a delay).
RETRY_STATUSES = frozenset((425, 429, 503))


def error_response(status: int, message: str, *, retry_after: float | None = None) -> web.Response:
    if retry_after is None and status in RETRY_STATUSES:
        retry_after = 1
    headers = {"Retry-After": str(max(0, round(retry_after)))} if retry_after is not None else None
    body = _encoder.encode(api.Error(error=message, status=status))
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _auth_middleware(token: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    expected = token.encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Both styles are accepted: JWT (bearer only) and IAM (bearer + Project, which a single-namespace
        # engine has no use for). compare_digest keeps the comparison constant-time.
        given = _bearer(request)
        if given is None or not hmac.compare_digest(given.encode(), expected):
            return error_response(401, "missing or invalid bearer token")
        return await handler(request)

    return auth


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BackendError as exc:
        if exc.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, exc.message)
        return error_response(exc.status, exc.message, retry_after=exc.retry_after)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return error_response(400, f"invalid request body: {exc}")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, exc.reason)
        if "Allow" in exc.headers:  # a 405 names the methods the resource has (RFC 9110 §15.5.6)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except (ConnectionResetError, TimeoutError):
        raise
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:  # a client-supplied path no filesystem can hold
            return error_response(400, "path or file name too long")
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal server error")
    except Exception:
        # The traceback goes to our log only; the Error schema's `traceback` is never filled (§14 #20).
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal server error")


def build_app(
    backend: Backend,
    *,
    token: str | None = None,
    guard: RequestGuard | None = None,
    keepalive: float = 15.0,
    client_max_size: int = 256 << 20,
) -> web.Application:
    """Serve `backend` at `/v1`. With `token`, every request needs `Authorization: Bearer <token>`.
    `guard` (default: a loopback listener's) refuses what a web page could make a browser send.

    `client_max_size` caps JSON request bodies (spawn stdin is inline); `POST /files` streams and has
    no cap."""
    middlewares: list[Any] = [_error_middleware]
    if token:
        middlewares.insert(0, _auth_middleware(token))
    middlewares.insert(0, (guard or RequestGuard()).middleware(error_response))
    app = web.Application(middlewares=middlewares, client_max_size=client_max_size)
    h = Handlers(backend, keepalive=keepalive)
    r = app.router
    r.add_get("/v1/images", h.list_images)
    r.add_patch("/v1/images/{uuid}/tag", h.set_tag)
    r.add_delete("/v1/images/{uuid}/tag", h.delete_tag)
    r.add_delete("/v1/images/{uuid}", h.delete_image)
    r.add_get("/v1/engine/disk_usage", h.disk_usage)
    r.add_post("/v1/images/import", h.import_image)
    r.add_post("/v1/files", h.upload_file)
    r.add_get("/v1/files", h.list_files)
    r.add_get("/v1/files/{sha256}", h.get_file, allow_head=False)
    r.add_head("/v1/files/{sha256}", h.head_file)
    r.add_post("/v1/instances", h.spawn)
    r.add_get("/v1/operations", h.list_operations)
    r.add_get("/v1/operations/{op}", h.get_operation)
    r.add_delete("/v1/operations/{op}", h.cancel_operation)
    r.add_get("/v1/operations/{op}/events", h.events, allow_head=False)
    r.add_post("/v1/operations/{op}/subprocesses", h.create_subprocess)
    r.add_get("/v1/operations/{op}/subprocesses/{spid}", h.get_subprocess)
    r.add_delete("/v1/operations/{op}/subprocesses/{spid}", h.kill_subprocess)
    r.add_post("/v1/operations/{op}/subprocesses/{spid}/stdin", h.write_stdin)
    r.add_get("/v1/operations/{op}/subprocesses/{spid}/{stream:stdout|stderr}", h.read_output)
    r.add_get("/v1/inspect", h.inspect_root_redirect)
    r.add_get("/v1/inspect/", h.inspect_by_tag)
    r.add_get("/v1/inspect/{uuid}", h.inspect_image_redirect)
    r.add_get("/v1/inspect/{uuid}/", h.inspect_image)
    r.add_get("/v1/inspect/{uuid}/download", h.download, allow_head=False)
    r.add_head("/v1/inspect/{uuid}/download", h.head_download)
    r.add_get("/v1/inspect/{uuid}/archive", h.archive, allow_head=False)
    r.add_head("/v1/inspect/{uuid}/archive", h.head_archive)
    r.add_get("/v1/inspect/{uuid}/list", h.list_directory)
    r.add_get("/v1/inspect/{uuid}/grep", h.grep)
    r.add_get("/v1/whoami", h.whoami)
    sandbox_routes.add_routes(r, backend)
    return app
