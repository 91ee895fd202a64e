"""aiohttp client for the OCI distribution API (pull side).

One `RegistryClient` talks to one registry host. It answers the `/v2/` challenge (anonymous bearer tokens,
Basic, bearer with credentials), fetches manifests (size-capped, digest-checked when pinned) and streams
blobs to files while verifying their sha256. TLS is the default; plain HTTP is used only for loopback
registries and for registries the operator names as insecure, as Docker does.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp
import msgspec

from contree.errors import (
    BackendError,
    Forbidden,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
    Unprocessable,
)
from contree.fsutil import exclusive_file
from contree.oci.auth import (
    Challenge,
    Credentials,
    InsecureTransport,
    TokenCache,
    TokenResponse,
    is_loopback_host,
    parse_challenge,
    url_is_safe_for_secrets,
)
from contree.oci.extract import write_all
from contree.oci.manifest import ACCEPT, MAX_MANIFEST_BYTES

Progress = Callable[[int], None]

CHUNK = 1024 * 1024
MAX_REDIRECTS = 5


class Timeouts(msgspec.Struct, frozen=True, kw_only=True):
    connect: float = 15.0
    request: float = 60.0  # whole small request (ping, token, manifest, config)
    read: float = 60.0  # longest pause inside a blob download


class BlobDigestMismatch(Unprocessable):
    """A downloaded blob does not hash to its descriptor digest."""


def _digest_hasher(digest: str) -> Any:
    algo, _, hexpart = digest.partition(":")
    if algo not in ("sha256", "sha512") or not hexpart:
        raise Unprocessable(f"unsupported digest {digest!r}")
    return hashlib.new(algo)


def _retry_after(value: str | None) -> float | None:
    try:
        return max(float(value), 0.0) if value else None
    except ValueError:
        return None


def _error_for(status: int, what: str, body: str = "", retry_after: str | None = None) -> BackendError:
    detail = f" ({body.strip()[:200]})" if body.strip() else ""
    if status == 401:
        return Unauthorized(f"{what}: authentication required or credentials rejected{detail}")
    if status == 403:
        return Forbidden(f"{what}: access denied{detail}")
    if status == 404:
        return NotFound(f"{what}: not found{detail}")
    if status == 429:
        return RateLimited(
            f"{what}: rate limited by the registry{detail}", retry_after=_retry_after(retry_after)
        )
    if status >= 500:
        return Unavailable(
            f"{what}: registry error HTTP {status}{detail}",
            status=status,
            retry_after=_retry_after(retry_after),
        )
    return BackendError(f"{what}: unexpected HTTP {status}{detail}", status=502)


class RegistryClient:
    """Pull-side distribution client for one registry host (`host[:port]`)."""

    def __init__(
        self,
        host: str,
        *,
        credentials: Credentials | None = None,
        insecure_registries: Iterable[str] = (),
        timeouts: Timeouts | None = None,
        token_cache: TokenCache | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.host = host
        self.credentials = credentials
        self.timeouts = timeouts or Timeouts()
        self.insecure = is_loopback_host(host) or host in set(insecure_registries)
        self.tokens = token_cache or TokenCache()
        self._session = session
        self._own_session = session is None
        self._base: str | None = None
        self._challenge: Challenge | None = None
        self._auth: dict[str, str] = {}  # scope → Authorization header value
        self._auth_lock = asyncio.Lock()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=16, ssl=ssl.create_default_context())
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        return self._session

    def _ssl(self) -> ssl.SSLContext | bool:
        # Loopback / operator-named insecure registries: TLS if offered, without verification.
        return False if self.insecure else True

    def _timeout(self, *, total: float | None = None, read: float | None = None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=total, connect=self.timeouts.connect, sock_read=read)

    # ---- connection and challenge -----------------------------------------------------------------

    async def ping(self) -> tuple[int, Challenge | None]:
        """`GET /v2/`: the status and the auth challenge (None when the registry needs no auth)."""
        if self._base is None:
            self._base = await self._pick_base()
        url = f"{self._base}/v2/"
        async with self.session.get(
            url, ssl=self._ssl(), timeout=self._timeout(total=self.timeouts.request)
        ) as r:
            await r.read()
            challenge = parse_challenge(r.headers.get("WWW-Authenticate", "")) if r.status == 401 else None
            self._challenge = challenge
            return r.status, challenge

    async def _pick_base(self) -> str:
        schemes = ("https", "http") if self.insecure else ("https",)
        last: Exception | None = None
        for scheme in schemes:
            url = f"{scheme}://{self.host}/v2/"
            try:
                async with self.session.get(
                    url,
                    ssl=False if self.insecure else True,
                    timeout=self._timeout(total=self.timeouts.request),
                ) as r:
                    await r.read()
                    return f"{scheme}://{self.host}"
            except (TimeoutError, aiohttp.ClientConnectionError, ssl.SSLError) as exc:
                last = exc
        raise Unavailable(f"cannot reach registry {self.host}: {last or 'no response'}")

    async def base(self) -> str:
        if self._base is None:
            self._base = await self._pick_base()
        return self._base

    async def _authorize(self, challenge: Challenge, scope: str, *, force: bool = False) -> str | None:
        """An Authorization header value for `challenge`, fetching a bearer token when needed."""
        if challenge.scheme == "basic":
            if self.credentials is None:
                return None
            base = await self.base()
            if not url_is_safe_for_secrets(base):
                raise InsecureTransport(f"refusing to send credentials to {self.host} over plain HTTP")
            return self.credentials.basic_header()
        if challenge.scheme != "bearer":
            raise Unprocessable(f"registry {self.host} asks for unsupported auth scheme {challenge.scheme!r}")
        identity = self.credentials.username if self.credentials else ""
        if not force:
            cached = self.tokens.get(self.host, scope, identity)
            if cached:
                return f"Bearer {cached}"
        token, expires_in = await self.fetch_token(challenge, scope)
        self.tokens.put(self.host, scope, identity, token, expires_in)
        return f"Bearer {token}"

    async def fetch_token(self, challenge: Challenge, scope: str | None) -> tuple[str, int | None]:
        """GET the realm with service/scope (Basic when we have credentials); → (token, expires_in)."""
        realm = challenge.realm
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise Unprocessable(f"registry {self.host} sent an invalid token realm {realm!r}")
        if parts.scheme == "http" and not (is_loopback_host(parts.netloc) or self.insecure):
            raise InsecureTransport(f"refusing a plain-HTTP token service {realm!r}")
        query: dict[str, str] = {}
        if challenge.params.get("service"):
            query["service"] = challenge.params["service"]
        if scope:
            query["scope"] = scope
        url = realm + ("&" if "?" in realm else "?") + urlencode(query) if query else realm
        headers = {}
        if self.credentials is not None:
            if not url_is_safe_for_secrets(realm):
                raise InsecureTransport(f"refusing to send credentials to {parts.netloc} over plain HTTP")
            headers["Authorization"] = self.credentials.basic_header()
        try:
            async with self.session.get(
                url,
                headers=headers,
                ssl=False if (self.insecure and parts.scheme == "https") else True,
                timeout=self._timeout(total=self.timeouts.request),
                allow_redirects=False,
            ) as r:
                body = await r.content.read(1024 * 1024)
                if r.status != 200:
                    raise _error_for(
                        r.status, f"token service for {self.host}", body.decode(errors="replace")
                    )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Unavailable(
                f"token service for {self.host} unreachable: {exc or type(exc).__name__}"
            ) from None
        try:
            parsed = msgspec.json.decode(body, type=TokenResponse)
        except msgspec.DecodeError:
            raise Unavailable(f"token service for {self.host} returned invalid JSON") from None
        token = parsed.token or parsed.access_token
        if not token:
            raise Unavailable(f"token service for {self.host} returned no token")
        return token, parsed.expires_in

    # ---- authenticated requests -------------------------------------------------------------------

    async def _open(
        self, method: str, path: str, scope: str, *, headers: dict[str, str] | None = None, blob: bool = False
    ) -> aiohttp.ClientResponse:
        """Send a request, answering one auth challenge; the caller must release the response."""
        base = await self.base()
        url = f"{base}{path}"
        timeout = (
            self._timeout(read=self.timeouts.read) if blob else self._timeout(total=self.timeouts.request)
        )
        retried = False
        while True:
            hdrs = dict(headers or {})
            if scope in self._auth:
                hdrs["Authorization"] = self._auth[scope]
            try:
                resp = await self.session.request(
                    method, url, headers=hdrs, ssl=self._ssl(), timeout=timeout, allow_redirects=False
                )
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise Unavailable(f"registry {self.host} unreachable: {exc or type(exc).__name__}") from None
            if resp.status == 401 and not retried:
                challenge = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
                resp.release()
                if challenge is None:
                    raise Unauthorized(f"registry {self.host} refused {path} without an auth challenge")
                sent = hdrs.get("Authorization")
                async with self._auth_lock:
                    # Concurrent downloads rejected together renew the token once.
                    if self._auth.get(scope) == sent:
                        value = await self._authorize(challenge, scope, force=sent is not None)
                        if value is None:
                            raise Unauthorized(f"registry {self.host} requires credentials")
                        self._auth[scope] = value
                retried = True
                continue
            hops = 0
            while resp.status in (301, 302, 303, 307, 308) and hops < MAX_REDIRECTS:
                location = resp.headers.get("Location", "")
                resp.release()
                if not location:
                    raise Unavailable(f"registry {self.host} sent a redirect without Location")
                target = urljoin(url, location)
                same_host = urlsplit(target).netloc == urlsplit(url).netloc
                plain_ok = is_loopback_host(urlsplit(target).netloc) or (self.insecure and same_host)
                if urlsplit(target).scheme != "https" and not plain_ok:
                    raise InsecureTransport(f"registry {self.host} redirected to a non-HTTPS URL")
                # Storage back-ends (S3, CDNs) get no registry credentials.
                fwd = {k: v for k, v in hdrs.items() if k != "Authorization" or same_host}
                try:
                    resp = await self.session.request(
                        method,
                        target,
                        headers=fwd,
                        ssl=self._ssl() if same_host else True,
                        timeout=timeout,
                        allow_redirects=False,
                    )
                except (TimeoutError, aiohttp.ClientError) as exc:
                    raise Unavailable(f"blob storage for {self.host} unreachable: {exc}") from None
                url = target
                hops += 1
            return resp

    async def get_manifest(self, repository: str, selector: str) -> tuple[bytes, str, str]:
        """→ (raw bytes, media type, digest). A digest selector is verified against the content."""
        scope = f"repository:{repository}:pull"
        resp = await self._open(
            "GET", f"/v2/{repository}/manifests/{selector}", scope, headers={"Accept": ACCEPT}
        )
        try:
            what = f"manifest {self.host}/{repository}:{selector}"
            if resp.status != 200:
                body = (await resp.content.read(4096)).decode(errors="replace")
                raise _error_for(resp.status, what, body, resp.headers.get("Retry-After"))
            if (resp.content_length or 0) > MAX_MANIFEST_BYTES:
                raise Unprocessable(f"{what}: larger than {MAX_MANIFEST_BYTES} bytes")
            data = await resp.content.read(MAX_MANIFEST_BYTES + 1)
            if len(data) > MAX_MANIFEST_BYTES:
                raise Unprocessable(f"{what}: larger than {MAX_MANIFEST_BYTES} bytes")
            media_type = resp.headers.get("Content-Type", "")
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Unavailable(f"registry {self.host}: manifest download failed: {exc}") from None
        finally:
            resp.release()
        algo = selector.split(":", 1)[0] if ":" in selector else "sha256"
        digest = f"{algo}:{hashlib.new(algo, data).hexdigest()}" if algo in ("sha256", "sha512") else ""
        if ":" in selector and digest != selector:
            raise Unprocessable(f"{what}: content digest {digest} does not match the requested digest")
        if ":" not in selector:
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
        return data, media_type, digest

    async def get_blob_bytes(self, repository: str, digest: str, limit: int) -> bytes:
        """A small blob (an image config) in memory, digest-checked."""
        chunks: list[bytes] = []
        total = 0

        def sink(chunk: bytes) -> None:
            nonlocal total
            total += len(chunk)
            if total > limit:
                raise Unprocessable(f"blob {digest} is larger than {limit} bytes")
            chunks.append(chunk)

        await self._stream_blob(repository, digest, sink, None)
        return b"".join(chunks)

    async def download_blob(
        self,
        repository: str,
        digest: str,
        dest: str,
        *,
        size: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Stream a blob into `dest` (created exclusively), checking its digest; removes `dest` on failure."""
        with exclusive_file(dest) as fd:
            await self._stream_blob(
                repository, digest, lambda chunk: write_all(fd, chunk), progress, size=size
            )

    async def _stream_blob(
        self,
        repository: str,
        digest: str,
        sink: Callable[[bytes], object],
        progress: Progress | None,
        *,
        size: int | None = None,
    ) -> None:
        hasher = _digest_hasher(digest)
        scope = f"repository:{repository}:pull"
        resp = await self._open("GET", f"/v2/{repository}/blobs/{digest}", scope, blob=True)
        received = 0
        try:
            if resp.status != 200:
                body = (await resp.content.read(4096)).decode(errors="replace")
                raise _error_for(
                    resp.status,
                    f"blob {digest} of {self.host}/{repository}",
                    body,
                    resp.headers.get("Retry-After"),
                )
            async for chunk in resp.content.iter_chunked(CHUNK):
                received += len(chunk)
                if size is not None and received > size:
                    raise BlobDigestMismatch(
                        f"blob {digest} is larger than its descriptor says ({size} bytes)"
                    )
                hasher.update(chunk)
                sink(chunk)
                if progress is not None:
                    progress(len(chunk))
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Unavailable(
                f"registry {self.host}: download of {digest} failed: {exc or type(exc).__name__}"
            ) from None
        finally:
            resp.release()
        got = f"{digest.split(':', 1)[0]}:{hasher.hexdigest()}"
        if got != digest:
            raise BlobDigestMismatch(f"blob digest mismatch: expected {digest}, got {got} ({received} bytes)")
        if size is not None and received != size:
            raise BlobDigestMismatch(f"blob {digest} size {received} differs from its descriptor ({size})")
