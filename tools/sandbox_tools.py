"""Long-lived sandboxes: start_sandbox, exec, write_stdin, signal_process, get_process, expose_port,
snapshot_sandbox, stop_sandbox, list_sandboxes (and the full output of their processes as resources).

A sandbox is an instance operation kept running (`tools.sandbox_hosts`), owned by the principal that
started it: with per-principal HTTP tokens, another principal's sandbox reads as not found everywhere.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import signal as signals

import msgspec

from contree import api
from contree.errors import BackendError, BadRequest, NotFound, Unprocessable
from contree.sandbox_api import PortForward, SandboxInfo, SandboxRequest, process_exited
from protocol.content import ResourceContents
from protocol.errors import InvalidParams, ResourceNotFound, ToolError
from protocol.registry import Registry, RequestContext, ToolAnnotations
from tools import output
from tools.budget import fit_bytes
from tools.convert import decode_stream
from tools.errors import backend_errors
from tools.models import ProcessOutput
from tools.refs import is_uuid, validate_tag
from tools.run_tool import RunParams, build_request, stdin_repr
from tools.sandbox_hosts import CloudSandboxes, EngineSandboxes, SandboxHosts
from tools.sandbox_models import (
    ExecParams,
    ExposePortOutput,
    ExposePortParams,
    GetProcessParams,
    ListSandboxesParams,
    PortOutput,
    SandboxListOutput,
    SandboxOutput,
    SignalParams,
    SnapshotOutput,
    SnapshotSandboxParams,
    StartSandboxParams,
    StopSandboxParams,
    WriteStdinOutput,
    WriteStdinParams,
)
from tools.state import ServerState
from tools.stores.lineage import command_of
from tools.waiting import OutputTail

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60
WAIT_GRACE = 5.0  # seconds beyond a process's timeout its caller waits for the kill to be recorded
SIGNAL_SETTLE = 2.0  # seconds signal_process waits to report whether the process ended
PAGE_BYTES = 32 * 1024
RESOURCE = "contree://sandboxes/{sandbox_id}/processes/{process_id}"


def port_output(forward: PortForward) -> PortOutput:
    return PortOutput(port=forward.port, url=forward.url, host_port=forward.host_port,
                      connections=forward.connections, bytes_in=forward.bytes_in, bytes_out=forward.bytes_out)


def sandbox_output(info: SandboxInfo, hint: str | None = None) -> SandboxOutput:
    return SandboxOutput(
        sandbox_id=info.uuid, image=info.image, state=info.state, status=info.status,
        created_at=info.created_at, ttl_seconds=info.ttl_seconds, expires_at=info.expires_at,
        idle_seconds=info.idle_seconds, busy=info.busy, networking=info.networking,
        processes_running=info.processes_running, commands=info.commands,
        ports=[port_output(p) for p in info.ports], snapshots=list(info.snapshots),
        stop_reason=info.stop_reason, error=info.error, result_image=info.result_image, hint=hint)


def place_of(sandbox_id: str, spid: int) -> output.StreamPlace:
    return output.StreamPlace(
        operation_id=sandbox_id, spid=spid,
        resource_base=RESOURCE.format(sandbox_id=sandbox_id, process_id=spid),
        tool_call=f'get_process(sandbox_id="{sandbox_id}", process_id={spid}, stream="{{stream}}", '
        "offset={offset})")


def process_output(sandbox_id: str, spid: int, result: api.InstanceResult, cap: int,
                   timed_out: bool = False) -> ProcessOutput:
    """The process's state and its streams' heads (tails and resources: `output.shape_streams`)."""
    state = result.state or api.ProcessState()
    exited = process_exited(result)
    code = state.exit_code if exited and state.exit_code >= 0 else None
    sig = state.signal if exited and state.signal > 0 else None
    timed_out = timed_out or state.timed_out
    status = "running"
    if exited:
        status = "timed_out" if timed_out else "killed" if sig is not None else "exited"
    stdout, out_cut = decode_stream(result.stdout, cap)
    stderr, err_cut = decode_stream(result.stderr, cap)
    duration = result.resources.elapsed_time if exited and result.resources is not None else None
    return ProcessOutput(
        sandbox_id=sandbox_id, process_id=spid, status=status, exit_code=code, signal=sig,
        timed_out=timed_out, oom_killed=state.oom_killed, pid=state.pid or None, duration=duration,
        stdout=stdout, stderr=stderr, stdout_truncated=out_cut, stderr_truncated=err_cut)


def parse_signal(value: str) -> int:
    text = value.strip().upper()
    if text.isdigit():
        number = int(text)
        if not 1 <= number <= 64:
            raise ToolError(f"invalid signal {value!r}: numbers go from 1 to 64")
        return number
    name = text if text.startswith("SIG") else "SIG" + text
    try:
        return int(signals.Signals[name])
    except KeyError:
        raise ToolError(
            f"unknown signal {value!r}: use a name such as TERM, INT, HUP, KILL or a number") from None


def stdin_chunk(params: WriteStdinParams) -> api.ClosableStreamRepr:
    if params.data is not None and params.data_base64 is not None:
        raise ToolError("give either data or data_base64, not both")
    if params.data_base64 is not None:
        try:
            raw = base64.b64decode(params.data_base64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ToolError(f"data_base64 is not valid base64: {exc}") from None
        return api.ClosableStreamRepr(value=base64.b64encode(raw).decode(), encoding="base64",
                                      close=params.close)
    if params.data is None:
        if not params.close:
            raise ToolError("nothing to do: give data (or data_base64), or close=true to close stdin")
        return api.ClosableStreamRepr(value="", close=True)
    return msgspec.structs.replace(stdin_repr(params.data), close=params.close)


def register(registry: Registry, state: ServerState) -> None:
    hosts = SandboxHosts(state)
    word = state.sandbox_word

    def owned(ctx: RequestContext, sandbox_id: str) -> str:
        if not is_uuid(sandbox_id):
            raise ToolError(f"invalid sandbox_id {sandbox_id!r}: expected the UUID start_sandbox returned")
        if not state.owners.visible(ctx.principal, sandbox_id):
            raise ToolError(f"sandbox {sandbox_id}: not found")
        return sandbox_id

    async def sandbox_request(params: StartSandboxParams, principal: str | None) -> SandboxRequest:
        as_run = RunParams(
            command="true", image=params.image, env=params.env, cwd=params.cwd, hostname=params.hostname,
            networking=params.networking, directory_state_id=params.directory_state_id, files=params.files,
            memory_bytes=params.memory_bytes, cpus=params.cpus, pids=params.pids,
            max_layer_bytes=params.max_layer_bytes)
        spawn = await build_request(as_run, state, principal)
        return SandboxRequest(
            image=spawn.image, env=spawn.env, cwd=spawn.cwd, files=spawn.files, hostname=spawn.hostname,
            networking=params.networking, ttl_seconds=params.ttl_seconds,
            resources_limits=spawn.resources_limits)

    async def shaped(host: EngineSandboxes | CloudSandboxes, sandbox_id: str, spid: int,
                     result: api.InstanceResult, requested: int) -> ProcessOutput:
        cap, budget = state.output_cap(requested)
        out = process_output(sandbox_id, spid, result, cap, host.timed_out(sandbox_id, spid))
        await output.shape_streams(state, out, place_of(sandbox_id, spid), result, cap=cap, budget=budget)
        if out.status == "running" and out.hint is None:
            out.hint = (f'still running: get_process(sandbox_id="{sandbox_id}", process_id={spid}, '
                        "wait=30) waits for it; signal_process stops it")
        return out

    async def follow_output(ctx: RequestContext, sandbox_id: str, spid: int) -> None:
        """Progress notifications with the process's latest output lines while it runs."""
        tail = OutputTail()
        counter = 0
        async for event in state.backend.events(sandbox_id, follow=True, spid=spid):
            if event.type in ("stdout", "stderr"):
                payload = event.payload()
                assert isinstance(payload, api.EventDataStream)
                text, _ = decode_stream(payload)
                tail.feed(text)
                counter += 1
                await ctx.progress(counter, None, tail.render() or f"process {spid}: output")
            elif event.type == "exit":
                return

    async def wait_for(ctx: RequestContext, host: EngineSandboxes | CloudSandboxes, sandbox_id: str,
                       spid: int, seconds: float) -> api.InstanceResult:
        follower = None
        if ctx.progress_token is not None:
            follower = asyncio.get_running_loop().create_task(follow_output(ctx, sandbox_id, spid))
        try:
            return await host.wait(sandbox_id, spid, seconds)
        except asyncio.CancelledError:
            if ctx.cancel_requested:  # the client gave up on this exec: stop the process too
                with contextlib.suppress(Exception):
                    await asyncio.shield(host.kill(sandbox_id, spid, str(int(signals.SIGKILL))))
            raise
        finally:
            if follower is not None:
                follower.cancel()
                with contextlib.suppress(BaseException):
                    await follower

    # ---------------------------------------------------------------- start

    @registry.tool(
        name="start_sandbox",
        title="Start a long-lived sandbox",
        description=f"""Start a long-lived {word} that keeps running between commands. Spawns {word}.

TL;DR: PURPOSE: state that lives between commands — a dev server or database started once and tested
against, a REPL fed line by line, a build watched while it runs. COST: one {word} until it stops.

USAGE:
- start_sandbox(image="busybox:latest") → sandbox_id; then exec(sandbox_id, command=...) as often as
  needed: files, processes and environment persist between execs (unlike run, which is one command in
  a fresh {word}).
- env and cwd are the defaults of every exec; stage files with rsync (directory_state_id) or upload.
- It stops after ttl_seconds (default 1800) without exec, stdin or exposed-port traffic, or with
  stop_sandbox. Keep its state with snapshot_sandbox (while it runs) or stop_sandbox(commit=true).
- For one command, run is simpler and cheaper.

RETURNS: {{sandbox_id, image, state, expires_at, ttl_seconds, networking, ports, ...}}

GUIDES:
- [ESSENTIAL] contree://guide/sandboxes""",
        annotations=ToolAnnotations(read_only=False, destructive=False, idempotent=False, open_world=True),
    )
    async def start_sandbox(params: StartSandboxParams, ctx: RequestContext) -> SandboxOutput:
        with backend_errors("start_sandbox"):
            host = await hosts.get()
            if hosts.max_ttl is not None and params.ttl_seconds > hosts.max_ttl:
                raise ToolError(f"ttl_seconds must be at most {hosts.max_ttl} "
                                "(whoami limits.sandbox_max_ttl_seconds)")
            request = await sandbox_request(params, ctx.principal)
            try:
                info = await host.start(request, max_ttl=hosts.max_ttl)
            except (NotFound, BadRequest, Unprocessable):
                if params.directory_state_id is None or not await state.dirstates.restore_blobs(
                    state.backend, ctx.principal, params.directory_state_id
                ):
                    raise
                info = await host.start(await sandbox_request(params, ctx.principal), max_ttl=hosts.max_ttl)
        state.owners.record(ctx.principal, info.uuid)
        return sandbox_output(info, hint=(
            f'exec(sandbox_id="{info.uuid}", command="...") runs commands in it; it stops after '
            f"{info.ttl_seconds} s without activity, or with stop_sandbox"))

    # ---------------------------------------------------------------- processes

    @registry.tool(
        name="exec",
        title="Run a command in a sandbox",
        description=f"""Run a command in a running long-lived sandbox (state persists). Free (no VM).

TL;DR: PURPOSE: the next command in a sandbox from start_sandbox: same files, same running processes.
COST: free (the {word} is already running).

USAGE:
- exec(sandbox_id, command="make test") waits (timeout, default 60 s) and returns exit_code, stdout and
  stderr like run; progress notifications carry its latest output while it runs.
- background=true returns at once with process_id (servers, watchers, REPLs): then get_process(wait=...),
  write_stdin (its stdin stays open), signal_process. Background processes have no timeout unless given.
- env/cwd add to the sandbox's defaults; shell=false runs command with args directly.
- The result keeps the first truncate_output_at bytes of each stream and the last ones (*_tail); every
  byte stays readable (hint: the *_resource URIs, or get_process(stream=..., offset=...)).

RETURNS: {{sandbox_id, process_id, status (running|exited|killed|timed_out), exit_code, signal, stdout,
stderr, stdout_tail, stdout_resource, duration, hint, ...}}

GUIDES:
- [ESSENTIAL] contree://guide/sandboxes""",
        annotations=ToolAnnotations(read_only=False, destructive=False, idempotent=False, open_world=True),
    )
    async def exec_(params: ExecParams, ctx: RequestContext) -> ProcessOutput:
        sandbox_id = owned(ctx, params.sandbox_id)
        for where, text in [("command", params.command), ("cwd", params.cwd),
                            *((f"args[{i}]", a) for i, a in enumerate(params.args or []))]:
            if "\x00" in text:
                raise ToolError(
                    f"{where} contains a NUL byte (\\u0000), which no command line or path can carry")
        background = params.background
        limit = params.timeout if params.timeout is not None else (None if background else DEFAULT_TIMEOUT)
        keep_open = params.keep_stdin_open if params.keep_stdin_open is not None else background
        stdin = None
        if params.stdin:
            stdin = msgspec.structs.replace(stdin_repr(params.stdin), close=not keep_open)
        elif keep_open:
            stdin = api.ClosableStreamRepr(value="", close=False)
        with backend_errors(f"exec in sandbox {sandbox_id}"):
            host = await hosts.get()
            cap = (state.output_cap(params.truncate_output_at)[0] if isinstance(host, EngineSandboxes)
                   else api.MAX_TRUNCATE_OUTPUT_AT)
            spec = api.ExecSpec(
                command=params.command, args=list(params.args or []), shell=params.shell, env=params.env,
                cwd=params.cwd, uid=params.uid, gid=params.gid, stdin=stdin, truncate_output_at=cap,
                timeout=limit)
            spid = await host.exec(sandbox_id, spec)
            if background:
                result = await state.backend.get_subprocess(sandbox_id, spid)
            else:
                assert limit is not None
                await ctx.progress(0, None, f"process {spid} started in {sandbox_id}")
                result = await wait_for(ctx, host, sandbox_id, spid, limit + WAIT_GRACE)
            return await shaped(host, sandbox_id, spid, result, params.truncate_output_at)

    @registry.tool(
        name="write_stdin",
        title="Write to a process's stdin",
        description="""Write to the stdin of a process started with exec. Free (no VM).

TL;DR: PURPOSE: feed a REPL, a `cat`, an interactive tool line by line. COST: free.

USAGE:
- Its stdin must be open: exec(background=true) leaves it open (or keep_stdin_open=true).
- write_stdin(sandbox_id, process_id, data="print(1)\\n"); data_base64 for bytes; close=true sends EOF
  after the data (or alone). Read what it answered with get_process.

RETURNS: {sandbox_id, process_id, bytes_written, closed}

GUIDES:
- [USEFUL] contree://guide/sandboxes""",
        annotations=ToolAnnotations(read_only=False, destructive=False, idempotent=False, open_world=False),
    )
    async def write_stdin(params: WriteStdinParams, ctx: RequestContext) -> WriteStdinOutput:
        sandbox_id = owned(ctx, params.sandbox_id)
        chunk = stdin_chunk(params)
        with backend_errors(f"stdin of process {params.process_id} in sandbox {sandbox_id}"):
            host = await hosts.get()
            await host.write_stdin(sandbox_id, params.process_id, chunk)
        size = len(api.decode_stream(chunk))
        return WriteStdinOutput(sandbox_id=sandbox_id, process_id=params.process_id, bytes_written=size,
                                closed=params.close)

    @registry.tool(
        name="signal_process",
        title="Signal a sandbox process",
        description="""Send a signal to a process started with exec. Free (no VM).

TL;DR: PURPOSE: stop a background server (TERM), interrupt a REPL (INT), reload (HUP). COST: free.

USAGE:
- signal_process(sandbox_id, process_id) sends TERM to the process and what it started (its process
  group); signal="INT" | "HUP" | "KILL" | "USR1" | a number.

RETURNS: the process after up to 2 s: {status (running|exited|killed), exit_code, signal, stdout, ...}

GUIDES:
- [USEFUL] contree://guide/sandboxes""",
        annotations=ToolAnnotations(read_only=False, destructive=True, idempotent=False, open_world=False),
    )
    async def signal_process(params: SignalParams, ctx: RequestContext) -> ProcessOutput:
        sandbox_id = owned(ctx, params.sandbox_id)
        number = parse_signal(params.signal)
        with backend_errors(f"process {params.process_id} of sandbox {sandbox_id}"):
            host = await hosts.get()
            await host.kill(sandbox_id, params.process_id, str(number))
            result = await host.wait(sandbox_id, params.process_id, SIGNAL_SETTLE)
            return await shaped(host, sandbox_id, params.process_id, result, 8000)

    @registry.tool(
        name="get_process",
        title="A sandbox process's state",
        description="""Status and output of a process started with exec. Free (no VM).

TL;DR: PURPOSE: check on (or wait for) a background process; page through its whole output.

USAGE:
- get_process(sandbox_id, process_id) → its state now; wait=30 waits up to 30 s for it to exit.
- stream="stdout", offset=N pages through the whole stream (or read the *_resource URI).

RETURNS: {sandbox_id, process_id, status, exit_code, signal, stdout, stderr, stdout_tail, hint, ...}

GUIDES:
- [USEFUL] contree://guide/sandboxes""",
        annotations=ToolAnnotations(read_only=True, destructive=False, idempotent=True, open_world=False),
    )
    async def get_process(params: GetProcessParams, ctx: RequestContext) -> ProcessOutput:
        sandbox_id = owned(ctx, params.sandbox_id)
        with backend_errors(f"process {params.process_id} of sandbox {sandbox_id}"):
            host = await hosts.get()
            if params.stream is not None:
                return await stream_page(host, sandbox_id, params)
            if params.wait:
                result = await wait_for(ctx, host, sandbox_id, params.process_id, params.wait)
            else:
                result = await state.backend.get_subprocess(sandbox_id, params.process_id)
            return await shaped(host, sandbox_id, params.process_id, result, params.truncate_output_at)

    async def stream_page(host: EngineSandboxes | CloudSandboxes, sandbox_id: str,
                          params: GetProcessParams) -> ProcessOutput:
        name = params.stream
        assert name is not None
        limit = params.limit or PAGE_BYTES
        if limit > max(state.read_max_bytes, PAGE_BYTES):
            most = max(state.read_max_bytes, PAGE_BYTES)
            raise ToolError(f"limit must be at most {most} (--read-max-bytes)")
        spid = params.process_id
        result = await state.backend.get_subprocess(sandbox_id, spid)
        try:
            page = await output.read_page(state, sandbox_id, name, offset=params.offset, limit=limit,
                                          json_budget=None if params.limit else PAGE_BYTES, spid=spid)
        except ValueError as exc:
            raise ToolError(f"process {spid}: {exc}") from None
        if page.text is None and not params.limit:
            keep = fit_bytes(page.data, PAGE_BYTES, head=True)
            page = msgspec.structs.replace(page, data=page.data[:keep])
        out = process_output(sandbox_id, spid, result, 0, host.timed_out(sandbox_id, spid))
        text = page.text if page.text is not None else page.data.decode("utf-8", errors="replace")
        setattr(out, name, text)
        setattr(out, f"{name}_bytes", page.total)
        setattr(out, f"{name}_truncated", page.next_offset < page.total or bool(page.dropped))
        setattr(out, f"{name}_resource", place_of(sandbox_id, spid).uri(name))
        setattr(out, f"{'stderr' if name == 'stdout' else 'stdout'}_truncated", False)
        more = page.next_offset < page.total or not page.complete
        out.hint = (
            f"{name} bytes {page.offset}..{page.next_offset} of {page.total}"
            + ("" if page.text is not None
               else " (binary: bad bytes replaced; the resource has them exactly)")
            + (f"; next page: offset={page.next_offset}" if more else "; that is the end")
        )
        return out

    # ---------------------------------------------------------------- ports and snapshots

    @registry.tool(
        name="expose_port",
        title="Expose a sandbox port on this machine",
        description="""Forward a sandbox's TCP port to 127.0.0.1 on the engine's machine. Free (no VM).

TL;DR: PURPOSE: open a dev server in a browser, curl an API from the host. COST: free.

USAGE:
- exec(sandbox_id, command="python3 -m http.server 8000", background=true), then
  expose_port(sandbox_id, port=8000) → url (http://127.0.0.1:<host port>). Loopback only: never
  reachable from another machine. Closed when the sandbox stops; traffic keeps it from idling out.
- Embedded engine only (the Contree cloud has no port forwarding).

RETURNS: {sandbox_id, port, url, host, host_port}

GUIDES:
- [USEFUL] contree://guide/sandboxes""",
        annotations=ToolAnnotations(read_only=False, destructive=False, idempotent=True, open_world=False),
    )
    async def expose_port(params: ExposePortParams, ctx: RequestContext) -> ExposePortOutput:
        sandbox_id = owned(ctx, params.sandbox_id)
        with backend_errors(f"expose_port in sandbox {sandbox_id}"):
            host = await hosts.get()
            forward = await host.expose(sandbox_id, params.port)
        return ExposePortOutput(
            sandbox_id=sandbox_id, port=forward.port, url=forward.url, host=forward.host,
            host_port=forward.host_port,
            hint=f"url reaches port {forward.port} in the sandbox from this machine only (127.0.0.1); "
            "it closes when the sandbox stops")

    @registry.tool(
        name="snapshot_sandbox",
        title="Snapshot a running sandbox",
        description="""Save a running sandbox's filesystem as a new image while it runs. Free (no VM).

TL;DR: PURPOSE: a rollback point or a branch point of live work (a database loaded, a build done).
COST: free; the sandbox's processes pause while its changes are copied (pause_ms).

USAGE:
- snapshot_sandbox(sandbox_id, tag="myproject/db-loaded/debian") → image (a child of the image the
  sandbox started from, its lineage naming the commands run so far). Start more sandboxes or runs from
  it; read it with read_file/list_files/grep.
- Embedded engine only (on the Contree cloud: stop_sandbox(commit=true)).

RETURNS: {sandbox_id, image, parent, tag, unchanged, bytes, pause_ms, total_ms}

GUIDES:
- [USEFUL] contree://guide/sandboxes""",
        annotations=ToolAnnotations(read_only=False, destructive=False, idempotent=False, open_world=False),
    )
    async def snapshot_sandbox(params: SnapshotSandboxParams, ctx: RequestContext) -> SnapshotOutput:
        sandbox_id = owned(ctx, params.sandbox_id)
        tag = validate_tag(params.tag) if params.tag else None
        with backend_errors(f"snapshot_sandbox {sandbox_id}"):
            host = await hosts.get()
            snap = await host.snapshot(sandbox_id)
            image = snap.image.uuid
            if not snap.unchanged:
                await observe_image(ctx, sandbox_id, snap.parent, image)
            if tag is not None:
                tag = (await state.images.set_tag(image, tag, ctx.principal)).tag
        hint = ("nothing was written in the sandbox yet: image is the one it started from" if snap.unchanged
                else f'start from it: start_sandbox(image="{image}") or run(image="{image}", ...)')
        return SnapshotOutput(
            sandbox_id=sandbox_id, image=image, parent=snap.parent, tag=tag, unchanged=snap.unchanged,
            bytes=snap.bytes, pause_ms=snap.pause_ms, total_ms=snap.total_ms, frozen_with=snap.frozen_with,
            commands=snap.commands, hint=hint)

    # ---------------------------------------------------------------- stop / list

    @registry.tool(
        name="stop_sandbox",
        title="Stop a sandbox",
        description="""Stop a long-lived sandbox, optionally keeping its files as an image. Free (no VM).

TL;DR: PURPOSE: end a sandbox, optionally keeping its filesystem as an image. COST: free.

USAGE:
- Its processes get SIGTERM, then SIGKILL 2 s later.
- stop_sandbox(sandbox_id) discards its changes; commit=true keeps them as a new image (result_image,
  a child of the image it started from), like run(disposable=false).
- Exposed ports close; exec afterwards is an error. Its processes' output stays readable.

RETURNS: {sandbox_id, state: "stopped", stop_reason, result_image (commit=true), ...}

GUIDES:
- [USEFUL] contree://guide/sandboxes""",
        annotations=ToolAnnotations(read_only=False, destructive=True, idempotent=False, open_world=False),
    )
    async def stop_sandbox(params: StopSandboxParams, ctx: RequestContext) -> SandboxOutput:
        sandbox_id = owned(ctx, params.sandbox_id)
        with backend_errors(f"stop_sandbox {sandbox_id}"):
            host = await hosts.get()
            info = await host.stop(sandbox_id, params.commit)
        if info.result_image and info.result_image != info.image:
            await observe_image(ctx, sandbox_id, info.image, info.result_image)
        hint = f"its filesystem is image {info.result_image}" if info.result_image else None
        return sandbox_output(info, hint=hint)

    async def observe_image(ctx: RequestContext, sandbox_id: str, parent: str, image: str) -> None:
        """A new image from a sandbox: the caller's own, with a lineage entry naming what ran in it."""
        try:
            command = command_of(await state.backend.get_operation(sandbox_id), image)
        except BackendError:
            command = None
        state.observe(api.OperationResponse(
            uuid=sandbox_id, kind="instance", status="SUCCESS", image_uuid=parent, result_image_uuid=image,
            metadata={"command": command} if command else None), ctx.principal)

    @registry.tool(
        name="list_sandboxes",
        title="List running sandboxes",
        description="""List the long-lived sandboxes that are running. Free (no VM).

TL;DR: PURPOSE: find a sandbox started earlier (its id, ports, idle time). COST: free.

USAGE:
- list_sandboxes() → the running sandboxes this caller started; stopped ones are not listed (get_operation
  with a sandbox_id still reads one).

RETURNS: {sandboxes: [{sandbox_id, image, state, expires_at, idle_seconds, processes_running, ports:
[{port, url}], snapshots, ...}]}

GUIDES:
- [USEFUL] contree://guide/sandboxes""",
        annotations=ToolAnnotations(read_only=True, destructive=False, idempotent=True, open_world=False),
    )
    async def list_sandboxes(params: ListSandboxesParams, ctx: RequestContext) -> SandboxListOutput:
        with backend_errors("list_sandboxes"):
            host = await hosts.get()
            found = await host.list()
        mine = [sandbox_output(i) for i in found if state.owners.visible(ctx.principal, i.uuid)]
        hint = None if mine else "no sandbox is running: start_sandbox starts one"
        return SandboxListOutput(sandboxes=mine, hint=hint)

    # ---------------------------------------------------------------- whole output of a process

    @registry.resource_template(
        RESOURCE + "/{stream}",
        name="sandbox_process_output",
        title="Full output of a sandbox process",
        description=(
            "The whole stdout or stderr of a process started with exec: contree://sandboxes/<sandbox_id>/"
            "processes/<process_id>/stdout (or /stderr). Page with ?offset=<bytes>&limit=<bytes> (default "
            f"limit {output.DEFAULT_PAGE}, at most {state.read_max_bytes}); continue at _meta.next_offset."
        ),
        mime_type="text/plain",
    )
    async def process_stream(ctx: RequestContext, sandbox_id: str, process_id: str,
                             stream: str) -> list[ResourceContents]:
        from tools.resources import parse_stream

        uri = f"{RESOURCE.format(sandbox_id=sandbox_id, process_id=process_id)}/{stream}"
        name, offset, limit = parse_stream(stream, max(state.read_max_bytes, output.DEFAULT_PAGE))
        if name not in output.STREAMS:
            raise ResourceNotFound(uri, f"Unknown stream {name!r}: use stdout or stderr")
        if not is_uuid(sandbox_id) or not process_id.isdigit() or not state.owners.visible(ctx.principal,
                                                                                          sandbox_id):
            raise ResourceNotFound(uri, f"Process not found: {sandbox_id}/{process_id}")
        try:
            page = await output.read_page(state, sandbox_id, name, offset=offset,
                                          limit=limit or output.DEFAULT_PAGE,
                                          json_budget=None if limit else output.DEFAULT_PAGE,
                                          spid=int(process_id))
        except (BadRequest, ValueError) as exc:
            raise InvalidParams(f"{uri}: {exc}") from None
        except BackendError as exc:
            raise ResourceNotFound(uri, f"Output of process {process_id} in {sandbox_id}: {exc}") from None
        if page.text is None:
            return [ResourceContents.from_bytes(uri, page.data, "application/octet-stream", meta=page.meta())]
        return [ResourceContents(uri, "text/plain", text=page.text, meta=page.meta())]

    del (start_sandbox, list_sandboxes, stop_sandbox, exec_, get_process, write_stdin, signal_process,
         expose_port, snapshot_sandbox, process_stream)

