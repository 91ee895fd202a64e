"""run: spawn a command in a sandbox, optionally wait for it with live progress."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated

import msgspec
from msgspec import UNSET, Meta

from contree import api
from contree.errors import BackendError, BadRequest, NotFound, Unprocessable
from protocol.errors import ToolError
from protocol.registry import Registry, RequestContext, ToolAnnotations
from tools import output
from tools.bounds import MAX_SECONDS
from tools.budget import as_text
from tools.convert import decode_stream
from tools.errors import backend_errors
from tools.models import OperationOutput, OperationRef
from tools.params import (
    Args,
    Command,
    CpuCores,
    DirectoryStateId,
    Environment,
    Gid,
    ImageRef,
    InjectedFiles,
    PidCount,
    PositiveBytes,
    TruncateOutputAt,
    Uid,
)
from tools.refs import split_ref
from tools.state import ServerState
from tools.waiting import OutputTail, follow_until_terminal

log = logging.getLogger(__name__)

PROGRESS_EVERY = 2.0  # seconds without progress before the run's latest output is sent as progress


class RunParams(api.Model):
    command: Command
    image: ImageRef
    shell: Annotated[
        bool, Meta(description="Run through the image's shell ('sh -c'); also applies the image's ENV.")
    ] = True
    env: Annotated[
        Environment | None,
        Meta(description="Environment variables; a null value unsets a preserved one. Never echoed back."),
    ] = None
    preserve_env: Annotated[
        bool,
        Meta(description="Merge 'env' into the image's stored environment and keep it in the result image."),
    ] = False
    cwd: Annotated[str, Meta(description="Working directory (absolute); '' = the image default.")] = ""
    uid: Uid = 0
    gid: Gid = 0
    timeout: Annotated[
        int, Meta(ge=1, le=MAX_SECONDS, description="Seconds before the command is killed.")
    ] = 30
    disposable: Annotated[
        bool,
        Meta(description="true: discard filesystem changes. false: save them as a new image (result_image)."),
    ] = True
    stdin: Annotated[str | None, Meta(description="Text written to the command's standard input.")] = None
    directory_state_id: DirectoryStateId = None
    files: InjectedFiles = None
    wait: Annotated[
        bool, Meta(description="true: wait and return the output. false: return {operation_id} at once.")
    ] = True
    truncate_output_at: TruncateOutputAt = 8000
    max_layer_bytes: Annotated[
        PositiveBytes | None,
        Meta(description="Cap on bytes written to the filesystem (default 12 GiB)."),
    ] = None
    memory_bytes: Annotated[
        PositiveBytes | None,
        Meta(description="Memory limit in bytes (embedded engine; default and maximum: whoami limits)."),
    ] = None
    cpus: Annotated[
        CpuCores | None,
        Meta(description="CPU limit in cores, e.g. 1.5 (embedded engine; default and maximum: whoami)."),
    ] = None
    pids: Annotated[
        PidCount | None,
        Meta(description="Process/thread limit (embedded engine; default and maximum: whoami)."),
    ] = None
    args: Args = None
    hostname: Annotated[str | None, Meta(description="Hostname inside the sandbox.")] = None
    networking: Annotated[
        bool | None, Meta(description="Give the sandbox network access (backend default: on).")
    ] = None
    preserve_cwd: Annotated[
        bool,
        Meta(description="Store the working directory as the result image's default (disposable=false)."),
    ] = False


def stdin_repr(text: str) -> api.ClosableStreamRepr:
    """The whole stdin, closed after it: ascii when it is printable text, else base64 (the API's rule)."""
    stream = api.encode_stream(text.encode())
    return api.ClosableStreamRepr(value=stream.value, encoding=stream.encoding, close=True)


def check_c_strings(params: RunParams) -> None:
    """NUL cannot travel in argv, the environment or a path: it would silently cut the string there
    (`echo a\\u0000b; echo after` would run `echo a`)."""
    fields: list[tuple[str, str]] = [("command", params.command), ("cwd", params.cwd)]
    fields += [(f"args[{i}]", arg) for i, arg in enumerate(params.args or [])]
    for key, value in (params.env or {}).items():
        fields.append(("an env name", key))
        if value is not None and "\x00" not in key:
            fields.append((f"env[{key!r}]", value))
    if params.hostname:
        fields.append(("hostname", params.hostname))
    for where, text in fields:
        if "\x00" in text:
            # values are not echoed: env values may be secrets
            raise ToolError(
                f"{where} contains a NUL byte (\\u0000), which no command line, environment or path can carry"
            )


async def spawn_source(state: ServerState, ref: str, principal: str | None) -> str:
    """The spawn request's `image` for a reference. An unscoped server on the embedded engine sends a tag
    as `tag:<tag>`, which the engine resolves as it creates the instance (the Contree API allows it): one
    request fewer per run, the same answer for a missing tag. Otherwise the tools resolve it: a scoped
    principal's own tags live in this server, and the cloud's answer for a missing tag is not the tools'."""
    if state.backend_kind == "local" and not state.images.scoped:
        uuid, tag = split_ref(ref)
        return uuid if uuid is not None else f"tag:{tag}"
    return await state.images.resolve(ref, principal)


async def build_request(
    params: RunParams, state: ServerState, principal: str | None
) -> api.InstanceSpawnRequest:
    check_c_strings(params)
    image = await spawn_source(state, params.image, principal)
    files: dict[str, api.InjectedFile] = {}
    if params.directory_state_id is not None:
        files.update(await state.dirstates.injected_files(principal, params.directory_state_id))
    for path, spec in (params.files or {}).items():
        if not path.startswith("/"):
            raise ToolError(f"files: path must be absolute, got: {path}")
        if isinstance(spec, str):
            files[path] = api.InjectedFile(uuid=spec, mode="0644")
        else:
            files[path] = api.InjectedFile(
                uuid=spec.uuid, mode=spec.mode.rjust(4, "0"), uid=spec.uid, gid=spec.gid
            )
    try:  # the API's own rule for cwd; every other field is bounded by RunParams already
        msgspec.convert(params.cwd, api.Cwd)
    except msgspec.ValidationError as exc:
        raise ToolError(f"invalid run request: {exc} - at `$.cwd`") from None
    limits: api.InstanceResourcesLimits | None = None
    if any(v is not None for v in (params.max_layer_bytes, params.memory_bytes, params.cpus, params.pids)):
        limits = api.InstanceResourcesLimits(
            max_layer_bytes=params.max_layer_bytes or api.DEFAULT_MAX_LAYER_BYTES,  # RunParams: >= 1
            memory_bytes=UNSET if params.memory_bytes is None else params.memory_bytes,
            cpus=UNSET if params.cpus is None else params.cpus,
            pids=UNSET if params.pids is None else params.pids,
        )
    return api.InstanceSpawnRequest(
        command=params.command,
        image=image,
        shell=params.shell,
        env=params.env,
        preserve_env=params.preserve_env,
        preserve_cwd=params.preserve_cwd,
        cwd=params.cwd,
        uid=params.uid,
        gid=params.gid,
        timeout=params.timeout,
        disposable=params.disposable,
        args=params.args or [],
        hostname=params.hostname or api.DEFAULT_HOSTNAME,
        networking=None if params.networking is None else api.InstanceNetworking(enabled=params.networking),
        resources_limits=limits,
        stdin=stdin_repr(params.stdin) if params.stdin else None,
        files=files or None,
        # The embedded engine keeps whole streams whatever this says; the Contree API keeps only what it
        # records, so ask it for as much as it allows (the result is cut to the caller's cap anyway).
        truncate_output_at=(
            state.output_cap(params.truncate_output_at)[0]
            if state.backend_kind == "local"
            else api.MAX_TRUNCATE_OUTPUT_AT
        ),
    )


async def wait_for_run(
    state: ServerState, ctx: RequestContext, operation_id: str, seconds: float
) -> api.OperationResponse:
    """Follow a run to its end with progress. When the client cancels the request
    (`notifications/cancelled`), the operation is cancelled too; when the client merely goes away (its
    session closes, its HTTP stream drops), the run keeps going to its end in the engine, like the
    reference's, and any later session can read it.

    Progress shows the last output lines: from the event stream while it carries output (the first
    `truncate_output_at` bytes), then from the engine's whole output every PROGRESS_EVERY seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds + state.run_grace_seconds
    tail = OutputTail()
    counter = 0
    last_sent = loop.time()

    async def send(message: str) -> None:
        nonlocal counter, last_sent
        counter += 1
        last_sent = loop.time()
        await ctx.progress(counter, None, message)

    async def on_event(event: api.OperationEvent) -> None:
        kind = event.type
        if kind in ("stdout", "stderr"):
            try:
                payload = event.payload()
            except msgspec.ValidationError:
                return  # progress is best effort: a malformed output event is skipped
            if isinstance(payload, api.EventDataStream):
                tail.feed(decode_stream(payload)[0])
        elif kind not in ("spawn", "exit", "completion"):
            return
        await send(tail.render() or f"{operation_id}: {kind}")

    async def ticker() -> None:
        seen = -1
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            if loop.time() - last_sent < PROGRESS_EVERY:
                continue
            try:
                page = await output.engine_page(state, operation_id, "stdout", offset=0, limit=512, tail=True)
            except BackendError as exc:
                log.debug("progress tail of %s: %s", operation_id, exc)
                continue
            if page is None or page.total == seen:
                continue
            seen = page.total
            latest = OutputTail()
            latest.feed(as_text(page.data))
            await send(latest.render() or f"{operation_id}: {page.total} bytes of output")

    ticking = loop.create_task(ticker())
    try:
        return await follow_until_terminal(state.backend, operation_id, deadline, on_event)
    except asyncio.CancelledError:
        if not ctx.cancel_requested:
            raise  # the session ended, not the request: the operation outlives it
        # The client gave up on a call that started this operation: stop the sandbox too (§15.22).
        async def cancel() -> None:
            try:
                await state.backend.cancel_operation(operation_id)
            except Exception as exc:
                log.debug("cancel of %s after request cancellation failed: %s", operation_id, exc)

        await asyncio.shield(loop.create_task(cancel()))
        raise
    finally:
        ticking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticking


async def track_in_background(
    state: ServerState, operation_id: str, principal: str | None, notify: Callable[[str], Awaitable[None]]
) -> None:
    """Record lineage for a wait=false run once it ends (never cancels it) and tell subscribers of
    `contree://operations/instance/<id>` that it changed."""
    loop = asyncio.get_running_loop()
    op = await follow_until_terminal(state.backend, operation_id, loop.time() + 24 * 3600)
    if op.status in api.TERMINAL_STATUSES:
        state.observe(op, principal)
        await notify(f"contree://operations/instance/{operation_id}")


def register(registry: Registry, state: ServerState) -> None:
    word = state.sandbox_word
    cost = f"Spawns {word}."
    guidance = state.guidance_now()
    pick = (
        f"Use an image that exists here (list_images(tagged=true); e.g. \"{guidance.shell_image()}\"; the "
        "instructions say what each contains) before importing one."
        if guidance.local
        else 'Prefer existing images: list_images(tag_prefix="common/") before import_image.'
    )

    @registry.tool(
        name="run",
        title="Run a command",
        description=f"""Execute command in isolated container. {cost}

TL;DR: PURPOSE: run a shell command in a fresh {word} from an immutable image. COST: one {word} per call.

USAGE:
- {pick}
- Stage local files first with rsync (directory_state_id) or upload (files={{"/app/x.py": "<file uuid>"}}).
- disposable=true (default) discards changes; disposable=false saves them as a new image: chain by passing
  result_image_uuid as the next 'image', and tag useful ones as {{scope}}/{{purpose}}/{{base}}.
- wait=false returns {{operation_id}} at once; join with wait_operations.
- Pass variables with env={{...}}, not 'export' (each run is a fresh process). cwd="" = image default.
- The result keeps the first truncate_output_at bytes of each stream (stdout, stderr) and the last ones
  (stdout_tail, stderr_tail); every byte stays readable (hint says how: stdout_resource, or
  get_operation(operation_id, stream="stdout", offset=...)).

RETURNS: {{uuid, status, exit_code, stdout, stderr, stdout_truncated, stdout_bytes, stdout_tail, hint,
timed_out, result_image_uuid, filesystem_changed, duration, oom_killed, limits, ...}} (about 64 KiB at
most) or {{operation_id}} when wait=false. status SUCCESS means it ran; the command's outcome is exit_code.
oom_killed=true: a process was killed for exceeding the memory limit (raise it with memory_bytes).

GUIDES:
- [ESSENTIAL] contree://guide/workflow
- [ESSENTIAL] contree://guide/state
- [USEFUL] contree://guide/async""",
        annotations=ToolAnnotations(read_only=False, destructive=False, idempotent=False, open_world=True),
        # 2026-07-28 clients with the Tasks extension: a wait=true run still going after a second becomes a
        # task (polled with tasks/get; live output in its statusMessage); wait=false stays an operation id.
        tasks="optional",
    )
    async def run(params: RunParams, ctx: RequestContext) -> OperationOutput | OperationRef:
        with backend_errors("run"):
            request = await build_request(params, state, ctx.principal)
            try:
                spawned = await state.backend.spawn(request)
            except (NotFound, BadRequest, Unprocessable):
                # blobs of a synced directory may have been collected server-side: restore them once
                if params.directory_state_id is None or not await state.dirstates.restore_blobs(
                    state.backend, ctx.principal, params.directory_state_id
                ):
                    raise
                request = await build_request(params, state, ctx.principal)
                spawned = await state.backend.spawn(request)
        operation_id = spawned.uuid
        state.owners.record(ctx.principal, operation_id)
        state.remember_cap(operation_id, params.truncate_output_at)
        if not params.wait:
            state.spawn_background(
                track_in_background(state, operation_id, ctx.principal, ctx.notify_resource_updated),
                f"track-{operation_id}",
            )
            return OperationRef(operation_id=operation_id)
        await ctx.progress(0, None, f"spawned {operation_id}")
        with backend_errors(f"Operation {operation_id}"):
            op = await wait_for_run(state, ctx, operation_id, params.timeout)
        if op.status in api.TERMINAL_STATUSES:
            state.observe(op, ctx.principal)
            await ctx.notify_resource_updated(f"contree://operations/instance/{operation_id}")
        else:
            log.warning("run %s still %s after its deadline", operation_id, op.status)
        cap, budget = state.output_cap(params.truncate_output_at)
        return await output.shape(state, op, cap=cap, budget=budget)
