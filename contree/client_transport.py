"""`ApiTransport`: HTTP to a Contree API (`{base}/v1`) over one aiohttp session — the base class of
`contree.client.RemoteBackend`, whose endpoints call its `_json`, `_empty`, `_stream` and `_request`.

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
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import quote, urlsplit

import msgspec

from contree import api
from contree.errors import BackendError, NotFound, Unavailable, error_for_status
from contree.version import VERSION

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

log = logging.getLogger("contree.client")

T = TypeVar("T")
AuthType = Literal["jwt", "iam"]

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_ALWAYS_RETRY = frozenset((425, 429))
_IDEMPOTENT_RETRY = frozenset((500, 502, 503, 504))
_encoder = msgspec.json.Encoder()


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


class ApiTransport:
    """Requests to a Contree API. `auth_type="iam"` sends `Project`; `"jwt"` sends the bearer token only.
    Subclasses may override `_make_connector()` and `_reconnect()` (the engine service's client does)."""

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

    # ------------------------------------------------------------ session and requests

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
        if not UUID_RE.match(uuid):
            raise NotFound(f"image not found: {uuid!r} is not a UUID")
        return uuid

    @staticmethod
    def _operation(uuid: str) -> str:
        if not UUID_RE.match(uuid):
            raise NotFound(f"operation not found: {uuid!r} is not a UUID")
        return uuid

    # ------------------------------------------------------------ uploads

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

