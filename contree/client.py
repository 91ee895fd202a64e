"""`RemoteBackend`: the Backend over the Contree REST API (`{base}/v1`), one method per endpoint.

The requests themselves (session, retries, error mapping, lazy aiohttp) are `contree.client_transport`'s,
an operation's event stream is `contree.client_events`'s, the embedded engine's sandbox extension
`contree.client_sandboxes`'s; all are bases of `RemoteBackend`, and the client's public names stay
importable from here.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import msgspec

from contree import api
from contree.backend import (
    MAX_OUTPUT_PAGE,
    DiskUsage,
    FileQuery,
    GrepQuery,
    ImageQuery,
    OperationQuery,
    OutputPage,
)
from contree.client_events import OperationEvents
from contree.client_sandboxes import SandboxClient
from contree.client_transport import UUID_RE
from contree.client_transport import AuthType as AuthType
from contree.client_transport import default_user_agent as default_user_agent
from contree.client_transport import load_http_client as load_http_client
from contree.client_transport import parse_retry_after as parse_retry_after
from contree.errors import BackendError, BadRequest, NotFound, Unavailable

_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


class _Deleted(msgspec.Struct):
    uuid: str
    freed_bytes: int


class RemoteBackend(OperationEvents, SandboxClient):
    """Backend over HTTP. `auth_type="iam"` sends `Project`; `"jwt"` sends the bearer token only."""

    def __repr__(self) -> str:  # never the token
        return f"RemoteBackend({self.base!r})"

    # ------------------------------------------------------------ images and tags

    @staticmethod
    def _image_query(query: ImageQuery) -> dict[str, str]:
        params: dict[str, str] = {"limit": str(query.limit), "offset": str(query.offset)}
        if query.tagged:
            params["tagged"] = "1"
        for name in ("tag", "uuid", "since", "until"):
            value = getattr(query, name)
            if value is not None:
                params[name] = value
        if query.kind is not None:
            params["kind"] = str(query.kind)
        return params

    async def list_images(self, query: ImageQuery) -> list[api.Image]:
        params = self._image_query(query)
        result = await self._json(api.ImageListResponse, "GET", self._url("images"), params=params)
        return result.images

    async def get_image(self, image_uuid: str) -> api.Image:
        return await self._json(api.Image, "GET", self._url("inspect", self._image(image_uuid), ""))

    async def resolve_tag(self, tag: str) -> str:
        from yarl import URL

        if tag.startswith("tag:"):
            tag = tag[4:]
        if not tag:
            raise BadRequest("empty tag")
        url = self._url("inspect", "")
        response = await self._request(
            "GET", url, params={"tag": tag}, idempotent=True, ok=(200, 301, 302, 303, 307)
        )
        try:
            if response.status == 200:  # a proxy followed the redirect for us
                return msgspec.json.decode(await response.read(), type=api.Image).uuid
            location = response.headers.get("Location", "")
        finally:
            response.release()
        segments = [s for s in URL(location).path.split("/") if s]
        if not segments or not UUID_RE.match(segments[-1]):
            raise Unavailable(f"tag lookup returned an unusable Location: {location!r}")
        return segments[-1]

    async def set_tag(self, image_uuid: str, tag: str) -> api.Image:
        url = self._url("images", self._image(image_uuid), "tag")
        return await self._json(api.Image, "PATCH", url, payload=api.ImageTagRequest(tag=tag))

    async def delete_tag(self, image_uuid: str, tag: str | None = None) -> None:
        params = {"tag": tag} if tag else None
        await self._empty(
            "DELETE", self._url("images", self._image(image_uuid), "tag"), ok=(204, 200), params=params
        )

    async def delete_image(self, image_uuid: str) -> int:
        """The embedded engine's image deletion (`DELETE /images/{uuid}`, beyond the Contree API). The
        cloud has no such endpoint (404/405): it collects untagged images itself."""
        url = self._url("images", self._image(image_uuid))
        try:
            freed = await self._json(_Deleted, "DELETE", url, ok=(200,))
        except BackendError as exc:
            if exc.status == 405:
                raise NotFound("this server cannot delete images") from None
            raise
        return freed.freed_bytes

    async def disk_usage(self) -> DiskUsage:
        return await self._json(DiskUsage, "GET", self._url("engine", "disk_usage"))

    async def import_image(self, request: api.ImageImportRequest) -> str:
        result = await self._json(
            api.ImageImportResponse,
            "POST",
            self._url("images", "import"),
            payload=request,
            idempotent=False,
            ok=(201, 200),
        )
        return result.uuid

    # ------------------------------------------------------------ files

    async def upload_file(self, data: bytes | AsyncIterator[bytes]) -> api.FileResponse:
        url = self._url("files")
        if isinstance(data, bytes | bytearray | memoryview):
            # Uploads are content-addressed (a replay dedups), so bytes bodies are safe to retry.
            response = await self._request(
                "POST",
                url,
                body=bytes(data),
                content_type="application/octet-stream",
                idempotent=True,
                ok=(201, 200),
            )
        else:
            response = await self._upload_stream(url, data)
        try:
            return msgspec.json.decode(await response.read(), type=api.FileResponse)
        finally:
            response.release()

    async def get_file(self, sha256: str) -> api.File:
        if not _SHA256_RE.match(sha256):
            raise NotFound(f"file not found: {sha256!r} is not a sha256 digest")
        return await self._json(api.File, "GET", self._url("files", sha256.lower()))

    async def list_files(self, query: FileQuery) -> list[api.File]:
        params = {"limit": str(query.limit), "offset": str(query.offset)}
        if query.since is not None:
            params["since"] = query.since
        if query.until is not None:
            params["until"] = query.until
        return (await self._json(api.FilesListResponse, "GET", self._url("files"), params=params)).files

    # ------------------------------------------------------------ instances and operations

    async def spawn(self, request: api.InstanceSpawnRequest) -> api.InstanceSpawnResponse:
        return await self._json(
            api.InstanceSpawnResponse,
            "POST",
            self._url("instances"),
            payload=request,
            idempotent=False,
            ok=(201, 200),
        )

    async def list_operations(self, query: OperationQuery) -> list[api.OperationSummary]:
        params = {"limit": str(query.limit), "offset": str(query.offset)}
        for name in ("status", "kind", "since", "until"):
            value = getattr(query, name)
            if value is not None:
                params[name] = value
        return await self._json(list[api.OperationSummary], "GET", self._url("operations"), params=params)

    async def get_operation(self, operation_id: str, *, inflight: bool = False) -> api.OperationResponse:
        params = {"inflight": "1"} if inflight else None
        url = self._url("operations", self._operation(operation_id))
        return await self._json(api.OperationResponse, "GET", url, params=params)

    async def cancel_operation(self, operation_id: str) -> None:
        await self._empty(
            "DELETE", self._url("operations", self._operation(operation_id)), ok=(202, 200, 204)
        )

    # ------------------------------------------------------------ subprocesses

    async def create_subprocess(self, operation_id: str, spec: api.ExecSpec) -> int:
        url = self._url("operations", self._operation(operation_id), "subprocesses")
        result = await self._json(
            api.SubprocessCreateResponse, "POST", url, payload=spec, idempotent=False, ok=(201, 200)
        )
        return result.spid

    async def get_subprocess(self, operation_id: str, spid: int) -> api.InstanceResult:
        url = self._url("operations", self._operation(operation_id), "subprocesses", str(spid))
        return await self._json(api.InstanceResult, "GET", url)

    async def kill_subprocess(self, operation_id: str, spid: int, signal: str | int | None = None) -> None:
        url = self._url("operations", self._operation(operation_id), "subprocesses", str(spid))
        params = {"signal": str(signal)} if signal is not None else None
        await self._empty("DELETE", url, ok=(204, 200), params=params)

    async def write_stdin(self, operation_id: str, spid: int, chunk: api.ClosableStreamRepr) -> None:
        url = self._url("operations", self._operation(operation_id), "subprocesses", str(spid), "stdin")
        await self._empty("POST", url, ok=(204, 200), payload=chunk, idempotent=False)

    async def read_output(
        self, operation_id: str, stream: str, *, spid: int = 1, offset: int = 0,
        limit: int = MAX_OUTPUT_PAGE, tail: bool = False,
    ) -> OutputPage:
        """The embedded engine's output paging (`GET …/subprocesses/{spid}/stdout|stderr`, beyond the
        Contree API). A server without it answers 404: callers fall back to the event log."""
        import aiohttp

        if stream not in ("stdout", "stderr"):
            raise BadRequest(f"unknown stream {stream!r}: stdout or stderr")
        url = self._url("operations", self._operation(operation_id), "subprocesses", str(spid), stream)
        query = {"offset": str(offset), "limit": str(limit), "tail": "1" if tail else "0"}
        response = await self._request("GET", url, params=query, idempotent=True)
        try:
            data = await response.read()
            head = response.headers
            total = head.get("Contree-Output-Total")
            if total is None:
                raise NotFound(f"GET {url.path}: not an output page (the server keeps no whole output)")
            quota = head.get("Contree-Output-Quota")
            return OutputPage(
                data=data,
                offset=int(head.get("Contree-Output-Offset", offset)),
                total=int(total),
                complete=head.get("Contree-Output-Complete") == "1",
                dropped=int(head.get("Contree-Output-Dropped", 0)),
                quota=int(quota) if quota is not None else None,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(f"GET {url.path}: reading the response failed: {exc}") from None
        except ValueError as exc:
            raise Unavailable(f"GET {url.path}: malformed output headers: {exc}") from None
        finally:
            response.release()

    # ------------------------------------------------------------ inspect

    async def list_directory(self, image_uuid: str, path: str) -> api.DirectoryList:
        url = self._url("inspect", self._image(image_uuid), "list")
        return await self._json(api.DirectoryList, "GET", url, params={"path": path})

    async def list_directory_text(self, image_uuid: str, path: str) -> str:
        url = self._url("inspect", self._image(image_uuid), "list")
        response = await self._request("GET", url, params={"path": path, "text": "1"}, idempotent=True)
        try:
            return (await response.read()).decode("utf-8", "replace")
        finally:
            response.release()

    def download(self, image_uuid: str, path: str) -> AsyncIterator[bytes]:
        return self._stream(("inspect", image_uuid, "download"), {"path": path})

    async def check_file(self, image_uuid: str, path: str) -> None:
        url = self._url("inspect", self._image(image_uuid), "download")
        await self._empty("HEAD", url, ok=(200,), params={"path": path})

    def archive(self, image_uuid: str, path: str) -> AsyncIterator[bytes]:
        return self._stream(("inspect", image_uuid, "archive"), {"path": path})

    async def check_archive(self, image_uuid: str, path: str) -> None:
        url = self._url("inspect", self._image(image_uuid), "archive")
        await self._empty("HEAD", url, ok=(200,), params={"path": path})

    async def grep(self, image_uuid: str, query: GrepQuery) -> api.GrepResult:
        params: list[tuple[str, str]] = [("pattern", p) for p in query.pattern]
        params += [("path", p) for p in query.path]
        params += [("glob", g) for g in query.glob]
        if query.max_count is not None:
            params.append(("max_count", str(query.max_count)))
        params += [
            ("max_total", str(query.max_total)),
            ("case", query.case),
            ("before", str(query.before)),
            ("after", str(query.after)),
        ]
        url = self._url("inspect", self._image(image_uuid), "grep")
        return await self._json(api.GrepResult, "GET", url, params=params)

    async def whoami(self) -> api.WhoAmIResponse:
        return await self._json(api.WhoAmIResponse, "GET", self._url("whoami"))
