"""registry_token_obtain, registry_auth, import_image."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from typing import Annotated

import msgspec
from msgspec import Meta

from contree import api
from contree.errors import BackendError
from contree.oci.credentials import PAT_PAGES, validate_credentials
from contree.oci.reference import LocalSource, parse_source, registry_host
from protocol.errors import ToolError
from protocol.registry import Registry, RequestContext, ToolAnnotations
from tools.bounds import MAX_SECONDS
from tools.convert import operation_output
from tools.errors import backend_errors
from tools.models import OperationOutput, OperationRef, RegistryAuthOutput, ResultRef, TokenObtainOutput
from tools.refs import validate_tag
from tools.roots import require_inside
from tools.state import ServerState
from tools.waiting import follow_until_terminal

log = logging.getLogger(__name__)

LOCAL_SOURCES = ("oci-archive:", "docker-archive:", "oci:")


class TokenObtainParams(api.Model):
    registry_url: Annotated[
        str, Meta(description="Registry host or image URL, e.g. 'docker.io' or 'ghcr.io'.")
    ]


class RegistryAuthParams(api.Model):
    registry_url: Annotated[str, Meta(description="Registry host or image URL, e.g. 'docker.io'.")]
    username: Annotated[str, Meta(description="Registry user name.")]
    token: Annotated[
        str, Meta(description="Personal access token (read-only scope). Stored 0600, never echoed.")
    ]


class ImportImageParams(api.Model):
    registry_url: Annotated[
        str,
        Meta(
            description="Image to import, e.g. 'docker://docker.io/library/alpine:latest' "
            "or 'python:3.11-slim'."
        ),
    ]
    tag: Annotated[
        str | None, Meta(description="Tag for the imported image (else reachable by UUID only).")
    ] = None
    wait: Annotated[bool, Meta(description="Wait for the import (false: return {operation_id} at once).")] = (
        True
    )
    i_accept_that_anonymous_access_might_be_rate_limited: Annotated[
        bool,
        Meta(description="Import without stored registry credentials (anonymous pulls may be rate limited)."),
    ] = False
    timeout: Annotated[
        Annotated[int, Meta(ge=1, le=MAX_SECONDS)] | None,
        Meta(description="Seconds the import may take (backend default 300)."),
    ] = None


def host_of(registry_url: str) -> str:
    try:
        return registry_host(registry_url)
    except BackendError as exc:
        raise ToolError(str(exc)) from None


def _can_open_browser(state: ServerState) -> bool:
    return not state.http_mode and bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


async def _open_browser(url: str) -> None:
    import webbrowser  # only here: it imports shutil and friends, for every start otherwise

    try:
        await asyncio.wait_for(asyncio.to_thread(webbrowser.open, url), timeout=3)
    except Exception as exc:
        log.debug("could not open a browser: %s", exc)


async def _elicit_url(ctx: RequestContext, host: str, url: str) -> str | None:
    """Ask the client to open the token page (URL-mode elicitation, MCP 2025-11-25) when it can;
    returns the user's action, or None when the client cannot or did not answer."""
    capability = ctx.client_capabilities.get("elicitation")
    if not isinstance(capability, dict) or "url" not in capability:
        return None
    params = {
        "mode": "url",
        "message": f"Create a read-only personal access token for {host}, then give your username and the "
        "token to the agent.",
        "url": url,
        "elicitationId": secrets.token_urlsafe(16),
    }
    try:
        answer = await ctx.request("elicitation/create", params, timeout=300)
    except Exception as exc:
        log.debug("URL elicitation failed: %s", exc)
        return None
    action = answer.get("action")
    return action if isinstance(action, str) else None


def register_auth(registry: Registry, state: ServerState) -> None:
    @registry.tool(
        name="registry_token_obtain",
        title="Get a registry token page",
        description="""Open browser to create a Personal Access Token for a container registry.

TL;DR: PURPOSE: first step of registry authentication; returns the page where the user creates a token.

USAGE:
- registry_token_obtain(registry_url="docker.io"), then STOP and ask the user for the username and token,
  then registry_auth(...). In HTTP mode, or without a display, no browser is opened: show the URL to the user.

RETURNS: {status, registry, url, message, agent_instruction}

GUIDES:
- [USEFUL] contree://guide/reference""",
        annotations=ToolAnnotations(read_only=True, destructive=False, idempotent=True, open_world=False),
    )
    async def registry_token_obtain(params: TokenObtainParams, ctx: RequestContext) -> TokenObtainOutput:
        host = host_of(params.registry_url)
        url = PAT_PAGES.get(host)
        if url is None:
            return TokenObtainOutput(
                status="error",
                registry=host,
                message=f"Unknown registry '{host}'. "
                "Please consult the registry documentation for token creation.",
            )
        action = await _elicit_url(ctx, host, url)
        opened = action is None and _can_open_browser(state)
        if opened:
            state.spawn_background(_open_browser(url), "open-browser")
        if action == "accept":
            lead = f"The user's client opened {url}."
        elif action is not None:
            lead = f"The user did not open {url} ({action}); ask them to open it."
        else:
            lead = f"Browser opened to {url}." if opened else f"Open {url} in a browser."
        return TokenObtainOutput(
            status="success",
            registry=host,
            url=url,
            message=(
                f"{lead} Create a read-only PAT, then provide your username and token. After receiving "
                "the token, "
                f"call registry_auth(registry_url='{params.registry_url}', username='<username>', "
                "token='<token>')."
            ),
            agent_instruction=(
                "STOP HERE. Wait for user to create PAT and provide the token. "
                "Do not proceed until user gives you the token."
            ),
        )

    @registry.tool(
        name="registry_auth",
        title="Authenticate with a registry",
        description="""Authenticate with a container registry via Personal Access Token.

TL;DR: PURPOSE: store registry credentials for import_image. COST: one request to the registry.

USAGE:
- registry_auth(registry_url="docker.io", username="me", token="<PAT>"). The token is checked against the
  registry, stored with mode 0600 on the server host and never returned or logged.

RETURNS: {status, registry, message}

GUIDES:
- [USEFUL] contree://guide/reference""",
        annotations=ToolAnnotations(read_only=False, destructive=False, idempotent=True, open_world=True),
    )
    async def registry_auth(params: RegistryAuthParams, ctx: RequestContext) -> RegistryAuthOutput:
        host = host_of(params.registry_url)
        try:
            check = await validate_credentials(host, params.username, params.token)
        except BackendError as exc:  # e.g. credentials would travel over plain HTTP
            raise ToolError(str(exc)) from None
        if check.status == "unreachable":
            raise ToolError(check.message)
        if not check.valid:
            return RegistryAuthOutput(status="error", registry=host, message=check.message)
        await asyncio.to_thread(
            state.credentials.put, host, params.username, params.token, principal=ctx.principal
        )
        return RegistryAuthOutput(
            status="success",
            registry=host,
            message=f"Authenticated with '{host}' as '{params.username}' successfully.",
        )


async def credentials_for(
    state: ServerState, principal: str | None, host: str
) -> api.RegistryCredentials | None:
    cred = await asyncio.to_thread(state.credentials.get, host, principal=principal)
    if cred is None:
        return None
    try:
        check = await validate_credentials(host, cred.username, cred.token)
    except BackendError as exc:
        raise ToolError(str(exc)) from None
    if check.status == "unreachable":
        log.info("keeping stored credentials for %s: %s", host, check.message)
    elif not check.valid:
        await asyncio.to_thread(state.credentials.delete, host, principal=principal)
        return None
    return api.RegistryCredentials(username=cred.username, password=cred.token)


def register_import(registry: Registry, state: ServerState) -> None:
    word = state.sandbox_word

    @registry.tool(
        name="import_image",
        title="Import an image",
        description=f"""Import OCI container image from registry (e.g., Docker Hub). Spawns {word}.

TL;DR: PURPOSE: bring a base image in when list_images has nothing suitable. COST: a download and unpack.

USAGE:
- Check list_images(tag_prefix=...) first. import_image(registry_url="docker://docker.io/library/alpine:latest",
  tag="alpine:latest"). Docker references are normalised ('python:3.11-slim' →
  docker.io/library/python:3.11-slim).
- Without stored credentials (registry_auth) pass i_accept_that_anonymous_access_might_be_rate_limited=true.
- The result is a flat root filesystem; ENV is kept (applied when shell=true); ENTRYPOINT/CMD/WORKDIR are
  dropped.

RETURNS: {{uuid, status, result_image_uuid, result: {{image, tag}}, error, ...}} or {{operation_id}} when
wait=false

GUIDES:
- [USEFUL] contree://guide/reference
- [USEFUL] contree://guide/tagging""",
        annotations=ToolAnnotations(read_only=False, destructive=False, idempotent=True, open_world=True),
        tasks="optional",  # a long import becomes a task for 2026-07-28 clients with the Tasks extension
    )
    async def import_image(params: ImportImageParams, ctx: RequestContext) -> OperationOutput | OperationRef:
        url = params.registry_url.strip()
        tag = validate_tag(params.tag) if params.tag else None
        credentials: api.RegistryCredentials | None = None
        if url.startswith(LOCAL_SOURCES):
            # a local archive is a host file like any other: only inside the allowed roots
            try:
                source = parse_source(url)
            except BackendError as exc:
                raise ToolError(str(exc)) from None
            path = source.path if isinstance(source, LocalSource) else ""
            if not os.path.isabs(path):
                raise ToolError(f"local image sources need an absolute path, got: {path}")
            await asyncio.to_thread(require_inside, path, state.allowed_roots, "image source")
        else:
            host = host_of(url)
            credentials = await credentials_for(state, ctx.principal, host)
            if credentials is None and not params.i_accept_that_anonymous_access_might_be_rate_limited:
                raise ToolError(
                    f"Not authenticated with '{host}'. Run registry_token_obtain(registry_url='{host}') "
                    "first to "
                    f"open the browser, then registry_auth(registry_url='{host}', username='...', "
                    "token='...') "
                    "to authenticate. Or pass i_accept_that_anonymous_access_might_be_rate_limited=true."
                )
        # A scoped principal's tag goes to its own namespace once the import succeeded, never to the
        # backend, where it would be a shared tag.
        request = api.ImageImportRequest(
            registry=api.ImageRegistry(url=url, credentials=credentials),
            tag=None if state.images.scoped else tag,
            timeout=api.DEFAULT_IMPORT_TIMEOUT if params.timeout is None else params.timeout,
        )
        with backend_errors("import_image"):
            operation_id = await state.backend.import_image(request)
        state.owners.record(ctx.principal, operation_id)
        if tag and state.images.scoped:
            state.images.tag_after_import(operation_id, ctx.principal, tag)
        if not params.wait:
            return OperationRef(operation_id=operation_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (params.timeout or api.DEFAULT_IMPORT_TIMEOUT) + state.run_grace_seconds
        ticks = 0

        async def on_event(event: api.OperationEvent) -> None:
            nonlocal ticks
            ticks += 1
            await ctx.progress(ticks, None, f"import {operation_id}: {event.type}")

        await ctx.progress(0, None, f"importing {url}")
        with backend_errors(f"Operation {operation_id}"):
            op = await follow_until_terminal(state.backend, operation_id, deadline, on_event)
        if op.status in api.TERMINAL_STATUSES:
            state.observe(op, ctx.principal)
        out = operation_output(op)
        if own_tag := state.images.result_tag(operation_id, ctx.principal, out.result_image_uuid):
            result = msgspec.structs.replace(out.result or ResultRef(), tag=own_tag)
            out = msgspec.structs.replace(out, result=result)
        return out
