"""Request handlers: HTTP ↔ Backend calls, exactly as `contree-openapi.yaml` specifies each route."""

from __future__ import annotations

import contextlib
import signal as signals
from collections.abc import AsyncIterator
from typing import Any, TypeVar
from urllib.parse import quote

import msgspec
from aiohttp import web

from contree import api
from contree.backend import (
    MAX_OUTPUT_PAGE,
    Backend,
    EngineAdmin,
    FileQuery,
    GrepQuery,
    ImageQuery,
    OperationQuery,
    OutputPage,
    OutputReader,
)
from contree.errors import BadRequest, NotFound
from contree.rest import params, sse
from contree.rest.events import stream_events
from contree.sandbox_api import MAX_WAIT, SandboxHost

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder[Any]] = {}

# Seconds a client should wait before polling an operation again (Retry-After on GET /operations/{id}).
POLL_INTERVAL_RUNNING = 1
WRITE_CHUNK = 256 * 1024
POLL_INTERVAL_QUEUED = 2


OUTPUT_HEADER = "Contree-Output-"


def output_headers(page: OutputPage) -> dict[str, str]:
    headers = {
        OUTPUT_HEADER + "Offset": str(page.offset),
        OUTPUT_HEADER + "Total": str(page.total),
        OUTPUT_HEADER + "Complete": "1" if page.complete else "0",
        OUTPUT_HEADER + "Dropped": str(page.dropped),
    }
    if page.quota is not None:
        headers[OUTPUT_HEADER + "Quota"] = str(page.quota)
    return headers


def json_response(value: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=_encoder.encode(value), content_type="application/json", headers=headers
    )


async def decode_body(request: web.Request, kind: type[T]) -> T:
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    body = await request.read()
    if not body:
        raise BadRequest("request body is required")
    result: T = decoder.decode(body)
    return result


async def _first(iterator: AsyncIterator[bytes]) -> bytes | None:
    """Pull the first chunk before committing to 200, so a 404/422 still gets its own status."""
    try:
        return await anext(iterator)
    except StopAsyncIteration:
        return None


async def _stream_bytes(
    request: web.Request, iterator: AsyncIterator[bytes], response: web.StreamResponse
) -> web.StreamResponse:
    try:
        first = await _first(iterator)
        await response.prepare(request)
        # Backends may yield small chunks; one write per ≥256 KiB keeps syscalls and frames few.
        pending = bytearray(first or b"")
        if first is not None:
            async for chunk in iterator:
                pending += chunk
                if len(pending) >= WRITE_CHUNK:
                    await response.write(bytes(pending))
                    pending.clear()
        if pending:
            await response.write(bytes(pending))
        await response.write_eof()
        return response
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


def archive_filename(path: str) -> str:
    stem = path.strip("/").replace("/", "_")
    return f"{stem or 'root'}.tar"


class Handlers:
    def __init__(self, backend: Backend, *, keepalive: float) -> None:
        self.backend = backend
        self.keepalive = keepalive

    # ------------------------------------------------------------ images

    async def list_images(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        limit, offset = params.paging(q)
        tag = q.get("tag")
        uuid = q.get("uuid")
        if uuid is not None:
            uuid = params.image_uuid(uuid)
        kind = params.integer(q, "kind", None, lo=0, hi=1)
        query = ImageQuery(
            limit=limit,
            offset=offset,
            tagged=(q.get("tagged") is not None and q.get("tagged") != "0") or bool(tag),
            tag=tag or None,
            uuid=uuid,
            since=params.time_filter(q, "since"),
            until=params.time_filter(q, "until"),
            kind=kind,
        )
        images = await self.backend.list_images(query)
        return json_response(api.ImageListResponse(images=images))

    async def set_tag(self, request: web.Request) -> web.StreamResponse:
        uuid = params.image_uuid(request.match_info["uuid"])
        body = await decode_body(request, api.ImageTagRequest)
        if not body.tag:
            raise BadRequest("tag must not be empty")
        return json_response(await self.backend.set_tag(uuid, body.tag))

    async def delete_tag(self, request: web.Request) -> web.StreamResponse:
        # The spec lists no 400 here: a malformed UUID names no image, so 404.
        uuid = params.image_uuid(request.match_info["uuid"], missing=NotFound)
        await self.backend.delete_tag(uuid, request.query.get("tag") or None)
        return web.Response(status=204)

    def _admin(self) -> EngineAdmin:
        if not isinstance(self.backend, EngineAdmin):
            raise NotFound("this backend does not manage its own disk")
        return self.backend

    async def delete_image(self, request: web.Request) -> web.StreamResponse:
        """Extension (not in the Contree API): delete an untagged, unused image; 200 {freed_bytes}."""
        uuid = params.image_uuid(request.match_info["uuid"], missing=NotFound)
        freed = await self._admin().delete_image(uuid)
        return json_response({"uuid": uuid, "freed_bytes": freed})

    async def disk_usage(self, request: web.Request) -> web.StreamResponse:
        """Extension (not in the Contree API): what the engine home holds."""
        return json_response(await self._admin().disk_usage())

    async def import_image(self, request: web.Request) -> web.StreamResponse:
        body = await decode_body(request, api.ImageImportRequest)
        op = await self.backend.import_image(body)
        return json_response(
            api.ImageImportResponse(uuid=op), status=201, headers={"Location": f"/v1/operations/{op}"}
        )

    # ------------------------------------------------------------ files

    async def upload_file(self, request: web.Request) -> web.StreamResponse:
        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in request.content.iter_chunked(1 << 20):
                yield chunk

        result = await self.backend.upload_file(chunks())
        return json_response(result, status=201)

    async def list_files(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        limit, offset = params.paging(q)
        since, until = params.time_filter(q, "since"), params.time_filter(q, "until")
        query = FileQuery(limit=limit, offset=offset, since=since, until=until)
        return json_response(api.FilesListResponse(files=await self.backend.list_files(query)))

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        return json_response(await self.backend.get_file(params.sha256(request.match_info["sha256"])))

    async def head_file(self, request: web.Request) -> web.StreamResponse:
        await self.backend.get_file(params.sha256(request.match_info["sha256"]))
        return web.Response(status=200)

    # ------------------------------------------------------------ instances and operations

    async def spawn(self, request: web.Request) -> web.StreamResponse:
        body = await decode_body(request, api.InstanceSpawnRequest)
        if body.truncate_output_at > api.MAX_TRUNCATE_OUTPUT_AT:
            raise BadRequest(f"truncate_output_at must be <= {api.MAX_TRUNCATE_OUTPUT_AT}")
        result = await self.backend.spawn(body)
        return json_response(result, status=201, headers={"Location": f"/v1/operations/{result.uuid}"})

    async def list_operations(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        limit, offset = params.paging(q)
        query = OperationQuery(
            limit=limit,
            offset=offset,
            status=params.status_filter(q),
            kind=params.kind_filter(q),
            since=params.time_filter(q, "since"),
            until=params.time_filter(q, "until"),
        )
        return json_response(await self.backend.list_operations(query))

    async def get_operation(self, request: web.Request) -> web.StreamResponse:
        op = params.operation_uuid(request.match_info["op"])
        result = await self.backend.get_operation(op, inflight=params.flag(request.query, "inflight"))
        wait = POLL_INTERVAL_QUEUED if result.status == "PENDING" else POLL_INTERVAL_RUNNING
        return json_response(_operation_body(result), headers={"Retry-After": str(wait)})

    async def cancel_operation(self, request: web.Request) -> web.StreamResponse:
        await self.backend.cancel_operation(params.operation_uuid(request.match_info["op"]))
        return web.Response(status=202)

    async def events(self, request: web.Request) -> web.StreamResponse:
        op = params.operation_uuid(request.match_info["op"])
        q = request.query
        follow = params.flag(q, "follow")
        spid = params.integer(q, "spid", None, lo=0)
        since = params.integer(q, "since", None, lo=0)
        last = request.headers.get("Last-Event-Id")
        if last is not None and last.strip():
            since = params.int_value(last, "Last-Event-Id", lo=0)
        iterator = self.backend.events(op, follow=follow, spid=spid, since=since)
        record = None
        if params.flag(q, "record"):
            # beyond the API: a stream that ends with `completion` then carries the operation's record, so
            # a follower needs no GET for it (the engine service's clients ask for this)
            async def record() -> bytes:
                final = await self.backend.get_operation(op)
                return sse.record_frame(_encoder.encode(_operation_body(final)))

        return await stream_events(request, iterator, keepalive=self.keepalive, record=record)

    async def create_subprocess(self, request: web.Request) -> web.StreamResponse:
        op = params.operation_uuid(request.match_info["op"])
        spec = await decode_body(request, api.ExecSpec)
        spid = await self.backend.create_subprocess(op, spec)
        return json_response(
            api.SubprocessCreateResponse(spid=spid),
            status=201,
            headers={"Location": f"/v1/operations/{op}/subprocesses/{spid}"},
        )

    def _spid(self, request: web.Request) -> int:
        return params.int_value(request.match_info["spid"], "spid", lo=1)

    async def get_subprocess(self, request: web.Request) -> web.StreamResponse:
        op = params.operation_uuid(request.match_info["op"])
        wait = params.integer(request.query, "wait", None, lo=0, hi=MAX_WAIT)
        if wait and isinstance(self.backend, SandboxHost):  # extension: a long poll until it exits
            return json_response(await self.backend.wait_subprocess(op, self._spid(request), wait))
        return json_response(await self.backend.get_subprocess(op, self._spid(request)))

    async def read_output(self, request: web.Request) -> web.StreamResponse:
        """Extension (not in the Contree API): a page of a process's whole stored stdout/stderr as raw
        bytes; the page's place in the stream is in `Contree-Output-*` headers (`output_headers`)."""
        op = params.operation_uuid(request.match_info["op"])
        if not isinstance(self.backend, OutputReader):
            raise NotFound("this backend keeps no output beyond the event log")
        q = request.query
        page = await self.backend.read_output(
            op,
            request.match_info["stream"],
            spid=self._spid(request),
            offset=params.integer(q, "offset", 0, lo=0, hi=params.MAX_OFFSET) or 0,
            limit=params.integer(q, "limit", MAX_OUTPUT_PAGE, lo=0, hi=MAX_OUTPUT_PAGE) or 0,
            tail=params.flag(q, "tail"),
        )
        return web.Response(
            body=page.data, content_type="application/octet-stream", headers=output_headers(page)
        )

    async def kill_subprocess(self, request: web.Request) -> web.StreamResponse:
        op = params.operation_uuid(request.match_info["op"])
        spid = self._spid(request)
        signal = request.query.get("signal")
        await self.backend.kill_subprocess(op, spid, _parse_signal(signal) if signal is not None else None)
        return web.Response(status=204)

    async def write_stdin(self, request: web.Request) -> web.StreamResponse:
        op = params.operation_uuid(request.match_info["op"])
        spid = self._spid(request)
        chunk = await decode_body(request, api.ClosableStreamRepr)
        try:
            api.decode_stream(chunk)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        await self.backend.write_stdin(op, spid, chunk)
        return web.Response(status=204)

    # ------------------------------------------------------------ inspect

    async def inspect_root_redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(_with_query("/v1/inspect/", request))

    async def inspect_image_redirect(self, request: web.Request) -> web.StreamResponse:
        # The spec documents only the 307 here; the target validates the UUID (400/404).
        raise web.HTTPTemporaryRedirect(f"/v1/inspect/{quote(request.match_info['uuid'], safe='')}/")

    async def inspect_by_tag(self, request: web.Request) -> web.StreamResponse:
        tag = params.required(request.query, "tag")
        if tag.startswith("tag:"):
            tag = tag[4:]
        uuid = await self.backend.resolve_tag(tag)
        raise web.HTTPFound(f"/v1/inspect/{uuid}/")

    async def inspect_image(self, request: web.Request) -> web.StreamResponse:
        return json_response(await self.backend.get_image(params.image_uuid(request.match_info["uuid"])))

    async def download(self, request: web.Request) -> web.StreamResponse:
        uuid = params.image_uuid(request.match_info["uuid"])
        path = params.required(request.query, "path")
        text = params.flag(request.query, "text")
        response = web.StreamResponse()
        response.content_type = "text/plain" if text else "application/octet-stream"
        if text:
            response.charset = "utf-8"
        return await _stream_bytes(request, self.backend.download(uuid, path), response)

    async def head_download(self, request: web.Request) -> web.StreamResponse:
        uuid = params.image_uuid(request.match_info["uuid"])
        await self.backend.check_file(uuid, params.required(request.query, "path"))
        return web.Response(status=200)

    async def archive(self, request: web.Request) -> web.StreamResponse:
        uuid = params.image_uuid(request.match_info["uuid"])
        path = params.required(request.query, "path")
        response = web.StreamResponse()
        response.content_type = "application/x-tar"
        response.headers["Content-Disposition"] = f'attachment; filename="{archive_filename(path)}"'
        return await _stream_bytes(request, self.backend.archive(uuid, path), response)

    async def head_archive(self, request: web.Request) -> web.StreamResponse:
        uuid = params.image_uuid(request.match_info["uuid"])
        await self.backend.check_archive(uuid, params.required(request.query, "path"))
        return web.Response(status=200)

    async def list_directory(self, request: web.Request) -> web.StreamResponse:
        uuid = params.image_uuid(request.match_info["uuid"])
        path = params.required(request.query, "path")
        if params.flag(request.query, "text"):
            text = await self.backend.list_directory_text(uuid, path)
            return web.Response(text=text, content_type="text/plain", charset="utf-8")
        return json_response(await self.backend.list_directory(uuid, path))

    async def grep(self, request: web.Request) -> web.StreamResponse:
        uuid = params.image_uuid(request.match_info["uuid"])
        q = request.query
        patterns = params.repeated(q, "pattern", max_items=16, max_len=1024)
        if not patterns:
            raise BadRequest("missing required query parameter: pattern")
        paths = params.repeated(q, "path", max_items=16) or ["/"]
        case = q.get("case", "sensitive")
        if case not in ("sensitive", "insensitive", "smart"):
            raise BadRequest(f"invalid case: {case!r} (expected sensitive, insensitive or smart)")
        query = GrepQuery(
            pattern=patterns,
            path=paths,
            glob=list(q.getall("glob", [])),
            max_count=params.integer(q, "max_count", None, lo=1, hi=10000),
            max_total=params.integer(q, "max_total", 1000, lo=1, hi=10000) or 1000,
            case=case,
            before=params.integer(q, "before", 0, lo=0, hi=50) or 0,
            after=params.integer(q, "after", 0, lo=0, hi=50) or 0,
        )
        return json_response(await self.backend.grep(uuid, query))

    # ------------------------------------------------------------ auth

    async def whoami(self, request: web.Request) -> web.StreamResponse:
        return json_response(await self.backend.whoami())


def _with_query(path: str, request: web.Request) -> str:
    return f"{path}?{request.query_string}" if request.query_string else path


def _parse_signal(value: str) -> str | int:
    """`15`, `TERM` or `SIGTERM`; validated here so an unknown name is a 400, not a backend failure."""
    text = value.strip()
    if text.lstrip("-").isdigit():
        number = int(text)
        if number <= 0 or number >= signals.NSIG:
            raise BadRequest(f"unknown signal: {value!r}")
        return number
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    if not isinstance(getattr(signals, name, None), signals.Signals):
        raise BadRequest(f"unknown signal: {value!r}")
    return name


def _operation_body(result: api.OperationResponse) -> dict[str, Any]:
    body: dict[str, Any] = msgspec.to_builtins(result)
    # `result` and `metadata` are objects, not nullable: absent until known (the client reads None).
    for name in ("result", "metadata"):
        if body.get(name) is None:
            body.pop(name, None)
    return body
