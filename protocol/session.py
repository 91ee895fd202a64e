"""The sans-IO MCP core: `Session.receive(bytes) -> [events]`, one state machine for both protocol eras.

Every protocol rule lives here (h11's "rule 1"): framing and batches, version negotiation and gating,
the handshake era's lifecycle (initialize, logging level, subscriptions) and the stateless era's
per-request envelope (`_meta`, HTTP headers, resultType, caching, input-required results, tasks),
cancellation, progress, pagination, server→client requests. Nothing here does I/O or touches asyncio: the
shell feeds bytes in, sends the `Reply`/`Notify`/`Ask` events out, runs a handler for each `Dispatch` and
reports its outcome with `finish`.

Era of a request: one carrying the 2026-07-28 `_meta` keys (or, on a Streamable HTTP POST without a
session, a 2026-07-28 `MCP-Protocol-Version` header) is served statelessly; anything else belongs to the
handshake era and to the connection's `initialize`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from protocol import headers as http_headers
from protocol import mrtr, results, versions
from protocol.core import Core
from protocol.errors import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    REQUEST_REJECTED,
    ClientRequestError,
    InputRequired,
    InvalidParams,
    InvalidRequest,
    McpError,
    MethodNotFound,
    MissingClientCapability,
)
from protocol.events import Answer, Batch, Call, Cancel, Client, Dispatch, Event, Listen, Provide, StopTask
from protocol.headers import HttpHeaders
from protocol.jsonrpc import (
    classify,
    classify_raw,
    decode_frame,
    decode_meta,
    decode_params,
    error_reply,
    frame_error,
)
from protocol.messages import (
    CallToolParams,
    CancelledParams,
    CompleteParams,
    CursorParams,
    GetPromptParams,
    InitializeParams,
    InputRequest,
    ListenFilter,
    ListenParams,
    LogParams,
    Message,
    Notification,
    ProgressParams,
    ReadResourceParams,
    Request,
    Response,
    SetLevelParams,
    TaskParams,
    TaskUpdateParams,
    UriParams,
    encode,
    encode_error,
    encode_notification,
    encode_raw_result,
    encode_request,
    encode_result,
    with_fields,
)
from protocol.methods import (
    CAPABILITY_FOR,
    HANDLER_METHODS,
    LIST_CHANGED,
    LIST_KINDS,
    MODERN_METHODS,
    MRTR_METHODS,
    SYNC_METHODS,
)
from protocol.stateless import (
    SUBSCRIPTION_ID_KEY,
    for_modern,
    has_tasks,
    is_modern_meta,
    not_found,
    request_envelope,
    wire_input,
)
from protocol.tasks import EXTENSION as TASKS_EXTENSION
from protocol.tasks import TaskRecord
from protocol.types import Ask, Notify, Reply, RequestId

MAX_INFLIGHT = 1024
MAX_SUBSCRIPTIONS = 1024
MAX_LISTENS = 64
MAX_PENDING_ASKS = 64
COMPLETION_LIMIT = 100


class _Running(msgspec.Struct):
    """Protocol state of one handler run: progress so far, cancellation, the task it became."""

    call: Call
    last_progress: float | None = None
    cancelled: bool = False
    task: TaskRecord | None = None


class Session:
    """Per-connection protocol state: the negotiated revision (handshake era), capabilities, log level,
    subscriptions, listen streams, in-flight requests and pending server→client requests.

    `http=True`: a Streamable HTTP POST that came without a session id: `initialize` may start a session,
    a stateless request is served, anything else needs a session (400)."""

    def __init__(self, core: Core, *, principal: str | None = None, http: bool = False) -> None:
        self.core = core
        self.registry = core.registry
        self.principal = principal
        self.http = http
        self.protocol_version: str | None = None
        self.client_capabilities: dict[str, Any] = {}
        self.client_info: dict[str, Any] = {}
        self.initialized = False  # notifications/initialized received
        self.log_level: int | None = None
        self.subscriptions: set[str] = set()
        self.listens: dict[RequestId, ListenFilter] = {}
        self.inflight: dict[RequestId, int] = {}  # request id → serial of its run
        self.max_inflight = MAX_INFLIGHT
        self.closed = False
        self._runs: dict[int, _Running] = {}
        self._serial = 0
        self._asks: dict[int, RequestId | None] = {}  # our server→client request id → the call it serves
        self._next_ask = 0

    # ================================================================ input

    def receive(self, data: bytes | str, headers: HttpHeaders | None = None) -> list[Event]:
        """One transport frame (a JSON value) → what to send and what to run."""
        decoded = decode_frame(data)
        if isinstance(decoded, Reply):
            return [decoded]
        if not isinstance(decoded, list):
            return self._message(classify(decoded), headers)
        items = decoded
        if not items:
            return [frame_error(INVALID_REQUEST, "Invalid Request: empty batch")]
        if not versions.allows_batches(self.protocol_version):
            message = f"Invalid Request: batches are not allowed in {self.protocol_version}"
            return [frame_error(INVALID_REQUEST, message)]
        messages = [classify_raw(item) for item in items]
        if any(type(m) is Request and m.method == "initialize" for m in messages):
            return [frame_error(INVALID_REQUEST, "Invalid Request: initialize in a batch")]
        events: list[Event] = []
        for m in messages:
            events.extend(self._message(m, None))
        return [Batch(tuple(events))]

    def _message(self, m: Message, headers: HttpHeaders | None) -> list[Event]:
        t = type(m)
        if t is Request:
            return self._request(m, headers)  # type: ignore[arg-type]
        if t is Notification:
            return self._notification(m, headers)  # type: ignore[arg-type]
        if t is Response:
            return self._response(m)  # type: ignore[arg-type]
        reply = m.reply  # type: ignore[union-attr]
        return [] if reply is None else [Reply(None, reply)]

    def _request(self, req: Request, headers: HttpHeaders | None) -> list[Event]:
        meta = decode_meta(req.params)
        if is_modern_meta(meta) or (
            headers is not None
            and headers.protocol_version is not None
            and headers.protocol_version.strip() not in versions.SUPPORTED
        ):
            return self._stateless(req, meta, headers)
        try:
            return self._handshake(req, meta)
        except McpError as exc:
            return [error_reply(req.id, exc)]

    # ================================================================ handshake era

    def _handshake(self, req: Request, meta: dict[str, Any] | None) -> list[Event]:
        method = req.method
        if self.http and self.protocol_version is None and method != "initialize":
            return [self._needs_session(req)]
        if method not in SYNC_METHODS and method not in HANDLER_METHODS:
            raise MethodNotFound(f"Method not found: {method}")
        if self.protocol_version is None and method != "initialize" and method != "ping":
            raise InvalidRequest("Invalid Request: the session is not initialized")
        if req.id in self.inflight:
            raise InvalidRequest(f"Invalid Request: id {req.id!r} is already in flight")
        if method in HANDLER_METHODS:
            if len(self.inflight) >= self.max_inflight:
                # Per-session memory stays bounded (MCP-PROTOCOL.md §7); the client may retry later.
                raise McpError("Too many requests in flight; retry later", code=REQUEST_REJECTED)
            version = self.protocol_version or versions.LATEST
            params = self._handler_params(req)
            return [
                self._dispatch(req, params, version, meta, client=None, answers={}, task_support="forbidden")
            ]
        return [Reply(req.id, encode_raw_result(req.id, self._sync(req, method)))]

    def _needs_session(self, req: Request) -> Reply:
        """A sessionless POST that is neither initialize nor stateless; -32601 for unknown methods so that
        `server/discover` probes (mcp 2.x) fall back to initialize at once."""
        if req.method not in SYNC_METHODS and req.method not in HANDLER_METHODS:
            return Reply(
                req.id, encode_error(req.id, METHOD_NOT_FOUND, f"Method not found: {req.method}"), 400
            )
        return frame_error(REQUEST_REJECTED, "Bad Request: Mcp-Session-Id header is required")

    def _sync(self, req: Request, method: str) -> bytes:
        if method == "ping":
            return b"{}"
        if method == "initialize":
            return self._initialize(decode_params(req.params, InitializeParams))
        version = self.protocol_version or versions.LATEST
        kind = LIST_KINDS.get(method)
        if kind is not None:
            return self.core.catalog.page(kind, version, decode_params(req.params, CursorParams).cursor)
        if method == "logging/setLevel":
            self.set_level(decode_params(req.params, SetLevelParams).level)
            return b"{}"
        uri = decode_params(req.params, UriParams).uri
        if method == "resources/subscribe":
            self.registry.find_resource(uri)  # ResourceNotFound (-32002) for URIs nobody serves
            if uri not in self.subscriptions and len(self.subscriptions) >= MAX_SUBSCRIPTIONS:
                raise InvalidParams("Too many subscriptions in this session")
            self.subscriptions.add(uri)
        else:  # resources/unsubscribe: always succeeds for a well-formed URI
            self.subscriptions.discard(uri)
        return b"{}"

    def _initialize(self, params: InitializeParams) -> bytes:
        if self.protocol_version is not None:
            raise InvalidRequest("Invalid Request: already initialized")
        version = versions.negotiate(params.protocol_version)
        caps, info = params.capabilities, params.client_info
        self.client_capabilities = caps if type(caps) is dict else {}
        self.client_info = info if type(info) is dict else {}
        self.protocol_version = version
        return encode(results.initialize_result(self.registry, version))

    def set_level(self, level: Any) -> None:
        if type(level) is not str or level not in versions.LEVELS:
            raise McpError(
                f"Invalid params: unknown log level {level!r}",
                code=INVALID_PARAMS,
                data={"levels": list(versions.LEVELS)},
            )
        self.log_level = versions.LEVELS[level]

    # ================================================================ stateless era (2026-07-28)

    def _stateless(
        self, req: Request, meta: dict[str, Any] | None, headers: HttpHeaders | None
    ) -> list[Event]:
        try:
            version, client = request_envelope(req.method, meta, headers)
            method = req.method
            if method not in MODERN_METHODS:
                raise not_found(method)
            if req.id in self.inflight or req.id in self.listens:
                raise InvalidRequest(f"Invalid Request: id {req.id!r} is already in flight")
            if method in HANDLER_METHODS:
                if len(self.inflight) >= self.max_inflight:
                    raise McpError("Too many requests in flight; retry later", code=REQUEST_REJECTED)
                return [self._stateless_call(req, version, meta, client, headers)]
            if method == "subscriptions/listen":
                return self._listen(req, client)
            if method.startswith("tasks/"):
                return self._task_request(req, client, headers)
            if method == "server/discover":
                return [Reply(req.id, encode_raw_result(req.id, self.core.discover()))]
            cursor = decode_params(req.params, CursorParams).cursor
            return [
                Reply(
                    req.id,
                    encode_raw_result(req.id, self.core.catalog.page(LIST_KINDS[method], version, cursor)),
                )
            ]
        except McpError as exc:
            exc = for_modern(exc)
            return [error_reply(req.id, exc, status=exc.status)]

    def _stateless_call(
        self,
        req: Request,
        version: str,
        meta: dict[str, Any] | None,
        client: Client,
        headers: HttpHeaders | None,
    ) -> Dispatch:
        params = self._handler_params(req)
        task_support = "forbidden"
        if type(params) is CallToolParams:
            tool = self.registry.visible_tool(params.name, version)
            if tool is None:
                raise InvalidParams(f"Unknown tool: {params.name}", data={"name": params.name})
            if headers is not None:
                http_headers.check_name(headers, req.method, params.name)
                http_headers.check_params(headers, tool.mirrored, params.arguments or {})
            if tool.tasks != "forbidden":
                if has_tasks(client):
                    task_support = tool.tasks
                elif tool.tasks == "required":
                    raise MissingClientCapability({"extensions": {TASKS_EXTENSION: {}}})
        elif type(params) is GetPromptParams:
            if headers is not None:
                http_headers.check_name(headers, req.method, params.name)
        elif type(params) is ReadResourceParams:
            if headers is not None:
                http_headers.check_name(headers, req.method, params.uri)
        answers: dict[str, dict[str, Any]] = {}
        if type(params) is not CompleteParams:
            state = params.request_state
            if state is not None:
                target, arguments = mrtr.binding(params)
                answers = mrtr.open_state(
                    self.core.secret,
                    state,
                    method=req.method,
                    target=target,
                    arguments=arguments,
                    principal=self.principal,
                    now=self.core.clock(),
                )
            given = params.input_responses
            if given:
                answers = {**answers, **given}
        return self._dispatch(
            req, params, version, meta, client=client, answers=answers, task_support=task_support
        )

    def _listen(self, req: Request, client: Client) -> list[Event]:
        wanted = decode_params(req.params, ListenParams).notifications
        if wanted.task_ids and not has_tasks(client):
            raise MissingClientCapability({"extensions": {TASKS_EXTENSION: {}}})
        if len(self.listens) >= MAX_LISTENS:
            raise McpError("Too many subscriptions/listen streams; retry later", code=REQUEST_REJECTED)
        self.listens[req.id] = wanted
        # Acknowledge what we honour: every filter field is supported.
        ack = encode_notification(
            "notifications/subscriptions/acknowledged",
            {"_meta": {SUBSCRIPTION_ID_KEY: req.id}, "notifications": msgspec.to_builtins(wanted)},
        )
        return [Listen(req.id), Notify(ack, related=req.id)]

    def end_listen(self, listen_id: RequestId) -> Reply | None:
        """The graceful end of a listen stream (the server closes it): its response."""
        if self.listens.pop(listen_id, None) is None:
            return None
        meta = {**self.core.envelope.meta, SUBSCRIPTION_ID_KEY: listen_id}
        return Reply(listen_id, encode_result(listen_id, {"resultType": "complete", "_meta": meta}))

    def _task_request(self, req: Request, client: Client, headers: HttpHeaders | None) -> list[Event]:
        if not has_tasks(client):
            raise MissingClientCapability({"extensions": {TASKS_EXTENSION: {}}})
        method = req.method
        if method not in ("tasks/get", "tasks/update", "tasks/cancel"):
            raise not_found(method)
        params: TaskParams = decode_params(
            req.params, TaskUpdateParams if method == "tasks/update" else TaskParams
        )
        if headers is not None:
            http_headers.check_name(headers, method, params.task_id)
        tasks = self.core.tasks
        record = tasks.get(params.task_id, self.principal)
        events: list[Event] = []
        if method == "tasks/get":
            body = with_fields(self.core.envelope.complete, tasks.encode(record, detailed=True))
            return [Reply(req.id, encode_raw_result(req.id, body))]
        if method == "tasks/update":
            accepted = tasks.provide(record, params.input_responses)  # type: ignore[attr-defined]
            if accepted:
                events.append(Provide(record.task_id, accepted))
        elif tasks.cancel(record):
            events.append(StopTask(record.task_id))
        events.insert(0, Reply(req.id, encode_raw_result(req.id, b"{" + self.core.envelope.complete + b"}")))
        return events

    # ================================================================ handlers

    def _handler_params(self, req: Request) -> Any:
        method = req.method
        if method == "tools/call":
            return decode_params(req.params, CallToolParams)
        if method == "resources/read":
            return decode_params(req.params, ReadResourceParams)
        if method == "prompts/get":
            return decode_params(req.params, GetPromptParams)
        params = decode_params(req.params, CompleteParams)
        ref = params.ref
        if type(ref.name if ref.type == "ref/prompt" else ref.uri) is not str:
            raise InvalidParams("Invalid params: ref and argument name are required")
        return params

    def _dispatch(
        self,
        req: Request,
        params: Any,
        version: str,
        meta: dict[str, Any] | None,
        *,
        client: Client | None,
        answers: dict[str, dict[str, Any]],
        task_support: str,
    ) -> Dispatch:
        token = meta.get("progressToken") if meta is not None else None
        if type(token) is not str and type(token) is not int:
            token = None
        self._serial += 1
        call = Call(
            serial=self._serial,
            id=req.id,
            method=req.method,
            params=params,
            version=version,
            modern=client is not None,
            progress_token=token,
            client=client,
            answers=answers,
            task_support=task_support,
        )
        self.inflight[req.id] = call.serial
        self._runs[call.serial] = _Running(call)
        return Dispatch(call)

    def finish(self, call: Call, result: Any = None, error: BaseException | None = None) -> list[Event]:
        """A handler's outcome → its reply (nothing if the request was cancelled; a task keeps it)."""
        running = self._runs.pop(call.serial, None)
        if running is None:
            return []
        if self.inflight.get(call.id) == call.serial:
            del self.inflight[call.id]
        if running.task is not None:
            self._task_outcome(running.task, call, result, error)
            return []
        if running.cancelled:
            return []
        if error is not None:
            return [self._error_outcome(call, error)]
        body = results.shape(call, result, self.core.envelope)
        return [Reply(call.id, encode_raw_result(call.id, body))]

    def _error_outcome(self, call: Call, error: BaseException) -> Reply:
        if isinstance(error, InputRequired):
            if call.modern and call.method in MRTR_METHODS:
                body = results.input_required(
                    call, error, self.core.envelope, self.core.secret, self.core.clock(), self.principal
                )
                return Reply(call.id, encode_raw_result(call.id, body))
            error = McpError("Internal error: the handler asked the client outside a stateless call")
        if isinstance(error, McpError):
            if not call.modern:
                return error_reply(call.id, error)
            error = for_modern(error)
            return error_reply(call.id, error, status=error.status)
        return Reply(call.id, encode_error(call.id, INTERNAL_ERROR, "Internal error"))

    def cancelled(self, call: Call) -> bool:
        running = self._runs.get(call.serial)
        return running is None or running.cancelled

    def cancel_requested(self, call: Call) -> bool:
        """The client cancelled this running request; closing the session cancels runs too, but that is
        the connection ending, not a request to stop the work."""
        running = self._runs.get(call.serial)
        return running is not None and running.cancelled and not self.closed

    # ================================================================ what handlers send

    def progress(
        self, call: Call, progress: float, total: float | None, message: str | None
    ) -> Notify | None:
        """notifications/progress for `call`, if allowed: a token, still running, strictly increasing."""
        running = self._runs.get(call.serial)
        if running is None or running.cancelled:
            return None
        if running.task is not None:
            if message:
                self.core.tasks.note(running.task, message)
            return None
        if call.progress_token is None:
            return None
        if running.last_progress is not None and progress <= running.last_progress:
            return None
        running.last_progress = progress
        if message is not None and not versions.has_annotations(call.version):
            message = None
        params = ProgressParams(call.progress_token, progress, total, message)
        return Notify(encode_notification("notifications/progress", params), related=call.id)

    def log(self, call: Call | None, level: str, data: Any, logger: str | None = None) -> Notify | None:
        """notifications/message at `level` if the client asked for it (session level, or the stateless
        request's own `logLevel`; nothing at all without one)."""
        if call is None:
            if not self.log_enabled(level):
                return None
            return Notify(encode_notification("notifications/message", LogParams(level, data, logger)))
        running = self._runs.get(call.serial)
        if running is None or running.cancelled or running.task is not None:
            return None
        threshold = call.client.log_level if call.client is not None else self.log_level
        if threshold is None or versions.LEVELS.get(level, 7) < threshold:
            return None
        return Notify(
            encode_notification("notifications/message", LogParams(level, data, logger)), related=call.id
        )

    def log_enabled(self, level: str) -> bool:
        threshold = self.log_level
        return threshold is not None and versions.LEVELS.get(level, 7) >= threshold

    def capabilities(self, call: Call) -> dict[str, Any]:
        return call.client.capabilities if call.client is not None else self.client_capabilities

    def client_identity(self, call: Call) -> dict[str, Any]:
        return call.client.info if call.client is not None else self.client_info

    def require(self, call: Call, methods: list[str]) -> None:
        """Every server→client method needs its client capability: -32021 for a stateless request; a
        ClientRequestError (the tool reports it) in the handshake era."""
        caps = self.capabilities(call)
        missing: dict[str, Any] = {
            CAPABILITY_FOR[m]: {} for m in methods if m in CAPABILITY_FOR and CAPABILITY_FOR[m] not in caps
        }
        if not missing:
            return
        if call.modern:
            raise MissingClientCapability(missing)
        raise ClientRequestError(f"the client does not support {', '.join(missing)}", code=METHOD_NOT_FOUND)

    def ask(self, call: Call, method: str, params: dict[str, Any]) -> Ask:
        """A handshake-era server→client request for `call` (bounded; the shell awaits the Answer)."""
        if self.closed:
            raise ClientRequestError("the session is closed")
        self.require(call, [method])
        if len(self._asks) >= MAX_PENDING_ASKS:
            raise ClientRequestError("too many pending requests to the client")
        self._next_ask += 1
        rid = self._next_ask
        self._asks[rid] = call.id
        return Ask(rid, encode_request(rid, method, params), related=call.id)

    def forget(self, ask_id: int) -> None:
        """The shell stopped waiting for server→client request `ask_id` (timeout, cancel)."""
        self._asks.pop(ask_id, None)

    # ================================================================ tasks (2026-07-28 extension)

    def promote(self, call: Call, status: str | None = None) -> Reply | None:
        """Turn a running stateless call into a task: the CreateTaskResult to send, or None if it cannot."""
        running = self._runs.get(call.serial)
        if (
            running is None
            or running.cancelled
            or running.task is not None
            or call.task_support == "forbidden"
        ):
            return None
        record = self.core.tasks.create(self.principal, status)
        if record is None:
            return None
        running.task = record
        if self.inflight.get(call.id) == call.serial:
            del self.inflight[call.id]  # answered: the client may reuse the id
        body = with_fields(self.core.envelope.task, self.core.tasks.encode(record, detailed=False))
        return Reply(call.id, encode_raw_result(call.id, body))

    def task_of(self, call: Call) -> TaskRecord | None:
        running = self._runs.get(call.serial)
        return running.task if running is not None else None

    def park(self, call: Call, requests: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, str]:
        """A task asks the client: it waits in input_required; returns the handler's key → wire key."""
        record = self.task_of(call)
        if record is None:
            raise ClientRequestError("the call is not a task")
        wire = {k: InputRequest(m, wire_input(m, p)) for k, (m, p) in requests.items()}
        return self.core.tasks.park(record, wire)

    def _task_outcome(self, record: TaskRecord, call: Call, result: Any, error: BaseException | None) -> None:
        tasks = self.core.tasks
        if error is None:
            tasks.complete(record, results.shape(call, result, self.core.envelope))
        elif isinstance(error, McpError):
            exc = for_modern(error)
            data = {} if exc.data is None else {"data": exc.data}
            tasks.fail(record, {"code": exc.code, "message": exc.message, **data}, exc.message)
        elif isinstance(error, Exception | InputRequired):
            tasks.fail(record, {"code": INTERNAL_ERROR, "message": "Internal error"}, "Internal error")
        else:  # the work was stopped (server shutdown): nobody will finish it
            tasks.cancel(record)

    def task_notice(self, task_id: str) -> list[Notify]:
        """notifications/tasks for this session's listen streams that follow task `task_id`."""
        out: list[Notify] = []
        for listen_id, wanted in self.listens.items():
            if task_id in wanted.task_ids:
                record = self.core.tasks.records.get(task_id)
                if record is None or record.principal != self.principal:
                    continue
                body = self.core.tasks.encode(record, detailed=True)
                meta = encode({SUBSCRIPTION_ID_KEY: listen_id})
                params = with_fields(b'"_meta":' + meta, body)
                out.append(
                    Notify(
                        b'{"jsonrpc":"2.0","method":"notifications/tasks","params":%s}' % params, listen_id
                    )
                )
        return out

    # ================================================================ notifications in

    def _notification(self, n: Notification, headers: HttpHeaders | None) -> list[Event]:
        if self.http and self.protocol_version is None:
            if (
                headers is None
                or headers.protocol_version is None
                or headers.protocol_version in versions.SUPPORTED
            ):
                return [frame_error(REQUEST_REJECTED, "Bad Request: Mcp-Session-Id header is required")]
            return []  # stateless HTTP defines no client notifications: accepted, ignored
        if n.method == "notifications/initialized":
            self.initialized = True
        elif n.method == "notifications/cancelled":
            try:
                rid = decode_params(n.params, CancelledParams).request_id
            except McpError:
                return []
            if type(rid) is not str and type(rid) is not int:
                return []
            if rid in self.listens:
                del self.listens[rid]  # stdio: the client ends its subscription
                return []
            serial = self.inflight.get(rid)
            if serial is None:
                return []  # unknown or finished: races are tolerated
            running = self._runs.get(serial)
            if running is not None:
                running.cancelled = True
            del self.inflight[rid]
            return [Cancel(rid)]
        return []

    def _response(self, r: Response) -> list[Event]:
        if self.http and self.protocol_version is None:
            return [frame_error(REQUEST_REJECTED, "Bad Request: Mcp-Session-Id header is required")]
        if type(r.id) is not int or r.id not in self._asks:
            return []
        del self._asks[r.id]
        return [Answer(r.id, r.result, r.error)]

    # ================================================================ notifications out

    def list_changed(self, kind: str) -> list[Notify]:
        """notifications/<kind>/list_changed for listen streams that asked, and for an initialized
        handshake session when the registry announces changes."""
        method = LIST_CHANGED.get(kind)
        if method is None:
            return []
        out: list[Notify] = []
        if self.protocol_version is not None and self.registry.announce_list_changes:
            out.append(Notify(encode_notification(method)))
        for listen_id, wanted in self.listens.items():
            if (
                (kind == "tools" and wanted.tools_list_changed)
                or (kind == "prompts" and wanted.prompts_list_changed)
                or (kind == "resources" and wanted.resources_list_changed)
            ):
                out.append(
                    Notify(
                        encode_notification(method, {"_meta": {SUBSCRIPTION_ID_KEY: listen_id}}), listen_id
                    )
                )
        return out

    def resource_updated(self, uri: str) -> list[Notify]:
        out: list[Notify] = []
        if uri in self.subscriptions:
            out.append(Notify(encode_notification("notifications/resources/updated", {"uri": uri})))
        for listen_id, wanted in self.listens.items():
            if uri in wanted.resource_subscriptions:
                params = {"_meta": {SUBSCRIPTION_ID_KEY: listen_id}, "uri": uri}
                out.append(Notify(encode_notification("notifications/resources/updated", params), listen_id))
        return out

    # ================================================================ shutdown

    def close(self) -> list[Event]:
        """The connection ends: cancel what runs (tasks live on) and end listen streams gracefully."""
        if self.closed:
            return []
        self.closed = True
        events: list[Event] = []
        for listen_id in list(self.listens):
            reply = self.end_listen(listen_id)
            if reply is not None:
                events.append(reply)
        for running in list(self._runs.values()):
            if running.task is None and not running.cancelled:
                running.cancelled = True
                events.append(Cancel(running.call.id))
        self.inflight.clear()
        self._asks.clear()
        return events


__all__ = [
    "CAPABILITY_FOR",
    "HANDLER_METHODS",
    "MAX_INFLIGHT",
    "MAX_SUBSCRIPTIONS",
    "SYNC_METHODS",
    "Core",
    "Session",
    "classify",
]
