"""`RemoteBackend`: the Backend over the Contree REST API (`{base}/v1`) with one aiohttp session.

Retry policy (CONTREE-API §3, COMPAT §15 #24): 425 and 429 mean the request was not processed, so any
request is retried; connection failures before the request reached the server (connect errors) too.
5xx, timeouts and dropped connections are retried only for idempotent requests — never for
`POST /instances`, `POST …/subprocesses` or stdin writes, where a replay could run something twice.
Waits grow exponentially and honour `Retry-After`.

aiohttp is imported where a request is made, not with this module (its import alone costs a start
~110 ms): an MCP server answers `initialize` before it needs its backend's HTTP client.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast
from urllib.parse import quote, urlsplit

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
from contree.client_sandboxes import SandboxClient
from contree.errors import BackendError, BadRequest, NotFound, Unavailable, error_for_status
from contree.rest.sse import RECORD_EVENT, SseParser
from contree.version import VERSION

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

log = logging.getLogger("contree.client")

T = TypeVar("T")
AuthType = Literal["jwt", "iam"]

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_ALWAYS_RETRY = frozenset((425, 429))
HEALTHY_STREAM_SECONDS = 5.0
STREAM_END_SECONDS = 1.0  # how long a finished event stream may take to end (else its connection closes)
_IDEMPOTENT_RETRY = frozenset((500, 502, 503, 504))
_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(api.OperationEvent)
_operation_decoder = msgspec.json.Decoder(api.OperationResponse)


async def _read_to_end(response: aiohttp.ClientResponse) -> None:
    """The end of a stream past `completion` (the server closes it right after, the record at most in
    between). Read, the connection goes back to the pool for the next request; released before its end,
    it would be closed. Also when the reader left early (the generator's clean-up runs then)."""
    import aiohttp

    if response.content.is_eof():
        return
    try:
        async with asyncio.timeout(STREAM_END_SECONDS):
            while await response.content.readany():
                pass
    except (aiohttp.ClientError, TimeoutError):
        pass


class _Deleted(msgspec.Struct):
    uuid: str
    freed_bytes: int


def load_http_client() -> None:
    """Import what the first request needs. A server calls this in a worker thread once it has answered
    `initialize`, so that neither the handshake nor the first tool call waits for the import."""
    import aiohttp  # noqa: F401
    import yarl  # noqa: F401


def default_user_agent() -> str:
    import platform

    import aiohttp

    return (
        f"contree-mcp/{VERSION} aiohttp/{aiohttp.__version__} "
        f"Python/{platform.python_version()} {platform.system()}"
    )


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or HTTP date); None when absent or junk."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class RemoteBackend(SandboxClient):
    """Backend over HTTP. `auth_type="iam"` sends `Project`; `"jwt"` sends the bearer token only."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None,
        project: str | None = None,
        auth_type: AuthType = "jwt",
        user_agent: str | None = None,
        timeout: float = 300.0,
        connect_timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        if auth_type not in ("jwt", "iam"):
            raise ValueError(f"auth_type must be 'jwt' or 'iam', not {auth_type!r}")
        if auth_type == "iam" and not project:
            raise ValueError("IAM auth requires a project ID")
        root = base_url.rstrip("/")
        if not root.endswith("/v1"):
            root += "/v1"
        scheme = urlsplit(root).scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"API URL must be http(s): {base_url!r}")
        self.base = root
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._headers = {"User-Agent": user_agent or default_user_agent(), "Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        if auth_type == "iam" and project:
            self._headers["Project"] = project
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never the token
        return f"RemoteBackend({self.base!r})"

    # ------------------------------------------------------------ transport

    def _get_session(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout, sock_connect=self.connect_timeout),
                connector=self._make_connector(),
            )
        return self._session

    def _make_connector(self) -> aiohttp.BaseConnector | None:
        """The connector of a new session; None = TCP (a subclass may reach its server otherwise)."""
        return None

    async def _reconnect(self) -> bool:
        """Called when connecting failed: True when the server was brought back (the request is then
        sent once more at once). A plain API server cannot be restarted from here."""
        return False

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    def _url(self, *segments: str) -> URL:
        from yarl import URL

        path = "/".join(quote(s, safe="") for s in segments)
        return URL(f"{self.base}/{path}", encoded=True)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        base: float = min(self.max_backoff, self.backoff * (2**attempt))
        return base * (0.5 + random.random() / 2)  # jitter so many clients do not retry in lockstep

    async def _request(
        self,
        method: str,
        url: URL,
        *,
        params: Sequence[tuple[str, str]] | Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
        idempotent: bool,
        ok: Sequence[int] = (200,),
        stream: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """Send with retries; return the response for an `ok` status (caller releases it)."""
        import aiohttp

        session = self._get_session()
        req_headers = dict(headers or {})
        if body is not None:
            req_headers["Content-Type"] = content_type
        extra: dict[str, Any] = {}
        if stream:
            # Streams may legitimately stay open for long; then only the idle time between chunks is bounded.
            extra["timeout"] = aiohttp.ClientTimeout(
                total=None, sock_connect=self.connect_timeout, sock_read=self.timeout
            )
        attempt = timeouts = 0
        reconnected = False
        while True:
            try:
                response = await session.request(
                    method,
                    url,
                    params=params,
                    data=body,
                    headers=req_headers,
                    allow_redirects=False,
                    **extra,
                )
            except (aiohttp.ClientConnectorError, aiohttp.ClientConnectionError, TimeoutError) as exc:
                # A connect error means nothing reached the server; other drops may have been processed.
                refused = isinstance(exc, aiohttp.ClientConnectorError)
                if refused and not reconnected and await self._reconnect():
                    reconnected = True
                    session = self._get_session()
                    continue
                safe = idempotent or refused
                # A server that let a whole request time out gets one more chance, not `retries` more
                # full timeouts (which would turn a 300 s limit into half an hour).
                if isinstance(exc, TimeoutError):
                    timeouts += 1
                    safe = safe and timeouts <= 1
                if not safe or attempt >= self.retries:
                    raise Unavailable(
                        f"{method} {url.path}: connection failed: {exc or type(exc).__name__}"
                    ) from None
                await asyncio.sleep(self._delay(attempt, None))
                attempt += 1
                continue
            if response.status in ok:
                return response
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            retryable = response.status in _ALWAYS_RETRY or (
                idempotent and response.status in _IDEMPOTENT_RETRY
            )
            if retryable and attempt < self.retries:
                response.release()
                log.debug("%s %s: %d, retrying", method, url.path, response.status)
                await asyncio.sleep(self._delay(attempt, retry_after))
                attempt += 1
                continue
            raise await self._error(method, url, response, retry_after)

    async def _error(
        self, method: str, url: URL, response: aiohttp.ClientResponse, retry_after: float | None
    ) -> BackendError:
        import aiohttp

        try:
            raw = await response.content.read(64 * 1024) if method != "HEAD" else b""
        except (aiohttp.ClientError, TimeoutError):
            raw = b""
        finally:
            response.release()
        message = ""
        if raw:
            try:
                # Error.traceback is dropped here: server internals never reach the caller (§14 #20).
                message = msgspec.json.decode(raw, type=api.Error).message()
            except msgspec.MsgspecError:
                message = raw.decode("utf-8", "replace").strip()[:500]
        if not message:
            message = f"{method} {url.path}: HTTP {response.status} {response.reason or ''}".strip()
        return error_for_status(response.status, message, retry_after=retry_after)

    async def _json(
        self,
        kind: type[T],
        method: str,
        url: URL,
        *,
        idempotent: bool = True,
        ok: Sequence[int] = (200,),
        params: Sequence[tuple[str, str]] | Mapping[str, str] | None = None,
        payload: Any = None,
    ) -> T:
        import aiohttp

        body = _encoder.encode(payload) if payload is not None else None
        attempt = 0
        while True:
            response = await self._request(
                method, url, params=params, body=body, idempotent=idempotent, ok=ok
            )
            try:
                raw = await response.read()
                break
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The body broke off mid-way: an idempotent request is simply asked again.
                if not idempotent or attempt >= self.retries:
                    raise Unavailable(f"{method} {url.path}: reading the response failed: {exc}") from None
            finally:
                response.release()
            await asyncio.sleep(self._delay(attempt, None))
            attempt += 1
        try:
            return msgspec.json.decode(raw, type=kind)
        except msgspec.MsgspecError as exc:
            raise Unavailable(f"{method} {url.path}: malformed response: {exc}") from None

    async def _empty(
        self,
        method: str,
        url: URL,
        *,
        ok: Sequence[int],
        idempotent: bool = True,
        params: Any = None,
        payload: Any = None,
    ) -> None:
        body = _encoder.encode(payload) if payload is not None else None
        response = await self._request(method, url, params=params, body=body, idempotent=idempotent, ok=ok)
        response.release()

    async def _stream(
        self, segments: tuple[str, str, str], params: Mapping[str, str]
    ) -> AsyncIterator[bytes]:
        """GET an inspect stream; segments = ("inspect", image UUID, endpoint), checked on first use."""
        import aiohttp

        url = self._url(segments[0], self._image(segments[1]), segments[2])
        response = await self._request("GET", url, params=params, idempotent=True, stream=True)
        try:
            async for chunk in response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unavailable(f"GET {url.path}: stream broken: {exc or type(exc).__name__}") from None
        finally:
            response.release()

    # ------------------------------------------------------------ argument checks

    @staticmethod
    def _image(uuid: str) -> str:
        # Validated before it goes into a URL path (COMPAT §15 #13); a malformed UUID names no image.
        if not _UUID_RE.match(uuid):
            raise NotFound(f"image not found: {uuid!r} is not a UUID")
        return uuid

    @staticmethod
    def _operation(uuid: str) -> str:
        if not _UUID_RE.match(uuid):
            raise NotFound(f"operation not found: {uuid!r} is not a UUID")
        return uuid

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
        if not segments or not _UUID_RE.match(segments[-1]):
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

    async def _upload_stream(self, url: URL, data: AsyncIterator[bytes]) -> aiohttp.ClientResponse:
        import aiohttp

        # A consumed iterator cannot be replayed: one attempt only.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout, sock_read=self.timeout)
        reconnected = False
        while True:
            try:
                response = await self._get_session().post(
                    url,
                    data=data,
                    headers={"Content-Type": "application/octet-stream"},
                    allow_redirects=False,
                    timeout=timeout,
                )
                break
            except aiohttp.ClientConnectorError as exc:
                # nothing was sent (the body is read only once connected): the iterator is still whole
                if reconnected or not await self._reconnect():
                    raise Unavailable(f"POST {url.path}: upload failed: {exc}") from None
                reconnected = True
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise Unavailable(f"POST {url.path}: upload failed: {exc or type(exc).__name__}") from None
        if response.status not in (200, 201):
            raise await self._error(
                "POST", url, response, parse_retry_after(response.headers.get("Retry-After"))
            )
        return response

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

    def events(
        self, operation_id: str, *, follow: bool = False, spid: int | None = None, since: int | None = None
    ) -> AsyncIterator[api.OperationEvent]:
        # Arguments are checked on first iteration, like a generator-based Backend would.
        stream = self._follow_events(operation_id, follow=follow, spid=spid, since=since, record=False)
        return cast(AsyncIterator[api.OperationEvent], stream)  # record=False: events only

    async def _follow_events(
        self, operation_id: str, *, follow: bool, spid: int | None, since: int | None, record: bool
    ) -> AsyncIterator[api.OperationEvent | api.OperationResponse]:
        """Events with transparent resumption: reconnects from the last id after drops and `sse_error`.
        `record`: ask the server (the embedded engine) to end a stream that reached `completion` with the
        operation's record, and yield it last."""
        import aiohttp

        self._operation(operation_id)
        last_id = since
        failures = 0
        while True:
            response = await self._open_event_stream(
                operation_id, follow=follow, spid=spid, last_id=last_id, record=record
            )
            opened = time.monotonic()
            broken = completed = False
            try:
                parser = SseParser()
                async for chunk in response.content.iter_any():
                    for frame in parser.feed(chunk):
                        if frame.event == "sse_error":
                            log.debug("event stream of %s: server error: %s", operation_id, frame.data)
                            broken = True
                            continue
                        if record and completed and frame.event == RECORD_EVENT:
                            try:
                                yield _operation_decoder.decode(frame.data)
                            except msgspec.MsgspecError:
                                log.debug("event stream of %s: undecodable record skipped", operation_id)
                            continue
                        try:
                            event = _event_decoder.decode(frame.data)
                        except msgspec.MsgspecError:
                            log.debug("event stream of %s: undecodable frame skipped", operation_id)
                            continue
                        if last_id is not None and event.id <= last_id:
                            continue  # a replay after reconnecting
                        last_id = event.id
                        failures = 0
                        completed = completed or event.type == "completion"
                        yield event
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.debug("event stream of %s dropped: %s", operation_id, exc or type(exc).__name__)
                broken = True
            finally:
                try:
                    if completed:
                        await _read_to_end(response)
                finally:
                    response.release()
            if completed or (not broken and not follow):
                return
            if not broken:
                # A follow stream closed without `completion` (spid filter, proxy cut): finish only once
                # the operation is terminal, after one last non-follow read of the retained tail.
                status = (await self.get_operation(operation_id)).status
                if status in api.TERMINAL_STATUSES:
                    follow = False
                    continue
                if time.monotonic() - opened >= HEALTHY_STREAM_SECONDS:
                    failures = 0  # a long quiet stream cut by a proxy is not a failing server
            failures += 1
            if failures > self.retries:
                raise Unavailable(f"event stream of {operation_id} keeps failing; last event id {last_id}")
            await asyncio.sleep(self._delay(failures - 1, None))

    async def _open_event_stream(
        self, operation_id: str, *, follow: bool, spid: int | None, last_id: int | None, record: bool = False
    ) -> aiohttp.ClientResponse:
        """One SSE request; `_request` retries 425 and 5xx, and 410 is retried here after Retry-After."""
        params: dict[str, str] = {}
        if follow:
            params["follow"] = "1"
        if spid is not None:
            params["spid"] = str(spid)
        if record:
            params["record"] = "1"
        headers = {"Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-Id"] = str(last_id)
        url = self._url("operations", operation_id, "events")
        attempt = 0
        while True:
            try:
                return await self._request(
                    "GET", url, params=params, idempotent=True, stream=True, headers=headers
                )
            except BackendError as exc:
                # 410 on events = live stream over, durable log not ready yet (§14 #19): retry later.
                if exc.status != 410 or attempt >= self.retries:
                    raise
                await asyncio.sleep(self._delay(attempt, exc.retry_after))
                attempt += 1

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
