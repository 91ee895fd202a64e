"""get_operation, list_operations, wait_operations, cancel_operation."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from contree import api
from contree.backend import OperationQuery
from contree.errors import BackendError, BadRequest, Conflict
from protocol.errors import ToolError
from protocol.registry import Registry, RequestContext, ToolAnnotations
from tools import output
from tools.bounds import MAX_OFFSET, MAX_WAIT_SECONDS
from tools.budget import RESULT_BUDGET, fit_bytes, keep_fitting, result_size
from tools.convert import operation_output, summary_output
from tools.errors import backend_errors
from tools.models import CancelOutput, OperationListOutput, OperationOutput, WaitOperationsOutput
from tools.params import PageLimit, PageOffset, PageStream
from tools.state import ServerState
from tools.waiting import poll_until_terminal

CANCEL_SETTLE = 2.0

POLL_INTERVAL = 0.5
PAGE_BYTES = 32 * 1024  # get_operation(stream=…) default page: within the result budget however escaped
LIST_PAGE = 1000  # the API's maximum page
LIST_MAX_PAGES = 20

STATUS_ALIASES = {
    "pending": "PENDING",
    "queued": "PENDING",
    "assigned": "ASSIGNED",
    "executing": "EXECUTING",
    "running": "EXECUTING",
    "success": "SUCCESS",
    "succeeded": "SUCCESS",
    "completed": "SUCCESS",
    "failed": "FAILED",
    "error": "FAILED",
    "cancelled": "CANCELLED",
    "canceled": "CANCELLED",
}
KINDS = {"instance": "instance", "image_import": "image_import", "import": "image_import", "run": "instance"}


class GetOperationParams(api.Model):
    operation_id: Annotated[str, Meta(description="Operation id from run or import_image.")]
    inflight: Annotated[
        bool, Meta(description="For a running instance: include the output produced so far.")
    ] = False
    stream: PageStream = None
    offset: PageOffset = 0
    limit: PageLimit = None


class ListOperationsParams(api.Model):
    limit: Annotated[int, Meta(ge=1, le=1000, description="Maximum number of operations.")] = 100
    status: Annotated[
        str | None,
        Meta(
            description="PENDING, ASSIGNED, EXECUTING, SUCCESS, FAILED or CANCELLED "
            "(any case; 'running' = EXECUTING)."
        ),
    ] = None
    type: Annotated[str | None, Meta(description="'instance' (runs) or 'image_import'.")] = None
    since: Annotated[
        str | None,
        Meta(description="Created after: ISO 8601, unix seconds or an interval ago (15m, 2h, 1d)."),
    ] = None
    kind: Annotated[str | None, Meta(description="Alias of 'type'.")] = None
    offset: Annotated[int, Meta(ge=0, le=MAX_OFFSET, description="Operations to skip (paging).")] = 0
    until: Annotated[str | None, Meta(description="Created before: same formats as 'since'.")] = None


class WaitOperationsParams(api.Model):
    operation_ids: Annotated[
        list[str], Meta(description="Operation ids to wait for (duplicates are ignored).")
    ]
    timeout: Annotated[
        float,
        Meta(
            ge=0,
            le=MAX_WAIT_SECONDS,
            description="Seconds to wait in total; unfinished ids are listed in 'pending'.",
        ),
    ] = 300.0
    mode: Annotated[
        Literal["all", "any"],
        Meta(description="'all': until every operation ended; 'any': until the first one did."),
    ] = "all"
    cancel_pending: Annotated[
        bool, Meta(description="Cancel the operations still running when the call returns (default: never).")
    ] = False


class CancelOperationParams(api.Model):
    operation_id: Annotated[str, Meta(description="Operation to cancel.")]


def normalize_status(value: str | None) -> str | None:
    if not value:
        return None
    upper = value.strip().upper()
    if upper in api.TERMINAL_STATUSES or upper in ("PENDING", "ASSIGNED", "EXECUTING"):
        return upper
    alias = STATUS_ALIASES.get(value.strip().lower())
    if alias is None:
        raise ToolError(
            f"Unknown status {value!r}: use PENDING, ASSIGNED, EXECUTING, SUCCESS, FAILED or CANCELLED"
        )
    return alias


def normalize_kind(value: str | None) -> str | None:
    if not value:
        return None
    kind = KINDS.get(value.strip().lower())
    if kind is None:
        raise ToolError(f"Unknown operation type {value!r}: use 'instance' or 'image_import'")
    return kind


async def wait_operations_impl(
    state: ServerState, ctx: RequestContext, params: WaitOperationsParams
) -> WaitOperationsOutput:
    ids = list(dict.fromkeys(i.strip() for i in params.operation_ids if i.strip()))
    out = WaitOperationsOutput()
    if not ids:
        return out
    loop = asyncio.get_running_loop()
    deadline = loop.time() + params.timeout
    active = list(ids)
    reported = 0.0
    seen: dict[str, api.OperationResponse] = {}

    async def fetch(op_id: str) -> tuple[str, api.OperationResponse | BaseException]:
        try:
            state.owners.require(ctx.principal, op_id)
            return op_id, await state.backend.get_operation(op_id)
        except BackendError as exc:
            return op_id, exc

    while True:
        for op_id, got in await asyncio.gather(*(fetch(i) for i in active)):
            if isinstance(got, BaseException):
                out.errors[op_id] = str(got)
                active.remove(op_id)
                continue
            seen[op_id] = got
            if got.status in api.TERMINAL_STATUSES:
                state.observe(got, ctx.principal)
                out.completed.append(op_id)
                active.remove(op_id)
        done = len(out.completed) + len(out.errors)
        if done > reported:
            reported = float(done)
            await ctx.progress(
                reported, float(len(ids)), f"{len(out.completed)}/{len(ids)} operations finished"
            )
        if not active or (params.mode == "any" and out.completed):
            break
        remaining = deadline - loop.time()
        if remaining <= 0:
            out.timed_out = True
            break
        await asyncio.sleep(min(POLL_INTERVAL, remaining))
    out.completed = [i for i in ids if i in out.completed]
    out.pending = [i for i in ids if i in active]
    await shape_results(state, out, seen)
    if params.cancel_pending:
        for op_id in out.pending:
            try:
                await state.backend.cancel_operation(op_id)
                out.cancelled.append(op_id)
            except Conflict:
                pass
            except BackendError as exc:
                out.errors[op_id] = f"cancel failed: {exc}"
    return out


async def shape_results(
    state: ServerState, out: WaitOperationsOutput, seen: dict[str, api.OperationResponse]
) -> None:
    """Each operation's result within an equal share of the budget; when even the bare records do not
    fit, the later ones are left out (named in `hint`: get_operation reads them)."""
    share = max(4096, RESULT_BUDGET // max(1, len(seen)))
    for op_id, op in seen.items():
        cap, budget = state.output_cap(state.cap_for(op_id))
        out.results[op_id] = await output.shape(
            state, op, cap=cap, budget=min(share, budget) if budget is not None else None
        )
    if result_size(out) <= RESULT_BUDGET:
        return
    left_out: list[str] = []
    while out.results and result_size(out) > RESULT_BUDGET:
        left_out.insert(0, next(reversed(out.results)))
        del out.results[left_out[0]]
        out.hint = (
            f"Results of {len(left_out)} operations left out to keep this result small; read them with "
            f"get_operation: {', '.join(left_out)}"
        )


async def stream_page(
    state: ServerState, op: api.OperationResponse, params: GetOperationParams
) -> OperationOutput:
    """get_operation(stream=…): one page of a whole stream in `stdout`/`stderr` (for clients that
    cannot read resources), never ending inside a UTF-8 character; `hint` names the next offset."""
    name = params.stream
    assert name is not None
    limit = params.limit or PAGE_BYTES
    if limit > max(state.read_max_bytes, PAGE_BYTES):
        raise ToolError(f"limit must be at most {max(state.read_max_bytes, PAGE_BYTES)} (--read-max-bytes)")
    op_id = op.uuid
    try:
        page = await output.read_page(
            state, op_id, name, offset=params.offset, limit=limit,
            json_budget=None if params.limit else PAGE_BYTES,
        )
    except (BadRequest, ValueError) as exc:
        raise ToolError(f"Operation {op_id!r}: {exc}") from None
    if page.text is None and not params.limit:  # binary shown as text: replacement characters weigh more
        page = msgspec.structs.replace(page, data=page.data[: fit_bytes(page.data, PAGE_BYTES, head=True)])
    out = operation_output(op, cap=0)
    text = page.text if page.text is not None else page.data.decode("utf-8", errors="replace")
    setattr(out, name, text)
    setattr(out, f"{name}_bytes", page.total)
    setattr(out, f"{name}_truncated", page.next_offset < page.total or bool(page.dropped))
    setattr(out, f"{name}_resource", output.stream_uri(op_id, name))
    other = "stderr" if name == "stdout" else "stdout"
    setattr(out, f"{other}_truncated", False)
    more = page.next_offset < page.total or not page.complete
    out.hint = (
        f"{name} bytes {page.offset}..{page.next_offset} of {page.total}"
        + ("" if page.text is not None else " (binary: bad bytes replaced; the resource has them exactly)")
        + (f"; next page: offset={page.next_offset}" if more else "; that is the end")
        + (f"; {page.dropped} bytes beyond the output quota were not stored" if page.dropped else "")
    )
    return out


async def list_owned(
    state: ServerState, query: OperationQuery, principal: str | None
) -> list[api.OperationSummary]:
    """The page of `query` among the operations `principal` started: the backend's listing (newest first,
    its filters applied) is walked in large pages and filtered, so offset/limit count owned ones only."""
    owned = state.owners.owned(principal)
    wanted = query.offset + query.limit
    found: list[api.OperationSummary] = []
    offset = 0
    for _ in range(LIST_MAX_PAGES):
        if not owned:
            break
        page = await state.backend.list_operations(
            msgspec.structs.replace(query, limit=LIST_PAGE, offset=offset)
        )
        found.extend(op for op in page if op.uuid in owned)
        if len(found) >= wanted or len(page) < LIST_PAGE:
            break
        offset += LIST_PAGE
    return found[query.offset : wanted]


def register_get_list(registry: Registry, state: ServerState) -> None:
    @registry.tool(
        name="get_operation",
        title="Get operation",
        description="""Get status and result of an operation. Free (no VM).

TL;DR: PURPOSE: check a run or import started with wait=false. COST: free.

USAGE:
- get_operation(operation_id="<id>"); inflight=true adds the output produced so far by a running command.
- get_operation(operation_id="<id>", stream="stdout", offset=8000) pages through a whole stream (in
  'stdout'; 'hint' names the next offset): every byte a run wrote stays readable.
- Statuses: PENDING, ASSIGNED, EXECUTING, then SUCCESS, FAILED or CANCELLED.

RETURNS: {uuid, status, kind, exit_code, stdout, stderr, stdout_truncated, stdout_tail, stdout_bytes, hint,
timed_out, result_image_uuid, filesystem_changed, error, duration, resources, ...}

GUIDES:
- [USEFUL] contree://guide/async
- [USEFUL] contree://guide/errors""",
        annotations=ToolAnnotations(read_only=True, destructive=False, idempotent=True, open_world=False),
    )
    async def get_operation(params: GetOperationParams, ctx: RequestContext) -> OperationOutput:
        with backend_errors(f"Operation {params.operation_id!r}"):
            state.owners.require(ctx.principal, params.operation_id.strip())
            op = await state.backend.get_operation(params.operation_id.strip(), inflight=params.inflight)
        if op.status in api.TERMINAL_STATUSES:
            state.observe(op, ctx.principal)
        if params.stream is not None:
            if op.kind != "instance":
                raise ToolError(f"Operation {params.operation_id!r} is an import: it has no output")
            return await stream_page(state, op, params)
        cap, budget = state.output_cap(state.cap_for(params.operation_id.strip()))
        return await output.shape(state, op, cap=cap, budget=budget, with_resources=True)

    @registry.tool(
        name="list_operations",
        title="List operations",
        description="""List operations (command executions and image imports). Free (no VM).

TL;DR: PURPOSE: find recent runs and imports, e.g. failures to debug. COST: free.

USAGE:
- list_operations(status="FAILED", since="1h"); statuses are case-insensitive, 'running' = EXECUTING.
- type="instance" (runs) or "image_import" (kind= is accepted too); offset/until for paging and ranges.

RETURNS: {operations: [{uuid, kind, status, error, created_at, duration, image_uuid, result_image_uuid,
image_size, consumed_cpu, consumed_memory}]}

GUIDES:
- [USEFUL] contree://guide/async""",
        annotations=ToolAnnotations(read_only=True, destructive=False, idempotent=True, open_world=False),
    )
    async def list_operations(params: ListOperationsParams, ctx: RequestContext) -> OperationListOutput:
        query = OperationQuery(
            limit=params.limit,
            offset=params.offset,
            status=normalize_status(params.status),
            kind=normalize_kind(params.type or params.kind),
            since=params.since,
            until=params.until,
        )
        with backend_errors("list_operations"):
            if state.owners.scoped:
                ops = await list_owned(state, query, ctx.principal)
            else:
                ops = await state.backend.list_operations(query)
        for op in ops:
            state.observe(op, ctx.principal)
        out = OperationListOutput(operations=[summary_output(o) for o in ops])
        if keep_fitting(out, out.operations, RESULT_BUDGET - 512):
            shown = len(out.operations)
            out.hint = f"{shown} operations shown; the next: list_operations(offset={params.offset + shown})"
        return out


def register_wait_cancel(registry: Registry, state: ServerState) -> None:
    @registry.tool(
        name="wait_operations",
        title="Wait for operations",
        description="""Wait for multiple operations to complete. Free (no VM).

TL;DR: PURPOSE: join operations started with wait=false. COST: free.

USAGE:
- wait_operations(operation_ids=[...], mode="all") returns when all ended; mode="any" on the first one that
  reaches SUCCESS, FAILED or CANCELLED.
- timeout bounds this call only: operations still running are listed in 'pending' with timed_out=true and keep
  running. Nothing is cancelled unless cancel_pending=true.

RETURNS: {results: {id: operation}, completed: [ids], pending: [ids], cancelled: [ids], errors: {id: message},
timed_out}

GUIDES:
- [ESSENTIAL] contree://guide/async""",
        annotations=ToolAnnotations(read_only=False, destructive=False, idempotent=True, open_world=False),
    )
    async def wait_operations(params: WaitOperationsParams, ctx: RequestContext) -> WaitOperationsOutput:
        return await wait_operations_impl(state, ctx, params)

    @registry.tool(
        name="cancel_operation",
        title="Cancel operation",
        description="""Cancel a running operation. Free (no VM).

TL;DR: PURPOSE: stop a run or import that is no longer needed. COST: free.

USAGE:
- cancel_operation(operation_id="<id>"). Cancellation is asynchronous; an operation that already finished
  keeps its status (reported in 'status', with cancelled=false).

RETURNS: {cancelled, operation_id, status}

GUIDES:
- [USEFUL] contree://guide/async""",
        annotations=ToolAnnotations(read_only=False, destructive=True, idempotent=True, open_world=False),
    )
    async def cancel_operation(params: CancelOperationParams, ctx: RequestContext) -> CancelOutput:
        op_id = params.operation_id.strip()
        with backend_errors(f"Operation {op_id!r}"):
            state.owners.require(ctx.principal, op_id)
            current = await state.backend.get_operation(op_id)
            status: str = current.status
            if status in api.TERMINAL_STATUSES:
                return CancelOutput(cancelled=status == "CANCELLED", operation_id=op_id, status=status)
            try:
                await state.backend.cancel_operation(op_id)
            except Conflict:
                pass
            # The engine (a service process, or the cloud) settles the cancel on its own time: report the
            # outcome when it lands within CANCEL_SETTLE seconds, else the status it has by then.
            deadline = asyncio.get_running_loop().time() + CANCEL_SETTLE
            status = (await poll_until_terminal(state.backend, op_id, deadline)).status
        return CancelOutput(cancelled=status not in ("SUCCESS", "FAILED"), operation_id=op_id, status=status)
