"""Registry credentials: a 0600 credential file, validation against the registry, and the table of pages
where users create personal access tokens (for `registry_token_obtain`).

Secrets are never logged and never part of a repr; results name the registry and the user only.
Validation follows COMPAT §4.3 with the §15.41 rule: only a definite 401/403 means "invalid"; a 5xx,
a timeout or an unreachable registry is "unreachable", and stored credentials are kept.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import msgspec

from contree.errors import BackendError, Forbidden, Unauthorized
from contree.fsutil import write_private
from contree.oci.auth import (
    Challenge,
    Credentials,
    InsecureTransport,
    TokenCache,
    parse_challenge,
    url_is_safe_for_secrets,
)
from contree.oci.reference import DOCKER_HUB, DOCKER_HUB_API, registry_host

if TYPE_CHECKING:
    # the registry client (aiohttp) is loaded when credentials are checked: the MCP server imports this
    # module for its store, and must not pay aiohttp's import before it answers `initialize`
    from contree.oci.registry import RegistryClient, Timeouts

PAT_PAGES: dict[str, str] = {
    "docker.io": "https://app.docker.com/settings/personal-access-tokens",
    "ghcr.io": "https://github.com/settings/tokens?type=beta",
    "registry.gitlab.com": "https://gitlab.com/-/user_settings/personal_access_tokens",
    "gcr.io": "https://console.cloud.google.com/apis/credentials",
    "us.gcr.io": "https://console.cloud.google.com/apis/credentials",
    "eu.gcr.io": "https://console.cloud.google.com/apis/credentials",
    "asia.gcr.io": "https://console.cloud.google.com/apis/credentials",
}


def pat_page(registry_url: str) -> str | None:
    """The page where a user creates a read-only token for this registry (None when unknown)."""
    try:
        host = registry_host(registry_url)
    except BackendError:
        return None
    return PAT_PAGES.get(host)


class StoredCredential(msgspec.Struct, kw_only=True):
    registry: str
    username: str
    token: str
    scopes: list[str] = msgspec.field(default_factory=lambda: ["pull"])
    created_at: float = 0.0
    updated_at: float = 0.0

    def __repr__(self) -> str:
        return f"StoredCredential(registry={self.registry!r}, username={self.username!r}, token=<MASKED>)"

    def credentials(self) -> Credentials:
        return Credentials(username=self.username, password=self.token)


class _File(msgspec.Struct, kw_only=True):
    version: int = 1
    registries: dict[str, StoredCredential] = {}
    # HTTP clients with their own token (principals) keep their credentials apart: principal → host → entry
    principals: dict[str, dict[str, StoredCredential]] = {}

    def table(self, principal: str | None) -> dict[str, StoredCredential]:
        if principal is None:
            return self.registries
        return self.principals.setdefault(principal, {})


class CredentialStore:
    """Credentials per registry host in one JSON file with mode 0600 (directory 0700), optionally scoped
    by principal (`principal=None` is the unscoped table)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    @staticmethod
    def key(registry_url: str) -> str:
        return registry_host(registry_url)

    def _load(self) -> _File:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return _File()
        try:
            return msgspec.json.decode(data, type=_File)
        except msgspec.DecodeError:
            return _File()  # a damaged file is treated as empty rather than crashing every import

    def _save(self, content: _File) -> None:
        content.principals = {p: t for p, t in content.principals.items() if t}
        write_private(self.path, msgspec.json.encode(content))

    def get(self, registry_url: str, *, principal: str | None = None) -> StoredCredential | None:
        with self._lock:
            return self._load().table(principal).get(self.key(registry_url))

    def put(
        self, registry_url: str, username: str, token: str, *, principal: str | None = None
    ) -> StoredCredential:
        host = self.key(registry_url)
        now = time.time()
        with self._lock:
            content = self._load()
            table = content.table(principal)
            old = table.get(host)
            entry = StoredCredential(
                registry=host,
                username=username,
                token=token,
                created_at=old.created_at if old and old.username == username else now,
                updated_at=now,
            )
            table[host] = entry
            self._save(content)
        return entry

    def delete(self, registry_url: str, *, principal: str | None = None) -> bool:
        host = self.key(registry_url)
        with self._lock:
            content = self._load()
            if content.table(principal).pop(host, None) is None:
                return False
            self._save(content)
            return True

    def registries(self, *, principal: str | None = None) -> list[str]:
        with self._lock:
            return sorted(self._load().table(principal))


class CredentialCheck(msgspec.Struct, kw_only=True):
    status: Literal["valid", "invalid", "unreachable"]
    registry: str
    message: str

    @property
    def valid(self) -> bool:
        return self.status == "valid"


async def validate_credentials(
    registry_url: str,
    username: str,
    token: str,
    *,
    insecure_registries: tuple[str, ...] = (),
    timeouts: Timeouts | None = None,
) -> CredentialCheck:
    """Check credentials against the registry: Basic realm → Basic on `/v2/`; Bearer realm → the token
    endpoint with Basic. Only a definite 401/403 yields "invalid"."""
    import aiohttp

    from contree.oci.registry import RegistryClient, Timeouts

    host = registry_host(registry_url)
    api_host = DOCKER_HUB_API if host == DOCKER_HUB else host
    creds = Credentials(username=username, password=token)
    client = RegistryClient(
        api_host,
        credentials=creds,
        insecure_registries=insecure_registries,
        timeouts=timeouts or Timeouts(connect=10.0, request=20.0),
        token_cache=TokenCache(),
    )
    invalid = CredentialCheck(
        status="invalid",
        registry=host,
        message=f"Invalid credentials for '{host}'. Please verify your username and PAT.",
    )
    try:
        status, challenge = await client.ping()
        if status == 200:
            # An open /v2/ proves nothing; an endpoint that needs auth does.
            status, challenge = await _probe_catalog(client)
            if status == 200:
                return _valid(host, username)
        if challenge is None:
            if status in (401, 403):
                return invalid
            return _unreachable(host, f"HTTP {status} from /v2/")
        if challenge.scheme == "basic":
            status = await _basic_status(client, creds)
            if status == 200:
                return _valid(host, username)
            if status in (401, 403):
                return invalid
            return _unreachable(host, f"HTTP {status} from /v2/")
        if challenge.scheme == "bearer":
            try:
                await client.fetch_token(challenge, None)
            except (Unauthorized, Forbidden):
                return invalid
            return _valid(host, username)
        return _unreachable(host, f"unsupported auth scheme {challenge.scheme!r}")
    except (Unauthorized, Forbidden):
        return invalid
    except InsecureTransport:
        raise
    except BackendError as exc:
        return _unreachable(host, str(exc))
    except (aiohttp.ClientError, TimeoutError) as exc:
        return _unreachable(host, str(exc) or type(exc).__name__)
    finally:
        await client.close()


async def _probe_catalog(client: RegistryClient) -> tuple[int, Challenge | None]:
    base = await client.base()
    async with client.session.get(
        f"{base}/v2/_catalog?n=1", ssl=client._ssl(), timeout=client._timeout(total=client.timeouts.request)
    ) as r:
        await r.read()
        challenge = parse_challenge(r.headers.get("WWW-Authenticate", "")) if r.status == 401 else None
        return r.status, challenge


async def _basic_status(client: RegistryClient, creds: Credentials) -> int:
    base = await client.base()
    if not url_is_safe_for_secrets(base):
        raise InsecureTransport(f"refusing to send credentials to {client.host} over plain HTTP")
    async with client.session.get(
        f"{base}/v2/",
        headers={"Authorization": creds.basic_header()},
        ssl=client._ssl(),
        timeout=client._timeout(total=client.timeouts.request),
    ) as r:
        await r.read()
        return r.status


def _valid(host: str, username: str) -> CredentialCheck:
    return CredentialCheck(
        status="valid", registry=host, message=f"Authenticated with '{host}' as '{username}' successfully."
    )


def _unreachable(host: str, detail: str) -> CredentialCheck:
    return CredentialCheck(
        status="unreachable",
        registry=host,
        message=f"Could not verify credentials for '{host}' (registry unavailable: {detail}); retry later.",
    )
